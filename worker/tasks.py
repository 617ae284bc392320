"""Thin Celery entry points: each takes ids, is safe to run twice, and is one call into the worker."""

from __future__ import annotations

from worker import pipeline, webhooks
from worker import sweep as sweeper
from worker.celery_app import celery_app


@celery_app.task(name="liverscan.process_job", acks_late=True)
def process_job(job_id: str) -> None:
    """Drive one job through validation, classification and explanation."""
    pipeline.run(job_id)


@celery_app.task(name="liverscan.deliver_webhook", acks_late=True)
def deliver_webhook(delivery_id: str) -> None:
    """Make one signed delivery attempt of a job event."""
    webhooks.deliver(delivery_id)


@celery_app.task(name="liverscan.sweep", acks_late=True)
def sweep() -> None:
    """Re-enqueue jobs and webhook attempts left behind past the deadline."""
    sweeper.run()
