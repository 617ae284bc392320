"""Signup, login, refresh and logout as a clinic's system would use them."""

from __future__ import annotations

import uuid
from datetime import timedelta

from flask import Flask
from flask.testing import FlaskClient
from flask_jwt_extended import create_access_token
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.domain.models import AuditEvent, User
from tests.api.conftest import PASSWORD, bearer, login, signup


def test_first_user_of_an_organization_is_its_admin(client: FlaskClient) -> None:
    user = signup(client, "First@Clinic.test", organization="St Elsewhere")
    assert user["email"] == "first@clinic.test"
    assert user["role"] == "admin"
    assert user["organization"]["name"] == "St Elsewhere"


def test_password_is_stored_as_argon2_hash(client: FlaskClient, session: Session) -> None:
    user = signup(client)
    stored = session.scalars(select(User).where(User.email == user["email"])).one()
    assert stored.password_hash.startswith("$argon2id$")
    assert PASSWORD not in stored.password_hash


def test_login_returns_bearer_tokens(client: FlaskClient) -> None:
    user = signup(client)
    tokens = login(client, user["email"])
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 15 * 60
    assert tokens["access_token"] and tokens["refresh_token"]
    r = client.get("/api/v1/jobs", headers=bearer(tokens["access_token"]))
    assert r.status_code == 200


def test_refresh_gives_a_working_access_token(client: FlaskClient) -> None:
    tokens = login(client, signup(client)["email"])
    r = client.post("/api/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
    assert r.status_code == 200
    assert (
        client.get("/api/v1/jobs", headers=bearer(r.get_json()["access_token"])).status_code == 200
    )


def test_access_token_cannot_refresh(client: FlaskClient) -> None:
    tokens = login(client, signup(client)["email"])
    r = client.post("/api/v1/auth/refresh", headers=bearer(tokens["access_token"]))
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "invalid_token"


def test_logout_revokes_access_and_refresh_tokens(client: FlaskClient) -> None:
    tokens = login(client, signup(client)["email"])
    r = client.post(
        "/api/v1/auth/logout",
        headers=bearer(tokens["access_token"]),
        json={"refresh_token": tokens["refresh_token"]},
    )
    assert r.status_code == 200
    r = client.get("/api/v1/jobs", headers=bearer(tokens["access_token"]))
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "token_revoked"
    r = client.post("/api/v1/auth/refresh", headers=bearer(tokens["refresh_token"]))
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "token_revoked"


def test_expired_token_is_refused(app: Flask, client: FlaskClient) -> None:
    user = signup(client)
    with app.app_context():
        token = create_access_token(identity=user["id"], expires_delta=timedelta(seconds=-5))
    r = client.get("/api/v1/jobs", headers=bearer(token))
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "token_expired"


def test_missing_token_is_refused(client: FlaskClient) -> None:
    r = client.get("/api/v1/jobs")
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "missing_token"


def test_garbage_token_is_refused(client: FlaskClient) -> None:
    r = client.get("/api/v1/jobs", headers=bearer("not.a.jwt"))
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "invalid_token"


def test_wrong_password_and_unknown_email_look_the_same(client: FlaskClient) -> None:
    user = signup(client)
    wrong = client.post(
        "/api/v1/auth/login", json={"email": user["email"], "password": "nope-nope-1"}
    )
    unknown = client.post(
        "/api/v1/auth/login", json={"email": "ghost@clinic.test", "password": PASSWORD}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.get_json() == unknown.get_json()
    assert wrong.get_json()["error"]["code"] == "invalid_credentials"


def test_duplicate_email_is_409(client: FlaskClient) -> None:
    signup(client, "twice@clinic.test")
    r = client.post(
        "/api/v1/auth/signup",
        json={
            "email": "TWICE@clinic.test",
            "password": PASSWORD,
            "name": "B",
            "organization": "Other",
        },
    )
    assert r.status_code == 409
    assert r.get_json()["error"]["code"] == "email_taken"


def test_weak_passwords_are_422(client: FlaskClient) -> None:
    for password in ("short1", "onlyletterslong", "1234567890123"):
        r = client.post(
            "/api/v1/auth/signup",
            json={
                "email": "weak@clinic.test",
                "password": password,
                "name": "W",
                "organization": "O",
            },
        )
        assert r.status_code == 422, password
        assert r.get_json()["error"]["code"] == "weak_password"


def test_signup_missing_field_is_422(client: FlaskClient) -> None:
    r = client.post("/api/v1/auth/signup", json={"email": "x@clinic.test", "password": PASSWORD})
    assert r.status_code == 422
    body = r.get_json()["error"]
    assert body["code"] == "invalid_input"
    assert body["details"]["field"] == "name"


def test_cookie_login_requires_csrf_token_for_writes(app: Flask, client: FlaskClient) -> None:
    from flask_jwt_extended import set_access_cookies

    user = signup(client)
    with app.test_request_context():
        token = create_access_token(identity=user["id"])
        response = app.make_response("")
        set_access_cookies(response, token)
    cookies = response.headers.getlist("Set-Cookie")
    access_cookie = next(c for c in cookies if c.startswith("access_token_cookie="))
    assert "HttpOnly" in access_cookie and "SameSite=Lax" in access_cookie
    client.set_cookie("access_token_cookie", token)
    assert client.get("/api/v1/jobs").status_code == 200  # reads need no CSRF token
    r = client.post("/api/v1/org/webhook-secret")
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "csrf_failed"


def test_signup_and_login_are_audited(client: FlaskClient, session: Session) -> None:
    user = signup(client)
    login(client, user["email"])
    actions = session.scalars(
        select(AuditEvent.action).where(AuditEvent.user_id == uuid.UUID(user["id"]))
    ).all()
    assert sorted(actions) == ["login", "signup"]


def test_unsigned_token_is_refused(client: FlaskClient) -> None:
    import base64
    import json

    user = signup(client)

    def b64(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    forged = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': user['id'], 'type': 'access', 'jti': 'x', 'exp': 4102444800})}."
    r = client.get("/api/v1/jobs", headers=bearer(forged))
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "invalid_token"
