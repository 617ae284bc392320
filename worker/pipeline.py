"""Drive one job: bytes from the store → validate → classify + heatmap → artifacts → terminal state.

Jobs run side by side in one process (Celery's threads pool); each job's content-gate and model
calls join the process's micro-batches (worker/batching.py, model_cache.ModelRunner), so a batch
of N jobs costs one gate call and one classifier call; everything else stays per job.

Safe to run twice: a terminal job is left alone, so a redelivered message changes nothing and
schedules no second webhook. ml_core errors become the job's `error.code`; anything unexpected
(store or database hiccup, a bug) is retried a bounded number of times, then the job fails with
`internal_error` and a message without a stack trace. A store outage that outlasts those retries
is waited out instead: the job stays queued and the sweep re-drives it (OUTAGE_PATIENCE at most).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session

from api.domain import batches, jobs, retention
from api.domain.db import session_scope
from api.domain.errors import StorageUnavailable
from api.domain.models import Job, JobStatus, utcnow
from api.domain.queue import INFERENCE_QUEUE, PROCESS_JOB
from api.domain.storage import HEATMAP_NAME, OVERLAY_NAME, job_key
from ml_core.errors import MLCoreError
from ml_core.overlay import heatmap_and_overlay_png
from ml_core.validation import validate
from worker import metrics, model_cache, webhooks
from worker.context import WorkerContext, get_context
from worker.model_cache import BatchedGate

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # deliveries of one job that may end in an unexpected error (or a killed worker)
RETRY_BASE_S = 5.0
# A job whose store is still unreachable on its last delivery waits for the sweep instead of
# failing (its upload is safe, only out of reach), until it is this old.
OUTAGE_PATIENCE = timedelta(days=1)
DELETED = "job_deleted"  # error.code of a job deleted before it finished (GET answers 410 anyway)


def run(job_id: str | uuid.UUID, *, context: WorkerContext | None = None) -> JobStatus | None:
    """Process one job to a terminal state (or schedule a bounded retry); returns its status."""
    ctx = context or get_context()
    jid = uuid.UUID(str(job_id))
    metrics.utilisation.enter()
    try:
        return _run(ctx, jid)
    finally:
        metrics.utilisation.leave()


def _run(ctx: WorkerContext, jid: uuid.UUID) -> JobStatus | None:
    with session_scope(ctx.sessions) as session:
        job = jobs.lock(session, jid)  # read once, locked: a concurrent delivery waits here
        if job is None:
            log.warning("job %s does not exist; dropping the message", jid)
            return None
        if job.status.is_terminal:
            log.info("job %s is already %s; nothing to do", jid, job.status.value)
            return job.status
        gave_up = job.attempts >= MAX_ATTEMPTS
        if not gave_up:
            job = jobs.mark_processing(session, jid, locked=job)
        org_id, input_key, attempts = job.org_id, job.input_key, job.attempts
    if gave_up:
        # Earlier deliveries died without finishing (e.g. the worker was killed): stop here.
        return _finish(
            ctx,
            jid,
            lambda s, locked: jobs.mark_failed(
                s,
                jid,
                error_code="internal_error",
                error_message=f"The job could not be processed after {attempts} attempts.",
                locked=locked,
            ),
        )
    try:
        return _process(ctx, jid, org_id, input_key)
    except MLCoreError as exc:
        code, message = exc.code, exc.message
        log.info("job %s failed in ml_core: %s", jid, code)
        return _finish(
            ctx,
            jid,
            lambda s, locked: jobs.mark_failed(
                s, jid, error_code=code, error_message=message, locked=locked
            ),
        )
    except Exception as exc:
        if _deleted(ctx, jid):  # e.g. its upload is gone because an admin deleted the job
            log.info("job %s was deleted while queued or processing; not retried", jid)
            return _finish(ctx, jid, _mark_deleted)
        log.exception("job %s: unexpected error on attempt %d", jid, attempts)
        if attempts < MAX_ATTEMPTS:
            return _retry_later(ctx, jid, attempts)
        if isinstance(exc, StorageUnavailable) and _wait_out_outage(ctx, jid):
            return JobStatus.QUEUED
        return _finish(
            ctx,
            jid,
            lambda s, locked: jobs.mark_failed(
                s,
                jid,
                error_code="internal_error",
                error_message="An internal error stopped the processing of this job.",
                locked=locked,
            ),
        )


def _process(ctx: WorkerContext, jid: uuid.UUID, org_id: uuid.UUID, input_key: str) -> JobStatus:
    """Fetch, validate (content gate batched), classify (batched), store artifacts, finish.

    The PDF report is not rendered here: the first request for it renders it (worker/reports.py),
    which keeps ~0.2 s per job of PDF layout off the inference path.
    """
    runner = model_cache.get_runner(ctx.settings)
    timings: dict[str, float] = {}
    with runner.gate_batcher.reserve() as gate_place, runner.predict_batcher.reserve() as place:
        start = time.perf_counter()
        data = ctx.storage.get(input_key)
        timings["fetch_s"] = time.perf_counter() - start

        # No gate shipped with the artifact: ModelLoadError fails the job with its code.
        gate = BatchedGate(runner, gate_place) if runner.gate() is not None else None
        start = time.perf_counter()
        report = validate(data, gate=gate)
        gate_s = gate.seconds if gate is not None else 0.0
        timings["decode_s"] = time.perf_counter() - start - gate_s
        timings["validate_s"] = gate_s
        validation = report.to_dict()
        input_meta = _input_meta(report.image)

        prediction = None
        if report.passed and report.slice_u8 is not None:
            start = time.perf_counter()
            prediction = place.submit(report.slice_u8)
            timings["infer_s"] = time.perf_counter() - start
    # Out of both reservations from here: batch-mates no longer wait for this job.

    if prediction is None or report.slice_u8 is None:
        reason = report.reason_code or "validation_failed"
        log.info("job %s rejected: %s", jid, reason)
        return _finish(
            ctx,
            jid,
            lambda s, locked: jobs.mark_rejected(
                s,
                jid,
                reason_code=reason,
                validation=validation,
                input_meta=input_meta,
                timings=timings,
                locked=locked,
            ),
            timings,
        )

    start = time.perf_counter()
    heatmap_key = job_key(org_id, jid, HEATMAP_NAME)
    overlay_key = job_key(org_id, jid, OVERLAY_NAME)
    heatmap, overlay = heatmap_and_overlay_png(report.slice_u8, prediction.heatmap)
    timings["explain_s"] = time.perf_counter() - start
    start = time.perf_counter()
    ctx.storage.put(heatmap_key, heatmap, "image/png")
    ctx.storage.put(overlay_key, overlay, "image/png")
    timings["store_s"] = time.perf_counter() - start

    info = runner.classifier.info
    log.info("job %s succeeded: %s p=%.3f", jid, prediction.label, prediction.probability)
    return _finish(
        ctx,
        jid,
        lambda s, locked: jobs.mark_succeeded(
            s,
            jid,
            label=prediction.label,
            probability=prediction.probability,
            threshold=prediction.threshold,
            model_name=info.name,
            model_version=info.version,
            model_sha256=info.sha256,
            heatmap_key=heatmap_key,
            overlay_key=overlay_key,
            validation=validation,
            input_meta=input_meta,
            timings=timings,
            locked=locked,
        ),
        timings,
        stored=(heatmap_key, overlay_key),
    )


def _input_meta(image: Any) -> dict[str, Any] | None:
    if image is None:
        return None
    return {
        "format": image.format,
        "width": image.width,
        "height": image.height,
        "modality": image.modality if image.modality in ("CT", "MR") else None,
    }


def _finish(
    ctx: WorkerContext,
    jid: uuid.UUID,
    mark: Callable[[Session, Job | None], Job],
    timings: dict[str, float] | None = None,
    stored: tuple[str, ...] = (),
) -> JobStatus:
    """Apply a terminal mark and schedule its webhook in one transaction, then enqueue delivery.

    `mark(session, locked)` gets the job row as `jobs.lock` read it, so the row is read once
    (None if it is gone: the mark then raises JobNotFound, as before). A job deleted meanwhile
    (an admin's DELETE; the purge locks the same row, so one of the two sees the other) is not
    marked: the artifacts this run `stored` are deleted, the job fails as `job_deleted`, and no
    webhook tells anyone its result. Those artifacts are deleted too when a concurrent delivery
    finished the job first and the job was deleted since: nothing points at them any more.
    """
    start = time.perf_counter()
    with session_scope(ctx.sessions) as session:
        current = jobs.lock(session, jid)
        deleted = current is not None and retention.get_deletion(session, jid) is not None
        if deleted:  # what the store fails to delete now is left to the sweep
            retention.delete_or_defer(session, ctx.storage, list(stored), job_id=jid)
        if current is not None and current.status.is_terminal:
            # A concurrent delivery of the same job finished first: it owns the webhook.
            return current.status
        delivery_id = None
        if deleted:
            job = _mark_deleted(session, current)
        else:
            job = mark(session, current)
            delivery_id = webhooks.schedule(session, job, ctx)
        batch_delivery_id = batches.on_job_terminal(session, job.batch_id)  # batch.completed, once
        status = job.status
    for row_id in (delivery_id, batch_delivery_id):
        if row_id is not None:
            webhooks.enqueue(ctx, row_id)
    if timings is not None:  # the result row is part of the store stage
        timings["store_s"] = timings.get("store_s", 0.0) + time.perf_counter() - start
        metrics.observe_stages(timings)
    metrics.JOBS.labels(status.value).inc()
    return status


def _deleted(ctx: WorkerContext, jid: uuid.UUID) -> bool:
    """Whether an admin or the retention period deleted the job (its bytes are gone)."""
    try:
        with session_scope(ctx.sessions) as session:
            return retention.get_deletion(session, jid) is not None
    except Exception:  # the database is down: the retry path deals with it
        return False


def _mark_deleted(session: Session, locked: Job | None) -> Job:
    """Finish a job deleted before it finished as failed `job_deleted` (no result is recorded)."""
    assert locked is not None  # a deleted job keeps its row (audit)
    return jobs.mark_failed(
        session,
        locked.id,
        error_code=DELETED,
        error_message="The job was deleted before it finished; nothing was kept.",
        locked=locked,
    )


def _wait_out_outage(ctx: WorkerContext, jid: uuid.UUID) -> bool:
    """Leave a job whose store was unreachable on its last delivery queued, that delivery's
    attempt given back and no message sent: the sweep re-drives it once SWEEP_DEADLINE_S has
    passed, for as long as the outage lasts, unless the job is older than OUTAGE_PATIENCE.
    Whether it was left queued."""
    with session_scope(ctx.sessions) as session:
        job = jobs.lock(session, jid)
        if job is None or job.created_at < utcnow() - OUTAGE_PATIENCE:
            return False
        jobs.requeue(session, jid, attempts=MAX_ATTEMPTS - 1)
    log.warning("job %s: the store is still unreachable; the sweep will re-drive it", jid)
    return True


def _retry_later(ctx: WorkerContext, jid: uuid.UUID, attempts: int) -> JobStatus:
    """Put the job back to queued and re-enqueue it with backoff (the sweep covers a lost enqueue)."""
    with session_scope(ctx.sessions) as session:
        status = jobs.requeue(session, jid).status
    try:
        ctx.queue.enqueue(
            PROCESS_JOB,
            str(jid),
            queue=INFERENCE_QUEUE,
            countdown=RETRY_BASE_S * 2 ** (attempts - 1),
        )
    except Exception:
        log.warning("job %s: re-enqueue failed; the sweep will pick it up", jid)
    return status
