"""Every route of the app × every kind of caller, with the status each must get. Routes are read
from `app.url_map`, so a new route is covered by the general rules below until it gets its own row;
org B never learns that org A's ids exist (404, never 403)."""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.routing import Rule

from tests.api.conftest import png_bytes
from tests.security.conftest import World

PRINCIPALS = (
    "anonymous",
    "clinician_a",
    "admin_a",
    "operator_a",
    "user_b",
    "revoked",
    "expired",
)
NO_TOKEN = {"anonymous": 401, "revoked": 401, "expired": 401}
ERROR_CODES = {"anonymous": "missing_token", "revoked": "token_revoked", "expired": "token_expired"}


def members(clinician: int, admin: int, operator: int, user_b: int) -> dict[str, int]:
    """The expected statuses of a token-protected route for the four valid principals."""
    return {
        **NO_TOKEN,
        "clinician_a": clinician,
        "admin_a": admin,
        "operator_a": operator,
        "user_b": user_b,
    }


def everyone(status: int) -> dict[str, int]:
    """A public route: the same status whoever calls (a bad token is ignored, not an error)."""
    return dict.fromkeys(PRINCIPALS, status)


@dataclass
class Case:
    """One route: how to call it and what each principal gets."""

    method: str
    path: str  # with {job} for org A's job, {batch} for a batch id
    expected: dict[str, int]
    json: dict[str, Any] | None = None
    upload: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


# The API. 404 for user_b wherever the path names one of org A's jobs.
CASES: dict[tuple[str, str], Case] = {
    ("POST", "auth.signup"): Case("POST", "/api/v1/auth/signup", everyone(422), json={}),
    ("POST", "auth.login"): Case("POST", "/api/v1/auth/login", everyone(422), json={}),
    # An access token where a refresh token is needed is refused like no token.
    ("POST", "auth.refresh"): Case("POST", "/api/v1/auth/refresh", members(401, 401, 401, 401)),
    ("POST", "auth.logout"): Case("POST", "/api/v1/auth/logout", members(200, 200, 200, 200)),
    ("POST", "jobs.submit_job"): Case(
        "POST", "/api/v1/jobs", members(202, 202, 403, 202), upload=True
    ),
    ("GET", "jobs.list_jobs"): Case("GET", "/api/v1/jobs", members(200, 200, 403, 200)),
    ("GET", "jobs.get_job"): Case("GET", "/api/v1/jobs/{job}", members(200, 200, 403, 404)),
    ("GET", "jobs.artifact"): Case(
        "GET", "/api/v1/jobs/{job}/artifacts/input", members(200, 200, 403, 404)
    ),
    ("DELETE", "jobs.delete_job"): Case(
        "DELETE", "/api/v1/jobs/{job}", members(403, 200, 403, 404)
    ),
    ("GET", "org.get_webhook_secret"): Case(
        "GET", "/api/v1/org/webhook-secret", members(403, 200, 403, 200)
    ),
    ("POST", "org.rotate_webhook_secret"): Case(
        "POST", "/api/v1/org/webhook-secret", members(403, 200, 403, 200)
    ),
    ("POST", "org.add_member"): Case(
        "POST", "/api/v1/org/users", members(403, 422, 403, 422), json={}
    ),
    ("GET", "ops.healthz"): Case("GET", "/healthz", everyone(200)),
    ("GET", "ops.readyz"): Case("GET", "/readyz", everyone(200)),
    # Aggregate counts for the Prometheus scraper (network-restricted in infra/), no org data.
    ("GET", "ops.metrics"): Case("GET", "/metrics", everyone(200)),
    ("GET", "openapi.openapi_json"): Case("GET", "/api/v1/openapi.json", everyone(200)),
    ("GET", "openapi.docs"): Case("GET", "/api/v1/docs", everyone(200)),
    ("POST", "batches.submit_batch"): Case(
        "POST", "/api/v1/batches", members(202, 202, 403, 202), upload=True
    ),
    ("GET", "batches.get_batch"): Case(
        "GET", "/api/v1/batches/{batch}", members(404, 404, 403, 404)
    ),
    ("GET", "batches.results_csv"): Case(
        "GET", "/api/v1/batches/{batch}/results.csv", members(404, 404, 403, 404)
    ),
}


def _rules(app: Flask) -> list[tuple[str, Rule]]:
    return [
        (method, rule)
        for rule in app.url_map.iter_rules()
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"})
        if rule.endpoint not in ("static", "web.static")
    ]


def _call(
    client: FlaskClient, world: World, case: Case, principal: str, batch_id: str
) -> tuple[int, Any]:
    path = case.path.replace("{job}", world.job_id).replace("{batch}", batch_id)
    kwargs: dict[str, Any] = {"headers": world.headers(principal)}
    if case.json is not None:
        kwargs["json"] = case.json
    if case.upload:
        kwargs["data"] = {"file": (io.BytesIO(png_bytes(seed=7)), "slice.png", "image/png")}
        kwargs["content_type"] = "multipart/form-data"
    response = client.open(path, method=case.method, **kwargs)
    body = response.get_json(silent=True)
    return response.status_code, body


def test_every_route_has_the_expected_status_for_every_principal(
    app: Flask, client: FlaskClient, world: World
) -> None:
    batch_id = str(uuid.uuid4())
    failures: list[str] = []
    seen: set[tuple[str, str]] = set()
    # DELETE last: it removes the job the other rows read.
    ordered = sorted(_rules(app), key=lambda mr: (mr[0] == "DELETE", mr[1].rule))
    for method, rule in ordered:
        key = (method, rule.endpoint)
        case = CASES.get(key)
        if case is None:
            failures.extend(_general_rules(client, world, method, rule))
            continue
        seen.add(key)
        for principal in PRINCIPALS:
            status, body = _call(client, world, case, principal, batch_id)
            want = case.expected[principal]
            if status != want:
                failures.append(f"{method} {rule.rule} as {principal}: {status} (want {want})")
            elif principal in ERROR_CODES and want == 401:
                code = (body or {}).get("error", {}).get("code")
                if code != ERROR_CODES[principal] and rule.endpoint != "auth.refresh":
                    failures.append(f"{method} {rule.rule} as {principal}: code {code}")
    assert not failures, "\n".join(failures)
    missing = set(CASES) - seen
    assert not missing, f"rows for routes that no longer exist: {missing}"


def _general_rules(client: FlaskClient, world: World, method: str, rule: Rule) -> list[str]:
    """A route without its own row: no 2xx without a valid token on routes that need one, never
    a 2xx or 403 for org B on a path holding org A's job, never a 5xx."""
    failures: list[str] = []
    path = rule.rule
    for name in rule.arguments:
        value = world.job_id if name == "job_id" else "x"
        path = path.replace(f"<{name}>", value).replace(f"<path:{name}>", value)
        path = path.replace(f"<int:{name}>", "1")
    for principal in PRINCIPALS:
        response = client.open(path, method=method, headers=world.headers(principal))
        status = response.status_code
        if status >= 500:
            failures.append(f"{method} {path} as {principal}: {status}")
        if "job_id" in rule.arguments and principal in ("user_b", *NO_TOKEN):
            if 200 <= status < 300 or (principal == "user_b" and status == 403):
                failures.append(f"{method} {path} as {principal}: {status} leaks org A's job")
    return failures


def test_org_b_lists_none_of_org_a_jobs(client: FlaskClient, world: World) -> None:
    r = client.get("/api/v1/jobs", headers=world.headers("user_b"))
    ids = {item["id"] for item in r.get_json()["items"]}
    assert world.job_id not in ids
    assert world.job_b_id in ids


def test_org_b_gets_the_same_404_for_org_a_job_as_for_a_random_id(
    client: FlaskClient, world: World
) -> None:
    headers = world.headers("user_b")
    real = client.get(f"/api/v1/jobs/{world.job_id}", headers=headers)
    random = client.get(f"/api/v1/jobs/{uuid.uuid4()}", headers=headers)
    assert real.status_code == random.status_code == 404
    assert real.get_json()["error"]["code"] == random.get_json()["error"]["code"] == "job_not_found"


def test_operator_is_refused_scans_with_the_forbidden_code(
    client: FlaskClient, world: World
) -> None:
    r = client.get(
        f"/api/v1/jobs/{world.job_id}/artifacts/input", headers=world.headers("operator_a")
    )
    assert r.status_code == 403
    assert r.get_json()["error"]["code"] == "forbidden"
    assert client.get("/metrics", headers=world.headers("operator_a")).status_code == 200
