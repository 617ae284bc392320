"""Helpers of the scale tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from api.domain.models import WebhookDelivery
from tests.worker.worker_support import load_job, make_job, make_org
from worker.context import WorkerContext

__all__ = ["load_job", "make_job", "make_org", "webhook_events"]


def webhook_events(ctx: WorkerContext, job_id: uuid.UUID) -> int:
    """How many terminal events were scheduled for a job (first attempts only)."""
    with ctx.sessions() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(WebhookDelivery)
                .where(WebhookDelivery.job_id == job_id, WebhookDelivery.attempt == 1)
            )
            or 0
        )
