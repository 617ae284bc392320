"""Helpers of the scale tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import uuid

from sqlalchemy import func, select

from api.domain import jobs
from api.domain.models import Organization, WebhookDelivery
from api.domain.storage import job_key
from tests.worker.worker_support import load_job
from worker.context import WorkerContext

__all__ = ["load_job", "make_job", "make_org", "webhook_events"]


def make_org(ctx: WorkerContext) -> uuid.UUID:
    """A new organization; its id."""
    with ctx.sessions.begin() as session:
        org = Organization(name=f"clinic-{uuid.uuid4().hex[:6]}", webhook_secret="whsec_test")
        session.add(org)
        session.flush()
        return org.id


def make_job(
    ctx: WorkerContext, org_id: uuid.UUID, data: bytes, *, callback_url: str | None = None
) -> uuid.UUID:
    """A queued job of `org_id` whose upload `data` is in the store (no message enqueued)."""
    job_id = uuid.uuid4()
    upload = ctx.storage.put(job_key(org_id, job_id, "input"), data, "image/png")
    with ctx.sessions.begin() as session:
        jobs.create_job(
            session,
            org_id=org_id,
            upload=upload,
            job_id=job_id,
            filename="slice.png",
            callback_url=callback_url,
        )
    return job_id


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
