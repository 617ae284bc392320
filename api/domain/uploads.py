"""Direct-to-store uploads: the client PUTs the bytes to the store, then creates the job from them.

`create` opens a slot (row `uploads`, status pending) and gives a presigned PUT URL (S3) or, for the
local folder, None (the API's `PUT /api/v1/uploads/<id>` takes the bytes instead). `claim` turns a
completed slot into the bytes `intake.submit` stores under the job's own key: it must be the caller's
organization's, pending, unexpired, and its object must exist within the size limit — never a job
without bytes. The presigned URL stays valid after that, so the job never reads the slot's key.
`expire_stale` (the sweep) expires slots never used and deletes whatever bytes reached them, and
deletes what a used slot's key received once its URL has run out; LATE_UPLOAD_GRACE later it
deletes the key once more (a PUT still running at the deadline), then leaves the slot swept.
`prune_swept` (the sweep) deletes a swept slot's row UPLOAD_SLOT_RETENTION_DAYS past its deadline.
Services take the session first and flush; the caller commits.
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from api.domain import jobs
from api.domain.db import rows_deleted
from api.domain.errors import (
    InvalidInput,
    PayloadTooLarge,
    UploadAlreadyUsed,
    UploadExpired,
    UploadIncomplete,
    UploadNotFound,
)
from api.domain.models import Job, PendingUpload, UploadStatus, utcnow
from api.domain.settings import Settings
from api.domain.storage import Storage, upload_key

log = logging.getLogger(__name__)

DEFAULT_CONTENT_TYPE = "application/octet-stream"
MIME_TYPE = re.compile(r"[A-Za-z0-9][\w.+-]{0,62}/[A-Za-z0-9][\w.+-]{0,62}")
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
LATE_UPLOAD_GRACE = timedelta(hours=1)


def create(
    session: Session,
    *,
    settings: Settings,
    storage: Storage,
    org_id: uuid.UUID,
    user_id: uuid.UUID | None,
    filename: str | None,
    content_type: str | None,
) -> tuple[PendingUpload, str | None]:
    """Open an upload slot; (row, presigned PUT URL or None for the local store).

    `content_type` must look like a MIME type (`type/subtype`), else invalid_input; control
    characters are dropped from `filename`.
    """
    if content_type and not MIME_TYPE.fullmatch(content_type):
        raise InvalidInput(
            "content_type must be a MIME type such as image/png.",
            details={"field": "content_type"},
        )
    if filename:
        filename = CONTROL_CHARS.sub("", filename).strip() or None
    upload_id = uuid.uuid4()
    now = utcnow()
    row = PendingUpload(
        id=upload_id,
        org_id=org_id,
        user_id=user_id,
        key=upload_key(org_id, upload_id),
        filename=(filename or None) and filename[:255],
        content_type=(content_type or DEFAULT_CONTENT_TYPE)[:127],
        status=UploadStatus.PENDING,
        created_at=now,
        expires_at=now + timedelta(seconds=settings.upload_expires_s),
    )
    session.add(row)
    session.flush()
    expires_s = min(settings.presign_expires_s, settings.upload_expires_s)
    return row, storage.upload_url_for(row.key, row.content_type or DEFAULT_CONTENT_TYPE, expires_s)


def _get(
    session: Session, upload_id: uuid.UUID, *, org_id: uuid.UUID, lock: bool
) -> PendingUpload | None:
    """The organization's upload row (locked when `lock`) whatever its status, or None."""
    query = select(PendingUpload).where(PendingUpload.id == upload_id)
    if lock:
        query = query.with_for_update()
    row = session.scalars(query).one_or_none()
    return row if row is not None and row.org_id == org_id else None


def replayed_job(
    session: Session, *, org_id: uuid.UUID, upload_id: uuid.UUID, idempotency_key: str
) -> Job | None:
    """The job a request with this Idempotency-Key already made from this upload, or None.

    The upload's row is locked first, so a retry racing the first request waits for its commit.
    """
    row = _get(session, upload_id, org_id=org_id, lock=True)
    if row is None or row.job_id is None:
        return None
    job = jobs.find_by_idempotency_key(session, org_id=org_id, key=idempotency_key)
    return job if job is not None and job.id == row.job_id else None


def get_pending(
    session: Session, upload_id: uuid.UUID, *, org_id: uuid.UUID, lock: bool = False
) -> PendingUpload:
    """The organization's pending, unexpired upload (row-locked when `lock`), else its error."""
    row = _get(session, upload_id, org_id=org_id, lock=lock)
    if row is None:
        raise UploadNotFound(details={"upload_id": str(upload_id)})
    if row.status in (UploadStatus.USED, UploadStatus.CLOSED) or row.job_id is not None:
        raise UploadAlreadyUsed(details={"upload_id": str(upload_id), "job_id": str(row.job_id)})
    if row.status is UploadStatus.EXPIRED or row.expires_at <= utcnow():
        raise UploadExpired(details={"upload_id": str(upload_id)})
    return row


def claim(
    session: Session,
    *,
    settings: Settings,
    storage: Storage,
    org_id: uuid.UUID,
    upload_id: uuid.UUID,
    job_id: uuid.UUID,
) -> tuple[PendingUpload, bytes]:
    """Mark a completed upload used by `job_id` (flushed, row-locked) and read its bytes, once.

    The caller stores these bytes under a key of the job's own: the presigned URL can still
    overwrite the upload's key. Raises upload_not_found, upload_already_used, upload_expired,
    upload_incomplete (nothing stored yet) or payload_too_large (the object is deleted: it can
    never become a job).
    """
    row = get_pending(session, upload_id, org_id=org_id, lock=True)
    limit = settings.max_upload_bytes
    size = storage.size(row.key)
    if size is None or size == 0:
        raise UploadIncomplete(details={"upload_id": str(upload_id)})
    try:
        if size > limit:
            raise PayloadTooLarge(details={"max_bytes": limit, "size": size})
        data = storage.get(row.key, max_bytes=limit)  # bounded: it may have grown since
    except PayloadTooLarge:
        storage.delete(row.key)  # never a job; the slot stays open for a smaller file until expiry
        raise
    if not data:
        raise UploadIncomplete(details={"upload_id": str(upload_id)})
    row.status, row.job_id = UploadStatus.USED, job_id
    session.flush()
    return row, data


def _stale(
    session: Session, statuses: list[UploadStatus], before: datetime, limit: int
) -> list[tuple[PendingUpload, str | None]]:
    """Slots in `statuses` whose deadline passed before `before`, oldest first, row-locked (a
    second sweep skips them), with the input key of the job made from each."""
    rows = session.execute(
        select(PendingUpload, Job.input_key)
        .outerjoin(Job, Job.id == PendingUpload.job_id)
        .where(PendingUpload.status.in_(statuses), PendingUpload.expires_at < before)
        .order_by(PendingUpload.expires_at)
        .limit(limit)
        .with_for_update(of=PendingUpload, skip_locked=True)
    ).all()
    return [(row, input_key) for row, input_key in rows]


def _delete_slot_key(storage: Storage, row: PendingUpload, input_key: str | None) -> None:
    """Delete what reached a slot's key, unless its job reads that key."""
    if input_key != row.key:  # jobs made before inputs were copied still read the upload's key
        storage.delete(row.key)  # absent keys are fine


def expire_stale(session: Session, storage: Storage, *, limit: int = 500) -> int:
    """Expire pending uploads past their deadline and delete any bytes they received; close used
    ones past it (their URL has run out) and delete what reached their key late; once
    LATE_UPLOAD_GRACE has passed too, delete the key of an expired or closed slot once more (a PUT
    that started before the deadline may finish after it) and never look at it again. How many
    slots had their key deleted."""
    now = utcnow()
    # Graced first: a slot expired here is not deleted twice in one run, whatever its age.
    graced = _stale(
        session, [UploadStatus.EXPIRED, UploadStatus.CLOSED], now - LATE_UPLOAD_GRACE, limit
    )
    for row, input_key in graced:
        _delete_slot_key(storage, row, input_key)
        row.status = UploadStatus.SWEPT
    stale = _stale(session, [UploadStatus.PENDING, UploadStatus.USED], now, limit)
    for row, input_key in stale:
        _delete_slot_key(storage, row, input_key)
        used = row.status is UploadStatus.USED
        row.status = UploadStatus.CLOSED if used else UploadStatus.EXPIRED
    session.flush()
    return len(graced) + len(stale)


def prune_swept(session: Session, days: int) -> int:
    """Delete the rows of swept slots whose deadline passed more than `days` days ago (0 = keep
    them forever); how many.

    A swept slot's key was deleted a last time, so only a retry of the request that made a job from
    it still reads its row (`replayed_job`): within `days` it replays that job; after, the slot is
    unknown (upload_not_found), never a second job. Slots not yet swept stay whatever their age:
    their object may still arrive, or still have to be deleted.
    """
    if days <= 0:
        return 0
    result = session.execute(
        delete(PendingUpload).where(
            PendingUpload.status == UploadStatus.SWEPT,
            PendingUpload.expires_at < utcnow() - timedelta(days=days),
        )
    )
    return rows_deleted(result)
