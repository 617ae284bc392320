"""Batches: many files (multipart parts and/or zips) submitted as one unit, one webhook at the end.

Order matters as for single jobs (see intake.py): the batch row is committed first, then every
file goes through `intake.submit` (bytes stored before its row commits, enqueued after), then the
batch is sealed. A batch is complete when it is sealed and every job is terminal; whoever sees
that first (the API at sealing, or the worker finishing the last job) fires `batch.completed`
exactly once, through a conditional UPDATE on `completed_at` under a row lock.

Zips are read in memory, never extracted to disk by name (no zip-slip), and every entry is
checked against count, per-entry size, total size and compression ratio before and while it is
inflated (no zip bombs, even when the headers lie).
"""

from __future__ import annotations

import io
import logging
import posixpath
import uuid
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from api.domain import intake
from api.domain.errors import (
    BrokerUnavailable,
    DatabaseUnavailable,
    InvalidInput,
    LiverscanError,
    MissingFile,
    NotFound,
    PayloadTooLarge,
    StorageUnavailable,
)
from api.domain.models import TERMINAL_STATUSES, Batch, Job, JobStatus, WebhookDelivery, utcnow
from api.domain.queue import DELIVER_WEBHOOK, WEBHOOKS_QUEUE, Queue
from api.domain.retention import JobDeletion
from api.domain.settings import Settings
from api.domain.storage import Storage
from api.domain.webhooks import check_callback_url

log = logging.getLogger(__name__)

COMPLETED_EVENT = "batch.completed"
_READ_CHUNK = 64 * 1024
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


class BatchNotFound(NotFound):
    code, message = "batch_not_found", "No such batch."


class EmptyBatch(LiverscanError):
    code, http_status, message = "empty_batch", 422, "The batch holds no usable file."


class TooManyFiles(LiverscanError):
    code, http_status, message = "too_many_files", 413, "The batch holds too many files."


class ZipUnsafePath(LiverscanError):
    code, http_status = "zip_unsafe_path", 422
    message = "The zip holds an entry with an absolute or parent-directory path."


class ZipBomb(LiverscanError):
    code, http_status = "zip_bomb", 413
    message = "The zip inflates beyond the size or compression-ratio limits."


class InvalidZip(LiverscanError):
    code, http_status, message = "invalid_zip", 422, "The zip archive cannot be read."


@dataclass(frozen=True)
class BatchFile:
    """One file of a batch as received (a multipart part or a zip entry)."""

    upload: intake.Upload
    client_ref: str | None = None


@dataclass
class BatchSubmission:
    """The sealed batch, its jobs in submission order, the files refused at intake, and the zip
    entries skipped as junk (not files of the batch)."""

    batch: Batch
    jobs: list[Job] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class ZipContents:
    """The files read from zips, and the entries skipped as junk ({filename, reason})."""

    files: list[BatchFile]
    skipped: list[dict[str, str]]


@dataclass(frozen=True)
class ZipLimits:
    """How much a batch's zips may hold."""

    max_entries: int
    max_entry_bytes: int
    max_total_bytes: int
    max_ratio: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ZipLimits:
        """The limits configured in `settings`."""
        return cls(
            max_entries=settings.batch_max_files,
            max_entry_bytes=settings.max_upload_bytes,
            max_total_bytes=settings.batch_max_mb * 1024 * 1024,
            max_ratio=settings.zip_max_ratio,
        )


def is_zip(data: bytes) -> bool:
    """Whether `data` starts like a zip archive (magic bytes)."""
    return data[:4] in _ZIP_MAGIC


def _safe_name(name: str) -> str:
    """The entry's path, normalised; ZipUnsafePath for absolute or parent-directory paths."""
    unified = name.replace("\\", "/")
    if (
        unified.startswith("/")
        or (len(unified) > 1 and unified[1] == ":")  # C:\…
        or any(part == ".." for part in unified.split("/"))
        or "\x00" in unified
    ):
        raise ZipUnsafePath(details={"entry": name[:255]})
    return posixpath.normpath(unified)


def _skip_reason(name: str) -> str | None:
    """Why a zip entry is not a file of the batch (`macos_metadata`, `hidden_file`), else None."""
    base = posixpath.basename(name)
    if name.startswith("__MACOSX/") or base == ".DS_Store" or base.startswith("._"):
        return "macos_metadata"
    if base.startswith(".") or not base:
        return "hidden_file"
    return None


def _is_folder(info: zipfile.ZipInfo) -> bool:
    return info.is_dir() or info.filename.endswith("\\")  # some Windows tools write "dir\\"


#: Central-directory entries a zip may list beyond twice the file limit (folders; each file's
#: macOS ``__MACOSX`` twin is the factor 2) before it is refused unread as too_many_files.
DIRECTORY_SLACK = 1000


def _directory_entries(data: bytes) -> int | None:
    """The entry count the zip's end record declares (ZIP64's too), read without parsing the
    central directory; None when no end record is found (zipfile then says why)."""
    try:
        end = zipfile._EndRecData(io.BytesIO(data))  # type: ignore[attr-defined]  # stdlib's reader
    except Exception:  # noqa: BLE001 - a hostile end record: let ZipFile report invalid_zip
        return None
    if not end:
        return None
    return int(end[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]


def read_zip(data: bytes, limits: ZipLimits, *, inflated: int = 0) -> ZipContents:
    """The files of a zip, checked entry by entry (paths, count, sizes, ratio) while inflating,
    and the entries skipped as junk (macOS metadata, hidden files), each with its reason.

    `inflated`: bytes the batch's earlier zips already inflated (the total limit is per batch).
    """
    listed = _directory_entries(data)
    if listed is not None and listed > 2 * limits.max_entries + DIRECTORY_SLACK:
        # Refused from the end record alone: parsing millions of tiny (junk, folder) entries
        # would cost about 9x the zip's size in memory before any other limit applies.
        raise TooManyFiles(details={"max_files": limits.max_entries, "directory_entries": listed})
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except Exception as exc:  # zipfile raises many types on hostile archives
        raise InvalidZip(details={"reason": str(exc)[:200]}) from exc
    entries = [info for info in infos if not _is_folder(info)]
    for info in entries:  # every name is checked before anything is inflated
        _safe_name(info.filename)
    skipped: list[dict[str, str]] = []
    kept: list[zipfile.ZipInfo] = []
    for info in entries:
        name = _safe_name(info.filename)
        reason = _skip_reason(name)
        if reason is None:
            kept.append(info)
        else:
            skipped.append({"filename": name[-255:], "reason": reason})
    entries = kept
    if len(entries) > limits.max_entries:
        raise TooManyFiles(details={"max_files": limits.max_entries, "entries": len(entries)})
    declared = sum(info.file_size for info in entries)
    if inflated + declared > limits.max_total_bytes:
        raise ZipBomb(details={"reason": "total_size", "max_bytes": limits.max_total_bytes})
    files: list[BatchFile] = []
    total = inflated
    for info in entries:
        name = _safe_name(info.filename)
        if info.flag_bits & 0x1:
            raise InvalidZip("Encrypted zip entries are not accepted.", details={"entry": name})
        if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
            raise ZipBomb(details={"reason": "ratio", "entry": name, "max_ratio": limits.max_ratio})
        # Headers can lie: inflate in chunks and stop at the limits, whatever they declared.
        cap = min(limits.max_entry_bytes, limits.max_total_bytes - total)
        out = bytearray()
        try:
            with archive.open(info) as fh:
                while chunk := fh.read(_READ_CHUNK):
                    out += chunk
                    if len(out) > max(info.file_size, 0) or len(out) > cap:
                        raise ZipBomb(details={"reason": "entry_size", "entry": name})
                    if info.compress_size and len(out) / info.compress_size > limits.max_ratio:
                        raise ZipBomb(details={"reason": "ratio", "entry": name})
        except LiverscanError:
            raise
        except Exception as exc:  # zlib, lzma, bz2 and zipfile raise many types on bad streams
            raise InvalidZip(details={"entry": name, "reason": str(exc)[:200]}) from exc
        total += len(out)
        files.append(
            BatchFile(intake.Upload(data=bytes(out), filename=name[-255:], content_type=None))
        )
    return ZipContents(files=files, skipped=skipped)


def expand(files: Iterable[BatchFile], limits: ZipLimits) -> ZipContents:
    """Replace every zip among `files` by its entries (one level; a zip inside a zip stays a file);
    the junk entries skipped on the way are listed."""
    out = ZipContents(files=[], skipped=[])
    inflated = 0
    for item in files:
        if is_zip(item.upload.data):
            contents = read_zip(item.upload.data, limits, inflated=inflated)
            inflated += sum(len(entry.upload.data) for entry in contents.files)
            out.files.extend(contents.files)
            out.skipped.extend(contents.skipped)
        else:
            out.files.append(item)
        if len(out.files) > limits.max_entries:
            raise TooManyFiles(details={"max_files": limits.max_entries})
    return out


def _precheck(item: BatchFile, settings: Settings) -> LiverscanError | None:
    """The per-file refusals that need no store or database (a bad file never sinks its batch)."""
    if not item.upload.data:
        return MissingFile("The file is empty.")
    if len(item.upload.data) > settings.max_upload_bytes:
        return PayloadTooLarge(details={"max_bytes": settings.max_upload_bytes})
    if item.client_ref is not None and len(item.client_ref) > intake.MAX_CLIENT_REF:
        return InvalidInput("client_ref is at most 200 characters.")
    return None


def _refusal(item: BatchFile, error: LiverscanError) -> dict[str, Any]:
    return {
        "filename": item.upload.filename,
        "client_ref": item.client_ref,
        "code": error.code,
        "message": error.message,
    }


def submit(
    session: Session,
    *,
    settings: Settings,
    storage: Storage,
    queue: Queue,
    org_id: uuid.UUID,
    user_id: uuid.UUID | None,
    files: list[BatchFile],
    callback_url: str | None = None,
    job_events: bool = False,
) -> BatchSubmission:
    """Create a batch, submit every file as a job (bad files refused one by one), seal it."""
    limits = ZipLimits.from_settings(settings)
    contents = expand(files, limits)
    files, skipped = contents.files, contents.skipped
    if not files:
        raise EmptyBatch(details={"skipped": skipped[:50]} if skipped else None)
    if len(files) > settings.batch_max_files:
        raise TooManyFiles(details={"max_files": settings.batch_max_files, "files": len(files)})
    if callback_url:
        check_callback_url(callback_url, settings.webhook_allow_private)
    good: list[BatchFile] = []
    rejected: list[dict[str, Any]] = []
    for item in files:
        error = _precheck(item, settings)
        if error is None:
            good.append(item)
        else:
            rejected.append(_refusal(item, error))
    if not good:
        details: dict[str, Any] = {"rejected": rejected[:50]}
        if skipped:
            details["skipped"] = skipped[:50]
        raise EmptyBatch(details=details)
    queue.ping()  # BrokerUnavailable before anything is written

    batch = Batch(
        org_id=org_id,
        user_id=user_id,
        callback_url=callback_url or None,
        job_events=bool(job_events and callback_url),
        file_count=len(files),
        rejected=rejected,
    )
    session.add(batch)
    session.commit()
    result = BatchSubmission(batch=batch, rejected=rejected, skipped=skipped)
    for item in good:
        try:
            submission = intake.submit(
                session,
                settings=settings,
                storage=storage,
                queue=queue,
                org_id=org_id,
                user_id=user_id,
                upload=item.upload,
                callback_url=batch.callback_url if batch.job_events else None,
                client_ref=item.client_ref,
                batch_id=batch.id,
                check_broker=False,
            )
        except (DatabaseUnavailable, BrokerUnavailable, StorageUnavailable):
            # The batch stays unsealed with the jobs made so far; nothing committed is lost.
            raise
        except LiverscanError as exc:
            rejected.append(_refusal(item, exc))
            continue
        result.jobs.append(submission.job)
    seal(session, batch.id, rejected=rejected, queue=queue)
    session.refresh(batch)
    return result


def seal(
    session: Session, batch_id: uuid.UUID, *, rejected: list[dict[str, Any]], queue: Queue
) -> None:
    """Mark every file submitted, commit, and fire `batch.completed` if the jobs already finished."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(sealed_at=utcnow(), rejected=list(rejected))
    )
    session.commit()
    delivery = on_job_terminal(session, batch_id)
    session.commit()
    if delivery is not None:
        enqueue_delivery(queue, delivery)


def seal_stale(session: Session, *, older_than_s: float) -> list[uuid.UUID]:
    """Seal batches whose submitting request died (unsealed, and no job added, past the deadline);
    returns deliveries.

    For the periodic sweep: the jobs such a batch got are all it will ever get. A request that is
    still adding jobs (a batch of thousands takes minutes) is alive, however old its batch.
    Commits per batch; enqueue each returned delivery id with `enqueue_delivery`.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    recent_job = select(Job.id).where(Job.batch_id == Batch.id, Job.created_at >= cutoff)
    stale = session.scalars(
        select(Batch.id)
        .where(Batch.sealed_at.is_(None), Batch.created_at < cutoff, ~recent_job.exists())
        .limit(100)
    ).all()
    deliveries: list[uuid.UUID] = []
    for batch_id in stale:
        sealed = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.sealed_at.is_(None))
            .values(sealed_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if sealed.rowcount != 1:  # type: ignore[attr-defined]
            continue
        log.warning("batch %s was never sealed by its request; sealed by the sweep", batch_id)
        delivery = on_job_terminal(session, batch_id)
        session.commit()
        if delivery is not None:
            deliveries.append(delivery)
    return deliveries


def enqueue_delivery(queue: Queue, delivery_id: uuid.UUID) -> None:
    """Hand a `batch.completed` attempt to the webhooks queue (the sweep re-drives a lost one)."""
    try:
        queue.enqueue(DELIVER_WEBHOOK, str(delivery_id), queue=WEBHOOKS_QUEUE)
    except Exception:
        log.warning("batch webhook %s not enqueued; the sweep will re-drive it", delivery_id)


def get(session: Session, batch_id: uuid.UUID) -> Batch | None:
    """A batch by id, or None."""
    return session.get(Batch, batch_id)


def get_or_raise(session: Session, batch_id: uuid.UUID, *, org_id: uuid.UUID) -> Batch:
    """A batch of this organization (another organization's batch is not found)."""
    batch = session.get(Batch, batch_id)
    if batch is None or batch.org_id != org_id:
        raise BatchNotFound(details={"id": str(batch_id)})
    return batch


def jobs_of(session: Session, batch_id: uuid.UUID) -> list[Job]:
    """The batch's jobs in submission order, without deleted ones (their rows still hold the
    result that GET /jobs/<id> answers 410 for; `counts` still counts them)."""
    return list(
        session.scalars(
            select(Job)
            .outerjoin(JobDeletion, JobDeletion.job_id == Job.id)
            .where(Job.batch_id == batch_id, JobDeletion.job_id.is_(None))
            .order_by(Job.created_at, Job.id)
        )
    )


def counts(session: Session, batch_id: uuid.UUID) -> dict[str, int]:
    """How many of the batch's jobs are in each status (every status present, zeros included)."""
    found = dict(
        session.execute(
            select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
        ).all()
    )
    return {status.value: int(found.get(status, 0)) for status in JobStatus}


def summary(session: Session, batch: Batch) -> dict[str, Any]:
    """The batch JSON without its jobs (relative URLs: also sent by workers in webhooks)."""
    by_status = counts(session, batch.id)
    job_count = sum(by_status.values())
    terminal = sum(by_status[s.value] for s in TERMINAL_STATUSES)
    refused = len(batch.rejected or [])
    if batch.completed_at is not None:
        state = "completed"
    elif batch.sealed_at is None:
        state = "receiving"
    else:
        state = "processing"
    total = job_count + refused
    return {
        "id": str(batch.id),
        "status": state,
        "created_at": _iso(batch.created_at),
        "completed_at": _iso(batch.completed_at),
        "file_count": batch.file_count,
        "job_count": job_count,
        "counts": by_status,
        "rejected_at_intake": refused,
        "done": terminal + refused,
        "progress": round((terminal + refused) / total, 4) if total else 1.0,
        "rejected": list(batch.rejected or []),
        "status_url": f"/api/v1/batches/{batch.id}",
        "results_url": f"/api/v1/batches/{batch.id}/results.csv",
    }


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def on_job_terminal(session: Session, batch_id: uuid.UUID | None) -> uuid.UUID | None:
    """Complete the batch if it is sealed and all its jobs are terminal; returns a delivery to enqueue.

    Call in the transaction that made a job terminal (or after sealing). The batch row lock
    serialises concurrent finishers, so the last one sees every other job terminal; the
    conditional UPDATE on `completed_at` makes the event fire exactly once.
    """
    if batch_id is None:
        return None
    batch = session.get(Batch, batch_id, with_for_update=True, populate_existing=True)
    if batch is None or batch.sealed_at is None or batch.completed_at is not None:
        return None
    open_jobs = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.batch_id == batch_id, Job.status.not_in(list(TERMINAL_STATUSES)))
    )
    if open_jobs:
        return None
    won = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.completed_at.is_(None))
        .values(completed_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if won.rowcount != 1:  # type: ignore[attr-defined]
        return None
    session.refresh(batch)
    log.info("batch %s completed", batch_id)
    if not batch.callback_url:
        return None
    anchor = session.scalar(
        select(Job.id).where(Job.batch_id == batch_id).order_by(Job.created_at.desc()).limit(1)
    )
    if anchor is None:  # deliveries hang off a job; a batch always has one (EmptyBatch otherwise)
        return None
    row = WebhookDelivery(
        job_id=anchor,
        event=COMPLETED_EVENT,
        delivery_id=uuid.uuid4(),
        attempt=1,
        status="pending",
        next_attempt_at=utcnow(),
        payload={"event": COMPLETED_EVENT, "batch": summary(session, batch)},
    )
    session.add(row)
    session.flush()
    return row.id


def callback_url_for(session: Session, delivery: WebhookDelivery, job: Job) -> str | None:
    """Where an attempt goes: the batch's callback for `batch.completed`, else the job's."""
    if delivery.event == COMPLETED_EVENT and job.batch_id is not None:
        batch = session.get(Batch, job.batch_id)
        return batch.callback_url if batch is not None else None
    return job.callback_url


def results_rows(session: Session, batch: Batch) -> list[dict[str, Any]]:
    """One row per file for the CSV: every job, then every file refused at intake."""
    rows: list[dict[str, Any]] = []
    for job in jobs_of(session, batch.id):
        rows.append(
            {
                "job": job,
                "filename": job.input_filename,
                "client_ref": job.client_ref,
                "status": job.status.value,
                "reason_code": job.reason_code or job.error_code,
                "label": job.label,
                "probability": job.probability,
                "model_version": job.model_version,
            }
        )
    for refused in batch.rejected or []:
        rows.append(
            {
                "job": None,
                "filename": refused.get("filename"),
                "client_ref": refused.get("client_ref"),
                "status": JobStatus.REJECTED.value,
                "reason_code": refused.get("code"),
                "label": None,
                "probability": None,
                "model_version": None,
            }
        )
    return rows
