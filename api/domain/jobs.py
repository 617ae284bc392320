"""Job services and the job state machine (session first, flush only; the caller commits).

queued → processing → succeeded | rejected | failed; processing may go back to queued on
redelivery or by the sweep. Terminal states are final and every mark_* is idempotent: marking
a terminal job again (same or other terminal state) leaves it unchanged.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from api.domain.errors import BadRequest, InvalidTransition, JobNotFound
from api.domain.models import TERMINAL_STATUSES, Job, JobStatus, utcnow
from api.domain.retention import JobDeletion
from api.domain.storage import StoredObject

log = logging.getLogger(__name__)

MAX_PAGE = 200


def create_job(
    session: Session,
    *,
    org_id: uuid.UUID,
    upload: StoredObject,
    user_id: uuid.UUID | None = None,
    job_id: uuid.UUID | None = None,
    filename: str | None = None,
    callback_url: str | None = None,
    client_ref: str | None = None,
    idempotency_key: str | None = None,
    batch_id: uuid.UUID | None = None,
) -> Job:
    """Create a queued job for an upload that is already in the store."""
    job = Job(
        id=job_id or uuid.uuid4(),
        org_id=org_id,
        user_id=user_id,
        batch_id=batch_id,
        status=JobStatus.QUEUED,
        input_key=upload.key,
        input_sha256=upload.sha256,
        input_size=upload.size,
        input_content_type=upload.content_type,
        input_filename=filename,
        callback_url=callback_url,
        client_ref=client_ref,
        idempotency_key=idempotency_key,
    )
    session.add(job)
    session.flush()
    return job


def get(session: Session, job_id: uuid.UUID, *, org_id: uuid.UUID | None = None) -> Job | None:
    """The job with this id (restricted to `org_id` when given), or None."""
    job = session.get(Job, job_id)
    if job is None or (org_id is not None and job.org_id != org_id):
        return None
    return job


def get_or_raise(session: Session, job_id: uuid.UUID, *, org_id: uuid.UUID | None = None) -> Job:
    """The job with this id in `org_id`, else JobNotFound (another org's job is not found)."""
    job = get(session, job_id, org_id=org_id)
    if job is None:
        raise JobNotFound(details={"id": str(job_id)})
    return job


def find_by_idempotency_key(session: Session, *, org_id: uuid.UUID, key: str) -> Job | None:
    """The job this organization created with `Idempotency-Key: key`, or None."""
    return session.scalars(
        select(Job).where(Job.org_id == org_id, Job.idempotency_key == key)
    ).one_or_none()


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|", 1)
        return datetime.fromisoformat(created), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequest("The cursor is invalid.", details={"field": "cursor"}) from exc


def list_for_org(
    session: Session,
    org_id: uuid.UUID,
    *,
    status: JobStatus | None = None,
    limit: int = 50,
    cursor: str | None = None,
    batch_id: uuid.UUID | None = None,
) -> tuple[list[Job], str | None]:
    """One page of the organization's jobs, newest first, and the cursor of the next page.

    Deleted jobs (their bytes removed by an admin or by retention) are left out: their rows still
    hold the result, and listing it would leak what `GET /jobs/<id>` answers 410 for."""
    limit = max(1, min(limit, MAX_PAGE))
    query = (
        select(Job)
        .outerjoin(JobDeletion, JobDeletion.job_id == Job.id)
        .where(Job.org_id == org_id, JobDeletion.job_id.is_(None))
    )
    if status is not None:
        query = query.where(Job.status == status)
    if batch_id is not None:
        query = query.where(Job.batch_id == batch_id)
    if cursor:
        created, last_id = _decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    rows = list(session.scalars(query))
    next_cursor = _encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def lock(session: Session, job_id: uuid.UUID) -> Job | None:
    """The job read afresh and locked until this transaction ends, or None if it does not exist.

    A row lock on PostgreSQL, so two deliveries of the same id serialise (SQLite serialises
    writers anyway). Pass the result as `locked=` to the marks below in the same transaction and
    they use it instead of reading the row again.
    """
    return session.get(Job, job_id, with_for_update=True, populate_existing=True)


def _load_for_update(session: Session, job_id: uuid.UUID, locked: Job | None = None) -> Job:
    if locked is not None and locked.id == job_id:
        return locked
    job = lock(session, job_id)
    if job is None:
        raise JobNotFound(details={"id": str(job_id)})
    return job


def mark_processing(session: Session, job_id: uuid.UUID, *, locked: Job | None = None) -> Job:
    """Move a queued (or redelivered processing) job to processing; a terminal job is returned unchanged.

    `locked`: this job as `lock` returned it in the same transaction (saves reading it again).
    """
    job = _load_for_update(session, job_id, locked)
    if job.status in TERMINAL_STATUSES:
        log.info("job %s already %s; not processing again", job_id, job.status.value)
        return job
    now = utcnow()
    job.status = JobStatus.PROCESSING
    job.started_at = job.started_at or now
    job.attempts = (job.attempts or 0) + 1
    job.updated_at = now
    session.flush()
    return job


def requeue(session: Session, job_id: uuid.UUID, *, attempts: int | None = None) -> Job:
    """Put a processing job back to queued (redelivery, sweep); terminal jobs are unchanged.

    `attempts`: set the delivery count too (a delivery that an outage stopped gives it back).
    """
    job = _load_for_update(session, job_id)
    if job.status in TERMINAL_STATUSES:
        return job
    job.status = JobStatus.QUEUED
    if attempts is not None:
        job.attempts = attempts
    job.updated_at = utcnow()
    session.flush()
    return job


def touch(session: Session, job_id: uuid.UUID) -> Job:
    """Refresh `updated_at` of a non-terminal job (the sweep measures staleness from it)."""
    job = _load_for_update(session, job_id)
    if job.status not in TERMINAL_STATUSES:
        job.updated_at = utcnow()
        session.flush()
    return job


def _finish(
    session: Session,
    job_id: uuid.UUID,
    target: JobStatus,
    fields: dict[str, Any],
    locked: Job | None = None,
) -> Job:
    job = _load_for_update(session, job_id, locked)
    if job.status in TERMINAL_STATUSES:
        if job.status != target:
            log.warning("job %s is %s; ignoring mark %s", job_id, job.status.value, target.value)
        return job
    if target is JobStatus.SUCCEEDED and job.status is not JobStatus.PROCESSING:
        raise InvalidTransition(details={"from": job.status.value, "to": target.value})
    now = utcnow()
    for name, value in fields.items():
        if value is not None:
            setattr(job, name, value)
    job.status = target
    job.finished_at = now
    job.started_at = job.started_at or now
    job.updated_at = now
    session.flush()
    return job


def _input_fields(input_meta: dict[str, Any] | None) -> dict[str, Any]:
    meta = input_meta or {}
    return {
        "input_format": meta.get("format"),
        "input_width": meta.get("width"),
        "input_height": meta.get("height"),
        "input_modality": meta.get("modality"),
    }


def mark_succeeded(
    session: Session,
    job_id: uuid.UUID,
    *,
    label: str,
    probability: float,
    threshold: float,
    model_name: str,
    model_version: str,
    model_sha256: str,
    heatmap_key: str | None = None,
    overlay_key: str | None = None,
    report_key: str | None = None,
    validation: dict[str, Any] | None = None,
    input_meta: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    locked: Job | None = None,
) -> Job:
    """Record a classification result and finish the job as succeeded."""
    fields = {
        "label": label,
        "probability": float(probability),
        "threshold": float(threshold),
        "model_name": model_name,
        "model_version": model_version,
        "model_sha256": model_sha256,
        "heatmap_key": heatmap_key,
        "overlay_key": overlay_key,
        "report_key": report_key,
        "validation": validation,
        "timings": timings,
        **_input_fields(input_meta),
    }
    return _finish(session, job_id, JobStatus.SUCCEEDED, fields, locked)


def mark_rejected(
    session: Session,
    job_id: uuid.UUID,
    *,
    reason_code: str,
    validation: dict[str, Any],
    input_meta: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    locked: Job | None = None,
) -> Job:
    """Finish the job as rejected: the upload is not an acceptable liver slice."""
    fields = {
        "reason_code": reason_code,
        "validation": validation,
        "timings": timings,
        **_input_fields(input_meta),
    }
    return _finish(session, job_id, JobStatus.REJECTED, fields, locked)


def mark_failed(
    session: Session,
    job_id: uuid.UUID,
    *,
    error_code: str,
    error_message: str,
    validation: dict[str, Any] | None = None,
    locked: Job | None = None,
) -> Job:
    """Finish the job as failed with a machine-readable error code."""
    fields = {
        "error_code": error_code,
        "error_message": error_message[:2000],
        "validation": validation,
    }
    return _finish(session, job_id, JobStatus.FAILED, fields, locked)


def set_report_key(
    session: Session, job_id: uuid.UUID, report_key: str, *, locked: Job | None = None
) -> Job:
    """Attach a report to a job (reports may be rendered after the job finished)."""
    job = _load_for_update(session, job_id, locked)
    job.report_key = report_key
    session.flush()
    return job


def stuck_jobs(
    session: Session, older_than: timedelta | datetime, *, limit: int = 500
) -> Sequence[Job]:
    """Jobs still queued or processing whose last update is older than `older_than`."""
    cutoff = older_than if isinstance(older_than, datetime) else utcnow() - older_than
    return session.scalars(
        select(Job)
        .where(Job.status.in_([JobStatus.QUEUED, JobStatus.PROCESSING]), Job.updated_at < cutoff)
        .order_by(Job.updated_at)
        .limit(limit)
    ).all()
