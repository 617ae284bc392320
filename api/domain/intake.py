"""Submitting an upload: the one use case that owns its transaction, because order matters.

1. check everything that can be checked cheaply (size, callback URL, idempotency key, broker up);
2. put the bytes in the store under the job's own key (a direct-to-store upload's bytes are read
   from its slot and copied there, since its presigned URL can still overwrite the slot);
3. insert the job row and COMMIT (on failure: delete the bytes, answer database_unavailable;
   but a COMMIT that raised after the server committed, its answer lost with the connection,
   stands: the job is accepted with its bytes), then delete the slot's copy. Bytes the store
   fails to delete are recorded in pending_deletions in a transaction of their own, and the
   sweep deletes them once it answers (`_delete_or_owe`);
4. enqueue the id. If this last publish fails the row stays `queued` and the periodic sweep
   re-drives it, so the request still answers 202: nothing is lost, and the client holds an id.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from api.domain import audit, jobs, retention, uploads
from api.domain.errors import (
    BrokerUnavailable,
    DatabaseUnavailable,
    IdempotencyConflict,
    InvalidInput,
    MissingFile,
    PayloadTooLarge,
)
from api.domain.models import Job
from api.domain.queue import INFERENCE_QUEUE, PROCESS_JOB, Queue
from api.domain.settings import Settings
from api.domain.storage import Storage, job_key
from api.domain.webhooks import check_callback_url

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255
MAX_CLIENT_REF = 200


@dataclass(frozen=True)
class Upload:
    """One file as received."""

    data: bytes
    filename: str | None
    content_type: str | None


@dataclass(frozen=True)
class Submission:
    """The job a submit produced, and whether it is new (202) or an idempotent replay (200)."""

    job: Job
    created: bool
    enqueued: bool


def _check_idempotent(session: Session, org_id: uuid.UUID, key: str, sha256: str) -> Job | None:
    existing = jobs.find_by_idempotency_key(session, org_id=org_id, key=key)
    if existing is None:
        return None
    if existing.input_sha256 != sha256:
        raise IdempotencyConflict(details={"job_id": str(existing.id)})
    return existing


def submit(
    session: Session,
    *,
    settings: Settings,
    storage: Storage,
    queue: Queue,
    org_id: uuid.UUID,
    user_id: uuid.UUID | None,
    upload: Upload,
    callback_url: str | None = None,
    client_ref: str | None = None,
    idempotency_key: str | None = None,
    batch_id: uuid.UUID | None = None,
    check_broker: bool = True,
    upload_id: uuid.UUID | None = None,
) -> Submission:
    """Store the upload, commit a queued job for it, then enqueue it (see the module docstring).

    `upload_id`: make the job from that direct-to-store upload (see api.domain.uploads) instead;
    `upload` is then ignored. The same Idempotency-Key again replays the job made from it.
    """
    if upload_id is None:
        if not upload.data:
            raise MissingFile()
        if len(upload.data) > settings.max_upload_bytes:
            raise PayloadTooLarge(details={"max_bytes": settings.max_upload_bytes})
    if idempotency_key is not None and (
        not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY or "\x00" in idempotency_key
    ):
        raise InvalidInput(
            "Idempotency-Key must be 1-255 characters.", details={"field": "Idempotency-Key"}
        )
    if client_ref is not None and len(client_ref) > MAX_CLIENT_REF:
        raise InvalidInput("client_ref is at most 200 characters.", details={"field": "client_ref"})
    if client_ref is not None and "\x00" in client_ref:  # PostgreSQL text cannot hold NUL
        raise InvalidInput(
            "client_ref must not contain NUL characters.", details={"field": "client_ref"}
        )
    if callback_url:
        check_callback_url(callback_url, settings.webhook_allow_private)
    job_id, slot_key = uuid.uuid4(), None
    if upload_id is not None:
        if idempotency_key is not None:
            replay = uploads.replayed_job(
                session, org_id=org_id, upload_id=upload_id, idempotency_key=idempotency_key
            )
            if replay is not None:
                return Submission(job=replay, created=False, enqueued=False)
        row, data = uploads.claim(
            session,
            settings=settings,
            storage=storage,
            org_id=org_id,
            upload_id=upload_id,
            job_id=job_id,
        )
        upload = Upload(data=data, filename=row.filename, content_type=row.content_type)
        slot_key = row.key
    sha256 = hashlib.sha256(upload.data).hexdigest()

    try:
        if idempotency_key is not None:
            existing = _check_idempotent(session, org_id, idempotency_key, sha256)
            if existing is not None:
                return Submission(job=existing, created=False, enqueued=False)
    except OperationalError as exc:
        session.rollback()
        raise DatabaseUnavailable() from exc

    if check_broker:
        queue.ping()  # BrokerUnavailable before anything is written

    key = job_key(org_id, job_id, "input")
    stored = storage.put(key, upload.data, upload.content_type or "application/octet-stream")
    committing = False
    try:
        job = jobs.create_job(
            session,
            org_id=org_id,
            user_id=user_id,
            job_id=job_id,
            upload=stored,
            filename=(upload.filename or "").replace("\x00", "")[:255] or None,
            callback_url=callback_url or None,
            client_ref=client_ref or None,
            idempotency_key=idempotency_key,
            batch_id=batch_id,
        )
        audit.record(session, "job.submit", org_id=org_id, user_id=user_id, job_id=job.id)
        session.flush()  # everything but the COMMIT: an error up to here surely left no row
        committing = True
        session.commit()
    except IntegrityError:
        # Another request with the same Idempotency-Key committed first.
        session.rollback()
        _delete_or_owe(session, storage, key, job_id=None)
        if idempotency_key is None:
            raise
        existing = _check_idempotent(session, org_id, idempotency_key, sha256)
        if existing is None:
            raise
        return Submission(job=existing, created=False, enqueued=False)
    except BaseException as exc:
        committed = _roll_back(session, job_id, committing=committing)
        if committed is False:
            _delete_or_owe(session, storage, key, job_id=None)
        elif committed is None:
            log.error("job %s: its COMMIT failed, maybe after committing; %s is kept", job_id, key)
        if not committed or not isinstance(exc, Exception):
            if isinstance(exc, OperationalError):
                raise DatabaseUnavailable() from exc
            raise
        # The connection dropped after the server committed: the job stands, with its upload.
        log.warning("job %s: its COMMIT raised %s but went through", job_id, type(exc).__name__)
        job = jobs.get_or_raise(session, job_id)
    if slot_key is not None:  # the job holds its own copy now
        _delete_or_owe(session, storage, slot_key, job_id=job.id)

    try:
        queue.enqueue(PROCESS_JOB, str(job.id), queue=INFERENCE_QUEUE)
        enqueued = True
    except BrokerUnavailable:
        log.warning("job %s committed but not enqueued; the sweep will re-drive it", job.id)
        enqueued = False
    return Submission(job=job, created=True, enqueued=enqueued)


def _roll_back(session: Session, job_id: uuid.UUID, *, committing: bool) -> bool | None:
    """Roll back after creating the job's row failed; whether the row was committed all the same.

    An error before the COMMIT was sent surely left no row (False). A COMMIT that raised may have
    gone through, its answer lost with the connection: the row is looked for (True or False),
    and None means the database cannot tell now; then the upload must be kept, since a committed
    job without its bytes could only fail.
    """
    try:
        session.rollback()
        if not committing:
            return False
        return session.scalar(select(Job.id).where(Job.id == job_id)) is not None
    except Exception:
        log.warning("job %s: cannot tell whether its row was committed", job_id, exc_info=True)
        return None if committing else False


def _delete_or_owe(
    session: Session, storage: Storage, key: str, *, job_id: uuid.UUID | None
) -> None:
    """Delete `key`; if the store fails, record it for the sweep (pending_deletions) and commit.

    The session's transaction is a fresh one: the job's rolled back, or committed. Only when
    nothing can be recorded (the database is down too) are the bytes left unrecorded; then the key
    is logged as an error so that an operator can delete it. Never raises.
    """
    try:
        retention.delete_or_defer(session, storage, [key], job_id=job_id)
        session.commit()
    except Exception:
        session.rollback()
        log.exception("could not delete %s nor record it for the sweep: delete it by hand", key)
