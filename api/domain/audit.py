"""The audit trail: who did what to which job, and when."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy.orm import Session

from api.domain.models import AuditEvent


def record(
    session: Session,
    action: str,
    *,
    org_id: uuid.UUID | None,
    user_id: uuid.UUID | None,
    job_id: uuid.UUID | None = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent:
    """Add one audit event (e.g. "signup", "login", "job.submit", "job.view", "org.rotate_secret")."""
    event = AuditEvent(org_id=org_id, user_id=user_id, action=action, job_id=job_id, detail=detail)
    session.add(event)
    session.flush()
    return event
