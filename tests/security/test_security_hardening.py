"""Hardening a client can see: rate limits (429 rate_limited + Retry-After, counted in Redis),
login lockout (423 account_locked), security headers, no sniffable uploads, a pinned JWT
algorithm, CORS closed by default, and the audit trail."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import jwt
import pytest
import redis
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.domain.models import AuditEvent
from api.domain.settings import Settings
from api.security import CSP
from tests.api.conftest import PASSWORD, bearer, login, signup, submit
from tests.security.conftest import REDIS_URL, AppFactory, form_token


def _login(client: FlaskClient, email: str, password: str = PASSWORD) -> tuple[int, dict, str]:
    r = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    return r.status_code, r.get_json(), r.headers.get("Retry-After", "")


def test_login_is_rate_limited_across_api_processes_through_redis(
    make_security_app: AppFactory, redis_db: redis.Redis
) -> None:
    limits = {"rate_limit_enabled": True, "rate_limit_storage_url": REDIS_URL}
    first = make_security_app(rate_limit_login="3/minute", **limits).test_client()
    second = make_security_app(rate_limit_login="3/minute", **limits).test_client()
    email = signup(first)["email"]
    assert _login(first, email)[0] == 200
    assert _login(second, email)[0] == 200
    assert _login(first, email)[0] == 200
    status, body, retry_after = _login(second, email)  # the 4th, on the other "process"
    assert status == 429
    assert body["error"]["code"] == "rate_limited"
    assert 1 <= int(retry_after) <= 61  # the window, rounded
    assert body["error"]["details"]["retry_after_s"] == int(retry_after)
    assert any(b"liverscan" in key for key in redis_db.keys("*"))


def _login_from(client: FlaskClient, email: str, address: str, forwarded_for: str) -> int:
    """Log in over a connection from `address` with this X-Forwarded-For; the status."""
    r = client.post(
        "/api/v1/auth/login",
        json={"email": email, "password": PASSWORD},
        environ_base={"REMOTE_ADDR": address},
        headers={"X-Forwarded-For": forwarded_for},
    )
    return r.status_code


def test_a_forged_forwarded_for_does_not_dodge_the_login_rate_limit(
    make_security_app: AppFactory,
) -> None:
    """No trusted proxy (LIVERSCAN_TRUSTED_PROXY_HOPS=0): the limit counts the connection's
    address whatever X-Forwarded-For says."""
    client = make_security_app(
        rate_limit_enabled=True, rate_limit_storage_url="memory://", rate_limit_login="2/minute"
    ).test_client()
    email = signup(client)["email"]
    forged = [_login_from(client, email, "203.0.113.66", f"192.0.2.{n}") for n in range(3)]
    assert forged == [200, 200, 429]


def test_behind_a_trusted_proxy_each_client_has_its_own_login_rate_limit(
    make_security_app: AppFactory,
) -> None:
    """LIVERSCAN_TRUSTED_PROXY_HOPS=1: clients of one proxy are limited each on its own address,
    the one the proxy appended (not one a client prepended)."""
    client = make_security_app(
        trusted_proxy_hops=1,
        rate_limit_enabled=True,
        rate_limit_storage_url="memory://",
        rate_limit_login="2/minute",
    ).test_client()
    email, proxy = signup(client)["email"], "10.0.0.2"
    first = [_login_from(client, email, proxy, f"192.0.2.{n}, 198.51.100.10") for n in range(3)]
    assert first == [200, 200, 429]
    assert _login_from(client, email, proxy, "198.51.100.20") == 200


@pytest.mark.parametrize(
    ("hops", "forwarded_for", "scheme"),
    [
        (0, "198.51.100.10", "http"),
        (1, "198.51.100.10", "https"),
        (2, "198.51.100.10, 10.0.0.3", "https"),
    ],
)
def test_links_take_the_scheme_the_trusted_proxy_reports(
    make_security_app: AppFactory, hops: int, forwarded_for: str, scheme: str
) -> None:
    """Behind a TLS-terminating proxy the job's status_url must say https (the proxy's
    X-Forwarded-Proto); with no trusted proxy a client's own X-Forwarded-Proto is ignored. Behind
    two proxies X-Forwarded-For has an entry per hop but X-Forwarded-Proto only the one value the
    nearest proxy set (proxies overwrite it), and that value counts."""
    client = make_security_app(trusted_proxy_hops=hops).test_client()
    token = bearer(login(client, signup(client)["email"])["access_token"])
    via_proxy = {"X-Forwarded-For": forwarded_for, "X-Forwarded-Proto": "https"}
    r = submit(client, token, extra_headers=via_proxy)
    assert r.status_code == 202
    assert r.get_json()["status_url"].startswith(f"{scheme}://")


PUBLIC = "api.clinic.example"
FORGED_HOST = "evil.example"


def test_without_public_hosts_links_take_any_host(make_security_app: AppFactory) -> None:
    """LIVERSCAN_PUBLIC_HOSTS empty (the default): links are built on the request's own Host, as
    ever (restrict the names at the proxy, or set the list)."""
    client = make_security_app().test_client()
    token = bearer(login(client, signup(client)["email"])["access_token"])
    r = submit(client, token, extra_headers={"Host": FORGED_HOST})
    assert r.status_code == 202
    assert r.get_json()["status_url"].startswith(f"http://{FORGED_HOST}/")


def test_with_public_hosts_no_link_is_built_on_another_host(
    make_security_app: AppFactory,
) -> None:
    """LIVERSCAN_PUBLIC_HOSTS set: a request naming another Host is refused (400 bad_host) before
    any view runs, so no status_url or upload URL points at the forger's name; the public name
    gets links on it (any port); probes and scrapers reach /healthz, /readyz and /metrics by
    whatever name they use (a pod's address)."""
    open_client = make_security_app().test_client()  # the test client's own Host: localhost
    token = bearer(login(open_client, signup(open_client)["email"])["access_token"])
    client = make_security_app(public_hosts=f" {PUBLIC.upper()}:8443 , other.example").test_client()

    r = submit(client, token, extra_headers={"Host": FORGED_HOST})
    assert (r.status_code, r.get_json()["error"]["code"]) == (400, "bad_host")
    r = client.post("/api/v1/uploads", headers={**token, "Host": FORGED_HOST}, json={})
    assert (r.status_code, r.get_json()["error"]["code"]) == (400, "bad_host")

    r = submit(client, token, extra_headers={"Host": PUBLIC})
    assert r.status_code == 202
    assert r.get_json()["status_url"].startswith(f"http://{PUBLIC}/")
    r = submit(client, token, extra_headers={"Host": f"{PUBLIC}:8443"}, client_ref="2")
    assert r.get_json()["status_url"].startswith(f"http://{PUBLIC}:8443/")
    for path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(path, headers={"Host": "10.1.2.3:8000"}).status_code == 200, path


def test_signup_is_rate_limited(make_security_app: AppFactory) -> None:
    client = make_security_app(
        rate_limit_enabled=True, rate_limit_storage_url="memory://", rate_limit_signup="2/minute"
    ).test_client()
    signup(client)
    signup(client)
    r = client.post(
        "/api/v1/auth/signup",
        json={"email": "x@clinic.test", "password": PASSWORD, "name": "X", "organization": "O"},
    )
    assert r.status_code == 429
    assert r.get_json()["error"]["code"] == "rate_limited"
    assert int(r.headers["Retry-After"]) >= 1


def test_submit_is_rate_limited_per_user(make_security_app: AppFactory) -> None:
    client = make_security_app(
        rate_limit_enabled=True, rate_limit_storage_url="memory://", rate_limit_submit="2/minute"
    ).test_client()
    alice = bearer(login(client, signup(client)["email"])["access_token"])
    bob = bearer(login(client, signup(client)["email"])["access_token"])
    assert submit(client, alice).status_code == 202
    assert submit(client, alice, client_ref="2").status_code == 202
    r = submit(client, alice, client_ref="3")
    assert r.status_code == 429
    assert r.get_json()["error"]["code"] == "rate_limited"
    assert submit(client, bob).status_code == 202  # another user of the same address


def test_rate_limit_defaults(tmp_path: Path) -> None:
    embedded = Settings(env="development", data_dir=tmp_path)
    assert embedded.rate_limits_on
    assert embedded.rate_limit_storage == "memory://"
    production_like = Settings(
        env="development", data_dir=tmp_path, broker_url="redis://redis:6379/0"
    )
    assert production_like.rate_limit_storage == "redis://redis:6379/0"
    assert not Settings(env="test", data_dir=tmp_path).rate_limits_on


def test_repeated_failed_logins_lock_the_account_even_for_the_right_password(
    make_security_app: AppFactory, session: Session
) -> None:
    client = make_security_app(login_max_failures=3, login_lockout_s=600).test_client()
    email = signup(client)["email"]
    for _ in range(3):
        status, body, _ = _login(client, email, "wrong-password-1")
        assert (status, body["error"]["code"]) == (401, "invalid_credentials")
    status, body, retry_after = _login(client, email)
    assert (status, body["error"]["code"]) == (423, "account_locked")
    assert 590 <= int(retry_after) <= 600
    failed = session.scalars(select(AuditEvent).where(AuditEvent.action == "login.failed")).all()
    assert len(failed) == 3
    assert {e.detail["email"] for e in failed} == {email}


def test_unknown_emails_lock_the_same_way(make_security_app: AppFactory) -> None:
    """A lockout does not reveal whether an account exists."""
    client = make_security_app(login_max_failures=2).test_client()
    ghost = f"nobody-{uuid.uuid4().hex[:8]}@clinic.test"
    assert [_login(client, ghost, "wrong-password-1")[0] for _ in range(3)] == [401, 401, 423]


def test_a_successful_login_resets_the_failure_count(make_security_app: AppFactory) -> None:
    client = make_security_app(login_max_failures=3).test_client()
    email = signup(client)["email"]
    for _ in range(2):
        assert _login(client, email, "wrong-password-1")[0] == 401
    assert _login(client, email)[0] == 200
    for _ in range(2):
        assert _login(client, email, "wrong-password-1")[0] == 401
    assert _login(client, email)[0] == 200


def _web_login(
    client: FlaskClient, email: str, password: str, address: str = "127.0.0.1"
) -> tuple[int, str, str]:
    """Sign in through the web form (with its CSRF token) from `address`; status, page text,
    Retry-After."""
    token = form_token(client, "/login")
    r = client.post(
        "/login",
        data={"email": email, "password": password, "csrf_token": token},
        environ_base={"REMOTE_ADDR": address},
    )
    return r.status_code, r.get_data(as_text=True), r.headers.get("Retry-After", "")


def test_web_and_api_logins_share_one_lockout(
    make_security_app: AppFactory, session: Session
) -> None:
    """Failures on the web form count like API failures: neither door is a side door."""
    client = make_security_app(login_max_failures=3, login_lockout_s=600).test_client()
    email = signup(client)["email"]
    assert _web_login(client, email, "wrong-password-1")[0] == 401
    assert _login(client, email, "wrong-password-1")[0] == 401
    assert _web_login(client, email, "wrong-password-1")[0] == 401
    status, body, retry_after = _login(client, email)  # the right password, on the API
    assert (status, body["error"]["code"]) == (423, "account_locked")
    status, text, web_retry_after = _web_login(client, email, PASSWORD)  # and on the web form
    assert status == 423 and "Too many failed sign-ins. Try again in 10 minutes." in text
    assert 590 <= int(web_retry_after) <= 600 and 590 <= int(retry_after) <= 600
    failed = session.scalars(select(AuditEvent).where(AuditEvent.action == "login.failed")).all()
    assert [e.detail["failures"] for e in failed] == [1, 2, 3]


def test_web_failures_alone_lock_the_api_login(make_security_app: AppFactory) -> None:
    client = make_security_app(login_max_failures=2).test_client()
    email = signup(client)["email"]
    for _ in range(2):
        assert _web_login(client, email, "wrong-password-1")[0] == 401
    assert _login(client, email)[0] == 423


def test_web_and_api_logins_share_the_familiar_addresses(make_security_app: AppFactory) -> None:
    """A web sign-in makes its address familiar to the API login too, and failures on either door
    from that address lock it on both; an attacker elsewhere locks neither door there."""
    app = make_security_app(login_max_failures=2, login_lockout_s=600)
    api, clinic, attacker = app.test_client(), "198.51.100.10", "203.0.113.66"
    email = signup(api)["email"]

    def web(password: str, address: str) -> int:  # each sign-in from a fresh browser
        return _web_login(app.test_client(), email, password, address)[0]

    def api_login(password: str, address: str) -> tuple[int, str]:
        r = api.post(
            "/api/v1/auth/login",
            json={"email": email, "password": password},
            environ_base={"REMOTE_ADDR": address},
        )
        return r.status_code, r.get_json().get("error", {}).get("code", "")

    assert web(PASSWORD, clinic) == 302
    assert [api_login("wrong-password-1", attacker)[0] for _ in range(2)] == [401, 401]
    assert web(PASSWORD, attacker) == 423
    assert web(PASSWORD, clinic) == 302
    assert api_login(PASSWORD, clinic)[0] == 200
    assert [web("wrong-password-1", clinic) for _ in range(2)] == [401, 401]
    assert api_login(PASSWORD, clinic) == (423, "account_locked")


def test_security_headers_on_api_and_pages(make_security_app: AppFactory) -> None:
    client = make_security_app().test_client()
    for path in ("/api/v1/jobs", "/login", "/healthz"):
        headers = client.get(path).headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
        csp = headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert "Strict-Transport-Security" not in headers  # not behind TLS
    assert client.get("/login").headers["Content-Security-Policy"] == CSP
    tls = make_security_app(hsts=True).test_client()
    assert tls.get("/healthz").headers["Strict-Transport-Security"].startswith("max-age=")
    cookies_secure = make_security_app(jwt_cookie_secure=True).test_client()
    assert "Strict-Transport-Security" in cookies_secure.get("/healthz").headers


def test_an_uploaded_file_is_never_served_as_something_a_browser_would_run(
    client: FlaskClient, user_headers_a: dict[str, str]
) -> None:
    # Bytes that start like a PNG but carry HTML: served as image/png, nosniff, sandboxed.
    data = b"\x89PNG\r\n\x1a\n<html><script>alert(1)</script></html>"
    r = submit(client, user_headers_a, data, filename="x.html")
    assert r.status_code == 202, r.get_json()
    art = client.get(f"/api/v1/jobs/{r.get_json()['id']}/artifacts/input", headers=user_headers_a)
    assert art.status_code == 200
    assert art.mimetype in ("image/png", "application/octet-stream")
    assert art.headers["X-Content-Type-Options"] == "nosniff"
    assert "sandbox" in art.headers["Content-Security-Policy"]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_tokens_with_another_algorithm_are_refused(
    client: FlaskClient, user_headers_a: dict[str, str]
) -> None:
    token = user_headers_a["Authorization"].split()[1]
    claims = jwt.decode(token, options={"verify_signature": False})
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = base64.urlsafe_b64encode(json.dumps(claims).encode())
    unsigned = f"{header.rstrip(b'=').decode()}.{body.rstrip(b'=').decode()}."
    secret = client.application.config["JWT_SECRET_KEY"]
    hs512 = jwt.encode(claims, secret, algorithm="HS512")
    for forged in (unsigned, hs512):
        r = client.get("/api/v1/jobs", headers=bearer(forged))
        assert r.status_code == 401
        assert r.get_json()["error"]["code"] == "invalid_token"
    assert client.get("/api/v1/jobs", headers=user_headers_a).status_code == 200


def test_cors_is_closed_by_default_and_open_only_to_listed_origins(
    make_security_app: AppFactory,
) -> None:
    closed = make_security_app().test_client()
    r = closed.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    open_ = make_security_app(cors_origins=["https://pacs.example.org"]).test_client()
    r = open_.get("/healthz", headers={"Origin": "https://pacs.example.org"})
    assert r.headers["Access-Control-Allow-Origin"] == "https://pacs.example.org"
    r = open_.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers


def test_audit_trail_records_login_submit_view_and_rotate_secret(
    client: FlaskClient, session: Session
) -> None:
    user = signup(client)
    headers = bearer(login(client, user["email"])["access_token"])
    job_id = submit(client, headers).get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}", headers=headers).status_code == 200
    assert client.post("/api/v1/org/webhook-secret", headers=headers).status_code == 200
    events = session.scalars(
        select(AuditEvent).where(AuditEvent.user_id == uuid.UUID(user["id"]))
    ).all()
    actions = [e.action for e in events]
    for action in ("signup", "login", "job.submit", "job.view", "org.rotate_secret"):
        assert action in actions
    assert all(str(e.org_id) == user["organization"]["id"] for e in events)
