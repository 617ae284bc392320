"""The sweep deletes the rows of direct-to-store upload slots it is done with (swept) once they are
LIVERSCAN_UPLOAD_SLOT_RETENTION_DAYS past their deadline; never a slot whose object may still
arrive or still be deleted, nor one a retry may still replay its job from within that window."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select
from worker_support import make_org

from api.domain import intake, jobs
from api.domain.errors import UploadNotFound
from api.domain.models import JobStatus, PendingUpload, UploadStatus, utcnow
from api.domain.storage import StoredObject, job_key, upload_key
from worker import sweep
from worker.context import WorkerContext


def _slot(
    ctx: WorkerContext,
    org_id: uuid.UUID,
    status: UploadStatus,
    deadline_days_ago: float,
    *,
    idempotency_key: str | None = None,
) -> uuid.UUID:
    """A slot of `org_id` whose deadline passed that many days ago (negative: still ahead); with an
    Idempotency-Key, the (finished) job a request with that key made from it."""
    upload_id, job_id = uuid.uuid4(), None
    with ctx.sessions.begin() as session:
        if idempotency_key is not None:
            job_id = uuid.uuid4()
            stored = StoredObject(job_key(org_id, job_id, "input"), 9, "0" * 64, "image/png")
            job = jobs.create_job(
                session,
                org_id=org_id,
                upload=stored,
                job_id=job_id,
                idempotency_key=idempotency_key,
            )
            job.status = JobStatus.FAILED  # finished: no sweep re-drives it
        deadline = utcnow() - timedelta(days=deadline_days_ago)
        session.add(
            PendingUpload(
                id=upload_id,
                org_id=org_id,
                key=upload_key(org_id, upload_id),
                content_type="image/png",
                status=status,
                job_id=job_id,
                created_at=deadline - timedelta(hours=1),
                expires_at=deadline,
            )
        )
    return upload_id


def _retry(
    ctx: WorkerContext, org_id: uuid.UUID, upload_id: uuid.UUID, key: str
) -> intake.Submission:
    """The request that made a job from the slot, sent again with its Idempotency-Key."""
    with ctx.sessions() as session:
        return intake.submit(
            session, settings=ctx.settings, storage=ctx.storage, queue=ctx.queue, org_id=org_id,
            user_id=None, upload=intake.Upload(b"", None, None), idempotency_key=key,
            upload_id=upload_id,
        )  # fmt: skip


def test_sweep_deletes_swept_upload_slots_past_the_retention_only(
    ctx: WorkerContext, caplog: pytest.LogCaptureFixture
) -> None:
    days = ctx.settings.upload_slot_retention_days
    assert days == 30  # the default
    org = make_org(ctx)
    old_used = _slot(ctx, org, UploadStatus.SWEPT, days + 1, idempotency_key="old")
    _slot(ctx, org, UploadStatus.SWEPT, days + 1)  # expired unused, then swept
    kept = {
        "recent": _slot(ctx, org, UploadStatus.SWEPT, days - 1, idempotency_key="recent"),
        "pending": _slot(ctx, org, UploadStatus.PENDING, -1 / 24),  # its object may still arrive
        "used": _slot(ctx, org, UploadStatus.USED, -1 / 24, idempotency_key="used"),
        # Its key still to be deleted a last time, and the store failing to: it stays.
        "closed": _slot(ctx, org, UploadStatus.CLOSED, days + 1),
    }
    assert ctx.settings.storage_dir is not None
    blocker = ctx.settings.storage_dir / str(org) / "uploads"  # a file where the folder should be
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")

    with caplog.at_level(logging.INFO, logger="worker.sweep"):
        assert sweep.run(context=ctx)["uploads_pruned"] == 2
    assert "sweep deleted 2 upload slots" in caplog.text

    with ctx.sessions() as session:
        left = set(session.scalars(select(PendingUpload.id).where(PendingUpload.org_id == org)))
    assert left == set(kept.values())
    # Within the window a retry still replays its job; past it the slot is unknown, never a second job.
    replay = _retry(ctx, org, kept["recent"], "recent")
    assert not replay.created and replay.job.idempotency_key == "recent"
    with pytest.raises(UploadNotFound) as info:
        _retry(ctx, org, old_used, "old")
    assert info.value.code == "upload_not_found"
    blocker.unlink()  # the store is back: the closed slot is swept, then deleted
    assert sweep.run(context=ctx)["uploads_pruned"] == 1
    with ctx.sessions() as session:
        assert session.get(PendingUpload, kept["closed"]) is None
