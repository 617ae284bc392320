"""The organization's webhook secret: readable and rotatable by its admin only."""

from __future__ import annotations

import uuid

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.domain import secrets
from api.domain.models import AuditEvent, Organization, User
from api.domain.webhooks import sign, verify
from api.resources import EXTENSION_KEY
from tests.api.conftest import PASSWORD, bearer, login, signup, submit


def test_admin_reads_and_rotates_the_secret(client: FlaskClient, session: Session) -> None:
    admin = signup(client)
    headers = bearer(login(client, admin["email"])["access_token"])
    first = client.get("/api/v1/org/webhook-secret", headers=headers).get_json()["webhook_secret"]
    rotated = client.post("/api/v1/org/webhook-secret", headers=headers).get_json()[
        "webhook_secret"
    ]
    assert first != rotated
    assert (
        client.get("/api/v1/org/webhook-secret", headers=headers).get_json()["webhook_secret"]
        == rotated
    )
    body = b'{"event": "job.succeeded"}'
    assert verify(rotated, body, sign(rotated, body))
    assert not verify(first, body, sign(rotated, body))
    assert session.scalars(
        select(AuditEvent).where(
            AuditEvent.action == "org.rotate_secret", AuditEvent.user_id == uuid.UUID(admin["id"])
        )
    ).one()


def test_the_secret_is_stored_encrypted(client: FlaskClient, session: Session) -> None:
    """A copy of the database does not give away the signing secret: the row holds a sealed
    form that only the configured key opens (signup and rotation both)."""
    admin = signup(client)
    headers = bearer(login(client, admin["email"])["access_token"])
    settings = client.application.extensions[EXTENSION_KEY].settings
    for step in ("signup", "rotate"):
        if step == "rotate":
            client.post("/api/v1/org/webhook-secret", headers=headers)
        plain = client.get("/api/v1/org/webhook-secret", headers=headers).get_json()[
            "webhook_secret"
        ]
        session.expire_all()
        user = session.get(User, uuid.UUID(admin["id"]))
        assert user is not None
        org = session.get(Organization, user.org_id)
        assert org is not None
        stored = org.webhook_secret
        assert stored.startswith(secrets.PREFIX) and plain.removeprefix("whsec_") not in stored
        assert secrets.unseal(settings, stored) == plain


def test_admin_adds_a_clinician_who_sees_the_org_jobs_but_not_the_secret(
    client: FlaskClient, session: Session
) -> None:
    admin = bearer(login(client, signup(client)["email"])["access_token"])
    r = client.post(
        "/api/v1/org/users",
        headers=admin,
        json={"email": "Nurse@Clinic.test", "password": PASSWORD, "name": "Nurse"},
    )
    assert r.status_code == 201
    member = r.get_json()["user"]
    assert member["role"] == "clinician" and member["email"] == "nurse@clinic.test"
    nurse = bearer(login(client, "nurse@clinic.test")["access_token"])
    job_id = submit(client, admin).get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}", headers=nurse).status_code == 200
    for method in (client.get, client.post):
        r = method("/api/v1/org/webhook-secret", headers=nurse)
        assert r.status_code == 403
        assert r.get_json()["error"]["code"] == "forbidden"
    r = client.post(
        "/api/v1/org/users",
        headers=nurse,
        json={"email": "x@clinic.test", "password": PASSWORD, "name": "X"},
    )
    assert r.status_code == 403
    assert session.scalars(select(AuditEvent).where(AuditEvent.action == "org.add_member")).one()


def test_add_member_bad_input(client: FlaskClient) -> None:
    admin = bearer(login(client, signup(client, "boss@clinic.test")["email"])["access_token"])
    cases = [
        ({"email": "boss@clinic.test", "password": PASSWORD, "name": "B"}, 409, "email_taken"),
        ({"email": "n@clinic.test", "password": "short", "name": "N"}, 422, "weak_password"),
        (
            {"email": "n@clinic.test", "password": PASSWORD, "name": "N", "role": "root"},
            422,
            "invalid_input",
        ),
    ]
    for body, status, code in cases:
        r = client.post("/api/v1/org/users", headers=admin, json=body)
        assert (r.status_code, r.get_json()["error"]["code"]) == (status, code)


def test_organizations_have_distinct_secrets(client: FlaskClient) -> None:
    secrets = set()
    for _ in range(2):
        headers = bearer(login(client, signup(client)["email"])["access_token"])
        secrets.add(
            client.get("/api/v1/org/webhook-secret", headers=headers).get_json()["webhook_secret"]
        )
    assert len(secrets) == 2
