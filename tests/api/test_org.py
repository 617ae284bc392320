"""The organization's webhook secret: readable and rotatable by its admin only."""

from __future__ import annotations

import uuid

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.domain.models import AuditEvent, Role, User
from api.domain.webhooks import sign, verify
from tests.api.conftest import PASSWORD, bearer, login, signup


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


def test_clinician_cannot_read_or_rotate(client: FlaskClient, session: Session) -> None:
    admin = signup(client)
    admin_row = session.get(User, uuid.UUID(admin["id"]))
    assert admin_row is not None
    clinician = User(
        org_id=admin_row.org_id,
        email=f"nurse-{uuid.uuid4().hex[:6]}@clinic.test",
        name="Nurse",
        password_hash=admin_row.password_hash,  # same password, for the test's convenience
        role=Role.CLINICIAN,
    )
    session.add(clinician)
    session.commit()
    headers = bearer(login(client, clinician.email, PASSWORD)["access_token"])
    for method in (client.get, client.post):
        r = method("/api/v1/org/webhook-secret", headers=headers)
        assert r.status_code == 403
        assert r.get_json()["error"]["code"] == "forbidden"


def test_organizations_have_distinct_secrets(client: FlaskClient) -> None:
    secrets = set()
    for _ in range(2):
        headers = bearer(login(client, signup(client)["email"])["access_token"])
        secrets.add(
            client.get("/api/v1/org/webhook-secret", headers=headers).get_json()["webhook_secret"]
        )
    assert len(secrets) == 2
