"""Organization services: the webhook secret."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from api.domain import audit
from api.domain.errors import NotFound
from api.domain.models import Organization
from api.domain.webhooks import new_secret


def get_or_raise(session: Session, org_id: uuid.UUID) -> Organization:
    """The organization with this id, else NotFound."""
    org = session.get(Organization, org_id)
    if org is None:
        raise NotFound("No such organization.")
    return org


def rotate_webhook_secret(
    session: Session, org_id: uuid.UUID, *, user_id: uuid.UUID | None
) -> Organization:
    """Replace the organization's webhook secret; deliveries signed afterwards use the new one."""
    org = get_or_raise(session, org_id)
    org.webhook_secret = new_secret()
    audit.record(session, "org.rotate_secret", org_id=org_id, user_id=user_id)
    session.flush()
    return org
