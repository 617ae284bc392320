"""Data retention: deleting a job's bytes from the store (an admin's request, or the retention
period) and marking the job as deleted (session first, flush only).

Deletion is durable: a key the store could not delete (an outage, a failing call) is recorded in
``pending_deletions`` in the same transaction as the mark, and the sweep retries it until it is
gone (``retry_deletions``), so a deleted job's medical data never lingers unrecorded.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from sqlalchemy import ForeignKey, Integer, String, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Mapped, Session, mapped_column

from api.domain import audit
from api.domain.errors import JobNotFound, ObjectNotFound, StorageUnavailable
from api.domain.models import TERMINAL_STATUSES, Base, Job, UTCDateTime, utcnow
from api.domain.storage import (
    DICOM_OVERLAY_NAME,
    DICOM_SR_NAME,
    HEATMAP_NAME,
    OVERLAY_NAME,
    REPORT_PDF_NAME,
    Storage,
    job_key,
)

log = logging.getLogger(__name__)

ADMIN, RETENTION = "admin", "retention"


class JobDeletion(Base):
    """The mark of a job whose upload and artifacts were removed from the store."""

    __tablename__ = "job_deletions"

    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    org_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("organizations.id"), index=True)
    deleted_by: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id"))
    reason: Mapped[str] = mapped_column(String(16))
    objects_deleted: Mapped[int] = mapped_column(Integer, default=0)
    deleted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PendingDeletion(Base):
    """A store key whose deletion failed: the sweep deletes it once the store answers."""

    __tablename__ = "pending_deletions"

    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id"))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    last_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    error: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def job_keys(job: Job) -> list[str]:
    """Every store key a job's row points at (upload, heatmap, overlay, report)."""
    keys = [job.input_key, job.heatmap_key, job.overlay_key, job.report_key]
    return [k for k in keys if k]


def unrecorded_keys(job: Job) -> list[str]:
    """Keys under which the worker may have stored objects of a job that its row does not point
    at: the DICOM outputs, and a heatmap, overlay or PDF stored by a run or render interrupted
    before it recorded them."""
    recorded = set(job_keys(job))
    names = (HEATMAP_NAME, OVERLAY_NAME, REPORT_PDF_NAME, DICOM_OVERLAY_NAME, DICOM_SR_NAME)
    keys = [job_key(job.org_id, job.id, n) for n in names]
    return [k for k in keys if k not in recorded]


def derived_keys(storage: Storage, job: Job) -> list[str]:
    """The unrecorded keys of a job that hold an object now."""
    return [k for k in unrecorded_keys(job) if storage.exists(k)]


def delete_or_defer(
    session: Session, storage: Storage, keys: list[str], *, job_id: uuid.UUID | None
) -> tuple[int, int]:
    """Delete `keys` from the store; from the first that fails on, record them for the sweep
    instead of trying more against a store that is likely down. (deleted, deferred)."""
    deleted = 0
    for i, key in enumerate(keys):
        try:
            storage.delete(key)
        except ObjectNotFound:
            continue
        except StorageUnavailable as exc:
            for owed in keys[i:]:
                _defer(session, owed, job_id=job_id, error=exc)
            log.warning(
                "store deletion failed (%s); %d keys left to the sweep", exc.code, len(keys) - i
            )
            return deleted, len(keys) - i
        deleted += 1
    return deleted, 0


def _defer(
    session: Session, key: str, *, job_id: uuid.UUID | None, error: StorageUnavailable
) -> None:
    """Record `key` as owed a deletion, or count one more failed attempt if it already is.

    One upsert (INSERT ... ON CONFLICT DO UPDATE), not a read then a write: the sweep may delete
    the row in between (`retry_deletions` succeeding), and an UPDATE of a vanished row would fail
    the caller's transaction (a job's DELETE answered 500). The key is then owed afresh.
    """
    reason = str(error.details.get("reason") or error.code)[:200]
    now = utcnow()
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(PendingDeletion).values(
        key=key, job_id=job_id, attempts=1, last_attempt_at=now, error=reason, created_at=now
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[PendingDeletion.key],
        set_={"attempts": PendingDeletion.attempts + 1, "last_attempt_at": now, "error": reason},
    )
    # RETURNING refreshes a copy of the row the session already holds (populate_existing).
    session.scalars(
        stmt.returning(PendingDeletion), execution_options={"populate_existing": True}
    ).one()


def pending_deletions(session: Session) -> int:
    """How many store keys are still owed a deletion."""
    return int(session.scalar(select(func.count()).select_from(PendingDeletion)) or 0)


def retry_deletions(session: Session, storage: Storage, *, limit: int = 500) -> int:
    """Delete keys whose deletion failed before, least recently tried first (a key that keeps
    failing does not block the others); stop at the first failure. How many are still owed."""
    rows = session.scalars(
        select(PendingDeletion)
        .order_by(PendingDeletion.last_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    for row in rows:
        try:
            storage.delete(row.key)
        except ObjectNotFound:
            pass
        except StorageUnavailable as exc:
            _defer(session, row.key, job_id=row.job_id, error=exc)
            break
        session.delete(row)
    session.flush()
    return pending_deletions(session)


def get_deletion(session: Session, job_id: uuid.UUID) -> JobDeletion | None:
    """The deletion mark of a job, or None if its bytes are still kept."""
    return session.get(JobDeletion, job_id)


def purge(
    session: Session, storage: Storage, job: Job, *, reason: str, user_id: uuid.UUID | None
) -> JobDeletion:
    """Delete a job's bytes from the store and mark it (idempotent: a second call changes nothing).

    The job row is locked (and re-read) first, as the worker locks it to record its artifacts:
    either the worker's keys are committed before and are deleted here, or the worker sees this
    mark and deletes what it wrote (worker/pipeline.py, worker/reports.py). Keys the store fails
    to delete are left to the sweep (`delete_or_defer`): the job is marked all the same.
    """
    return _purge(session, storage, job, reason=reason, user_id=user_id)[0]


def _purge(
    session: Session, storage: Storage, job: Job, *, reason: str, user_id: uuid.UUID | None
) -> tuple[JobDeletion, int]:
    """`purge`, and how many keys it left to the sweep."""
    from api.domain import jobs  # jobs imports this module (JobDeletion)

    jobs.lock(session, job.id)
    existing = get_deletion(session, job.id)
    if existing is not None:
        return existing, 0
    try:
        keys = job_keys(job) + derived_keys(storage, job)
    except StorageUnavailable:  # which of them hold objects cannot be told now: owe them all
        keys = job_keys(job) + unrecorded_keys(job)
    deleted, deferred = delete_or_defer(session, storage, keys, job_id=job.id)
    # The row stays (audit, idempotency) but no longer points at artifacts.
    job.heatmap_key = job.overlay_key = job.report_key = None
    mark = JobDeletion(
        job_id=job.id, org_id=job.org_id, deleted_by=user_id, reason=reason, objects_deleted=deleted
    )
    session.add(mark)
    audit.record(
        session,
        "job.delete",
        org_id=job.org_id,
        user_id=user_id,
        job_id=job.id,
        detail={"reason": reason, "objects_deleted": deleted, "objects_deferred": deferred},
    )
    session.flush()
    return mark, deferred


def delete_job(
    session: Session, storage: Storage, job_id: uuid.UUID, *, org_id: uuid.UUID, user_id: uuid.UUID
) -> JobDeletion:
    """An org admin's deletion of one of the org's jobs (JobNotFound for another org's id)."""
    job = session.get(Job, job_id)
    if job is None or job.org_id != org_id:
        raise JobNotFound(details={"id": str(job_id)})
    return purge(session, storage, job, reason=ADMIN, user_id=user_id)


def expired_jobs(session: Session, days: int, *, limit: int = 500) -> list[Job]:
    """Terminal jobs finished more than `days` days ago whose bytes are still kept."""
    cutoff = utcnow() - timedelta(days=days)
    stmt = (
        select(Job)
        .outerjoin(JobDeletion, JobDeletion.job_id == Job.id)
        .where(
            JobDeletion.job_id.is_(None),
            Job.status.in_(list(TERMINAL_STATUSES)),
            Job.finished_at < cutoff,
        )
        .order_by(Job.finished_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def apply_retention(session: Session, storage: Storage, days: int, *, limit: int = 500) -> int:
    """Purge the bytes of jobs past the retention period (0 days = keep forever); how many."""
    if days <= 0:
        return 0
    purged = 0
    for job in expired_jobs(session, days, limit=limit):
        purged += 1
        if _purge(session, storage, job, reason=RETENTION, user_id=None)[1]:
            break  # the store is failing: the other jobs wait for the next sweep, not its timeouts
    if purged:
        log.info("retention purged %d jobs older than %d days", purged, days)
    return purged
