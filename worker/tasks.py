"""Thin Celery entry points: each takes ids, is safe to run twice, and is one call into the worker."""

from __future__ import annotations

import uuid

from worker import pipeline, reports, webhooks
from worker import sweep as sweeper
from worker.celery_app import celery_app
from worker.context import get_context


@celery_app.task(name="liverscan.process_job", acks_late=True)
def process_job(job_id: str) -> None:
    """Drive one job through validation, classification and explanation."""
    pipeline.run(job_id)


@celery_app.task(name="liverscan.deliver_webhook", acks_late=True)
def deliver_webhook(delivery_id: str) -> None:
    """Make one signed delivery attempt of a job event."""
    webhooks.deliver(delivery_id)


@celery_app.task(name="liverscan.render_report", acks_late=True)
def render_report(job_id: str) -> None:
    """Render a succeeded job's PDF (and DICOM outputs) on first request."""
    reports.render_stored(get_context(), uuid.UUID(job_id))


@celery_app.task(name="liverscan.sweep", acks_late=True)
def sweep() -> None:
    """Re-enqueue jobs and webhook attempts left behind past the deadline."""
    sweeper.run()
