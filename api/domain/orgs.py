"""Organization services: the webhook secret."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from api.domain import audit, secrets
from api.domain.errors import NotFound
from api.domain.models import Organization
from api.domain.settings import Settings
from api.domain.webhooks import new_secret


def get_or_raise(session: Session, org_id: uuid.UUID) -> Organization:
    """The organization with this id, else NotFound."""
    org = session.get(Organization, org_id)
    if org is None:
        raise NotFound("No such organization.")
    return org


def webhook_secret(session: Session, settings: Settings, org_id: uuid.UUID) -> str:
    """The organization's webhook signing secret in plaintext (stored encrypted)."""
    return secrets.unseal(settings, get_or_raise(session, org_id).webhook_secret)


def rotate_webhook_secret(
    session: Session, settings: Settings, org_id: uuid.UUID, *, user_id: uuid.UUID | None
) -> str:
    """Replace the organization's webhook secret; deliveries signed afterwards use the new one.
    Returns it in plaintext (it is stored encrypted)."""
    org = get_or_raise(session, org_id)
    secret = new_secret()
    org.webhook_secret = secrets.seal(settings, secret)
    audit.record(session, "org.rotate_secret", org_id=org_id, user_id=user_id)
    session.flush()
    return secret
