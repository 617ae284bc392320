"""The sweep: re-drive jobs and webhook attempts whose queue message was lost or whose worker died."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.domain import accounts, batches, jobs, retention, secrets, uploads
from api.domain.db import session_scope
from api.domain.errors import LiverscanError
from api.domain.models import JobStatus, WebhookDelivery, utcnow
from api.domain.queue import INFERENCE_QUEUE, PROCESS_JOB
from worker import metrics, webhooks
from worker.context import WorkerContext, get_context

log = logging.getLogger(__name__)

BATCH = 500
T = TypeVar("T")


def _step(ctx: WorkerContext, what: str, work: Callable[[Session], T], skipped: T) -> T:
    """``work`` in one transaction; ``skipped`` (logged) when the store or database is down."""
    try:
        with session_scope(ctx.sessions) as session:
            return work(session)
    except LiverscanError as exc:
        log.warning("sweep: %s skipped: %s", what, exc.code)
        return skipped


def run(*, context: WorkerContext | None = None) -> dict[str, int]:
    """Re-enqueue jobs processing past SWEEP_DEADLINE_S, jobs queued past it whose message is not
    waiting in the inference queue (lost), and overdue webhook attempts; delete the bytes of jobs
    past RETENTION_DAYS and retry the deletions the store failed; expire direct-to-store uploads
    never used, and delete the rows of swept ones UPLOAD_SLOT_RETENTION_DAYS past their deadline;
    seal batches whose request died; seal webhook secrets stored in plaintext or under a previous
    key; forget stale sign-in addresses and failed-login counts and the revocations of expired
    tokens."""
    ctx = context or get_context()
    deadline = timedelta(seconds=ctx.settings.sweep_deadline_s)
    now = utcnow()
    waiting: set[str] | None = None  # ids whose message still waits in the inference queue
    with session_scope(ctx.sessions) as session:
        job_ids = []
        stuck = jobs.stuck_jobs(session, deadline, limit=BATCH)
        if any(job.status is JobStatus.QUEUED for job in stuck):
            waiting = ctx.queue.waiting_args(INFERENCE_QUEUE, PROCESS_JOB)
        for job in stuck:
            # Back to queued with a fresh updated_at: not swept again before another deadline.
            # The attempts counter (bumped by each processing) bounds a job that kills workers.
            if job.status is JobStatus.PROCESSING:
                jobs.requeue(session, job.id)
            else:
                jobs.touch(session, job.id)
                if waiting is not None and str(job.id) in waiting:
                    # Still in line behind a backlog, not lost: another message would only be a
                    # duplicate (and inflate the queue length the autoscaler reads).
                    continue
            job_ids.append(job.id)
        overdue = session.scalars(
            select(WebhookDelivery)
            .where(
                WebhookDelivery.status.in_([webhooks.PENDING, webhooks.SENDING]),
                WebhookDelivery.next_attempt_at < now - deadline,
            )
            .limit(BATCH)
        ).all()
        delivery_ids = []
        for row in overdue:
            # "sending" this long means the worker died mid-attempt: the receiver may see the
            # delivery twice and must dedupe on X-Liverscan-Delivery (the contract allows it).
            row.status, row.next_attempt_at = webhooks.PENDING, now
            delivery_ids.append(row.id)
    for job_id in job_ids:
        try:
            ctx.queue.enqueue(PROCESS_JOB, str(job_id), queue=INFERENCE_QUEUE)
        except Exception:
            log.warning("sweep: could not re-enqueue job %s; next sweep retries", job_id)
    for row_id in delivery_ids:
        webhooks.enqueue(ctx, row_id)
    # Each housekeeping step in its own transaction; a store or database outage skips it (logged)
    # and the next sweep retries.
    if ctx.settings.retention_days > 0:
        _step(
            ctx,
            "retention",
            lambda s: retention.apply_retention(s, ctx.storage, ctx.settings.retention_days),
            None,
        )
    # Objects the store failed to delete (an outage during a DELETE, the retention step above, or
    # a submit's cleanup): retried until they are gone, and counted where operators look.
    pending = _step(
        ctx,
        "retrying store deletions",
        lambda s: retention.retry_deletions(s, ctx.storage),
        None,
    )
    if pending is not None:
        metrics.DELETIONS_PENDING.set(pending)
    if pending:
        log.warning("sweep: %d store objects still to delete (the store failed to)", pending)
    # Direct-to-store uploads never turned into a job: expire them, delete their bytes.
    expired_uploads = _step(
        ctx, "expiring uploads", lambda s: uploads.expire_stale(s, ctx.storage), 0
    )
    # Their rows once swept and UPLOAD_SLOT_RETENTION_DAYS past their deadline: until then a retry
    # of the request that made a job from one replays it.
    days = ctx.settings.upload_slot_retention_days
    pruned_uploads = _step(ctx, "deleting swept uploads", lambda s: uploads.prune_swept(s, days), 0)
    if pruned_uploads:
        log.info(
            "sweep deleted %d upload slots (swept, over %d days past their deadline)",
            pruned_uploads,
            days,
        )
    # A batch whose submitting request died is never sealed by it: seal it here, so it can
    # complete and its batch.completed webhook fires.
    sealed: list[uuid.UUID] = _step(
        ctx,
        "sealing stale batches",
        lambda s: batches.seal_stale(s, older_than_s=ctx.settings.sweep_deadline_s),
        [],
    )
    for batch_delivery in sealed:
        batches.enqueue_delivery(ctx.queue, batch_delivery)
    # Webhook secrets stored in plaintext (before migration 0005, or by an old process during a
    # rolling upgrade) or under a previous key: seal them under the current one.
    resealed = _step(
        ctx,
        "sealing webhook secrets",
        lambda s: secrets.reseal_webhook_secrets(s, ctx.settings),
        0,
    )
    if resealed:
        log.info("sweep sealed %d webhook secrets under the current key", resealed)
    # Sign-in addresses unused for LOGIN_FAMILIAR_DAYS are no longer familiar: forget them (a
    # running lock of their own stays until it ends).
    _step(
        ctx,
        "forgetting stale sign-in addresses",
        lambda s: accounts.forget_stale_addresses(s, ctx.settings),
        0,
    )
    # A revoked token past its own expiry is refused as expired anyway: its revocation can go.
    purged = _step(ctx, "purging expired token revocations", accounts.purge_expired_revocations, 0)
    # Failed-login counts (one per email ever tried, known or not) quiet for long: forget them.
    # Running locks, and locks ended too recently to forget how often they doubled, stay.
    forgotten = _step(
        ctx,
        "forgetting stale failed-login counts",
        lambda s: accounts.forget_stale_throttles(s, ctx.settings),
        0,
    )
    if purged or forgotten:
        log.info(
            "sweep deleted %d expired token revocations and %d stale failed-login counts",
            purged,
            forgotten,
        )
    if job_ids or delivery_ids:
        log.info("sweep re-drove %d jobs and %d webhook attempts", len(job_ids), len(delivery_ids))
    return {
        "jobs": len(job_ids),
        "webhooks": len(delivery_ids),
        "uploads": expired_uploads,
        "uploads_pruned": pruned_uploads,
        "secrets": resealed,
        "deletions_pending": pending or 0,
    }
