"""Data retention: deleting a job's bytes from the store (an admin's request, or the retention
period) and marking the job as deleted (session first, flush only)."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from sqlalchemy import ForeignKey, Integer, String, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from api.domain import audit
from api.domain.errors import JobNotFound, ObjectNotFound
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


def job_keys(job: Job) -> list[str]:
    """Every store key a job's row points at (upload, heatmap, overlay, report)."""
    keys = [job.input_key, job.heatmap_key, job.overlay_key, job.report_key]
    return [k for k in keys if k]


def derived_keys(storage: Storage, job: Job) -> list[str]:
    """Objects the worker stored for a job that its row does not point at: the DICOM outputs, and
    a heatmap, overlay or PDF stored by a run or render interrupted before it recorded them."""
    recorded = set(job_keys(job))
    names = (HEATMAP_NAME, OVERLAY_NAME, REPORT_PDF_NAME, DICOM_OVERLAY_NAME, DICOM_SR_NAME)
    keys = [job_key(job.org_id, job.id, n) for n in names]
    return [k for k in keys if k not in recorded and storage.exists(k)]


def get_deletion(session: Session, job_id: uuid.UUID) -> JobDeletion | None:
    """The deletion mark of a job, or None if its bytes are still kept."""
    return session.get(JobDeletion, job_id)


def purge(
    session: Session, storage: Storage, job: Job, *, reason: str, user_id: uuid.UUID | None
) -> JobDeletion:
    """Delete a job's bytes from the store and mark it (idempotent: a second call changes nothing).

    The job row is locked (and re-read) first, as the worker locks it to record its artifacts:
    either the worker's keys are committed before and are deleted here, or the worker sees this
    mark and deletes what it wrote (worker/pipeline.py, worker/reports.py).
    """
    from api.domain import jobs  # jobs imports this module (JobDeletion)

    jobs.lock(session, job.id)
    existing = get_deletion(session, job.id)
    if existing is not None:
        return existing
    deleted = 0
    for key in job_keys(job) + derived_keys(storage, job):
        try:
            storage.delete(key)
            deleted += 1
        except ObjectNotFound:
            pass
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
        detail={"reason": reason, "objects_deleted": deleted},
    )
    session.flush()
    return mark


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
    jobs = expired_jobs(session, days, limit=limit)
    for job in jobs:
        purge(session, storage, job, reason=RETENTION, user_id=None)
    if jobs:
        log.info("retention purged %d jobs older than %d days", len(jobs), days)
    return len(jobs)
