"""Nothing is lost: the sweep re-drives jobs whose message vanished; bounded retries; idempotency."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import delete, update
from worker_support import load_job, make_job, queued_tasks

from api.domain import jobs
from api.domain.errors import StorageUnavailable
from api.domain.models import Batch, Job, JobStatus, WebhookDelivery, utcnow
from api.domain.storage import LocalStorage
from worker import pipeline, sweep, webhooks
from worker.context import WorkerContext


def _age(ctx: WorkerContext, model: type, row_id: object, column: str, seconds: float) -> None:
    with ctx.sessions.begin() as session:
        session.execute(
            update(model)
            .where(model.id == row_id)
            .values({column: utcnow() - timedelta(seconds=seconds)})
        )


def test_sweep_re_enqueues_a_queued_job_whose_message_was_lost(ctx: WorkerContext, broker) -> None:
    """A job queued past SWEEP_DEADLINE_S goes back on the inference queue exactly once."""
    stuck = make_job(ctx, b"bytes")
    fresh = make_job(ctx, b"bytes")
    _age(ctx, Job, stuck, "updated_at", ctx.settings.sweep_deadline_s + 5)

    assert sweep.run(context=ctx) == {
        "jobs": 1,
        "webhooks": 0,
        "uploads": 0,
        "uploads_pruned": 0,
        "secrets": 0,
        "deletions_pending": 0,
    }
    assert queued_tasks(broker, "inference") == [("liverscan.process_job", [str(stuck)])]
    assert sweep.run(context=ctx) == {
        "jobs": 0,
        "webhooks": 0,
        "uploads": 0,
        "uploads_pruned": 0,
        "secrets": 0,
        "deletions_pending": 0,
    }  # not again before another deadline
    assert load_job(ctx, fresh).status is JobStatus.QUEUED


def test_sweep_requeues_a_job_whose_worker_died(ctx: WorkerContext, broker) -> None:
    """A job left processing past the deadline is put back to queued and re-enqueued."""
    job_id = make_job(ctx, b"bytes")
    with ctx.sessions.begin() as session:
        jobs.mark_processing(session, job_id)
    _age(ctx, Job, job_id, "updated_at", ctx.settings.sweep_deadline_s + 5)

    assert sweep.run(context=ctx)["jobs"] == 1
    assert load_job(ctx, job_id).status is JobStatus.QUEUED
    assert queued_tasks(broker, "inference") == [("liverscan.process_job", [str(job_id)])]


def test_sweep_re_drives_an_overdue_webhook_attempt(ctx: WorkerContext, broker) -> None:
    """A pending attempt whose message was lost is re-enqueued on the webhooks queue."""
    job_id = make_job(ctx, b"bytes", callback_url="http://127.0.0.1:9/hook")
    with ctx.sessions.begin() as session:
        jobs.mark_processing(session, job_id)
        job = jobs.mark_failed(session, job_id, error_code="undecodable", error_message="x")
        row_id = webhooks.schedule(session, job, ctx)
    _age(ctx, WebhookDelivery, row_id, "next_attempt_at", ctx.settings.sweep_deadline_s + 5)

    assert sweep.run(context=ctx) == {
        "jobs": 0,
        "webhooks": 1,
        "uploads": 0,
        "uploads_pruned": 0,
        "secrets": 0,
        "deletions_pending": 0,
    }
    assert queued_tasks(broker, "webhooks") == [("liverscan.deliver_webhook", [str(row_id)])]


def test_terminal_job_is_left_alone(ctx: WorkerContext, broker) -> None:
    """process_job on a finished job changes nothing and schedules no webhook."""
    job_id = make_job(ctx, b"bytes", callback_url="http://127.0.0.1:9/hook")
    with ctx.sessions.begin() as session:
        jobs.mark_processing(session, job_id)
        jobs.mark_failed(session, job_id, error_code="undecodable", error_message="x")
    before = load_job(ctx, job_id)

    assert pipeline.run(job_id, context=ctx) is JobStatus.FAILED
    after = load_job(ctx, job_id)
    assert (after.status, after.attempts, after.finished_at) == (
        before.status,
        before.attempts,
        before.finished_at,
    )
    assert queued_tasks(broker, "webhooks") == []


def test_unexpected_errors_are_retried_then_fail_without_a_stack_trace(
    ctx: WorkerContext, broker
) -> None:
    """Bytes missing from the store: two bounded retries, then failed with internal_error."""
    job_id = make_job(ctx, None, callback_url="http://127.0.0.1:9/hook")

    assert pipeline.run(job_id, context=ctx) is JobStatus.QUEUED
    assert queued_tasks(broker, "inference") == [("liverscan.process_job", [str(job_id)])]
    assert pipeline.run(job_id, context=ctx) is JobStatus.QUEUED
    assert pipeline.run(job_id, context=ctx) is JobStatus.FAILED

    job = load_job(ctx, job_id)
    assert job.attempts == pipeline.MAX_ATTEMPTS
    assert job.error_code == "internal_error"
    assert "Traceback" not in (job.error_message or "") and "ObjectNotFound" not in (
        job.error_message or ""
    )
    assert [t for t, _ in queued_tasks(broker, "webhooks")] == ["liverscan.deliver_webhook"]


class FlakyStore(LocalStorage):
    """The local store, unreachable (storage_unavailable, as S3 during an outage) while `down`."""

    down = True

    def get(self, key: str, max_bytes: int | None = None) -> bytes:
        """The bytes under `key`, or storage_unavailable while the store is down."""
        if self.down:
            raise StorageUnavailable(details={"reason": "ConnectionRefusedError"})
        return super().get(key, max_bytes)


def test_a_store_outage_outlasting_the_retries_is_waited_out_not_failed(
    ctx: WorkerContext, broker
) -> None:
    """The store down through all three deliveries: the job is not failed (its upload is safe,
    only unreachable) but left queued for the sweep, with no webhook; once the store is back the
    sweep re-drives it and it is processed from its bytes."""
    job_id = make_job(ctx, b"not an image", callback_url="http://127.0.0.1:9/hook")
    store = FlakyStore(ctx.storage.root)  # type: ignore[attr-defined]
    ctx.storage = store
    statuses = [pipeline.run(job_id, context=ctx) for _ in range(pipeline.MAX_ATTEMPTS)]

    assert statuses == [JobStatus.QUEUED] * pipeline.MAX_ATTEMPTS
    job = load_job(ctx, job_id)
    assert (job.status, job.error_code, job.finished_at) == (JobStatus.QUEUED, None, None)
    assert queued_tasks(broker, "webhooks") == []
    broker.delete("inference")  # the quick retries' messages; the last delivery enqueued none

    store.down = False
    _age(ctx, Job, job_id, "updated_at", ctx.settings.sweep_deadline_s + 5)
    assert sweep.run(context=ctx)["jobs"] == 1
    assert queued_tasks(broker, "inference") == [("liverscan.process_job", [str(job_id)])]
    assert pipeline.run(job_id, context=ctx) is JobStatus.REJECTED
    assert load_job(ctx, job_id).reason_code is not None


def test_a_store_outage_is_waited_out_for_a_day_at_most(ctx: WorkerContext, broker) -> None:
    """A job submitted more than OUTAGE_PATIENCE ago whose store is still down on its last
    delivery fails with internal_error, as any job out of retries."""
    job_id = make_job(ctx, b"not an image")
    _age(ctx, Job, job_id, "created_at", pipeline.OUTAGE_PATIENCE.total_seconds() + 60)
    ctx.storage = FlakyStore(ctx.storage.root)  # type: ignore[attr-defined]
    statuses = [pipeline.run(job_id, context=ctx) for _ in range(pipeline.MAX_ATTEMPTS)]

    assert statuses[-1] is JobStatus.FAILED
    assert load_job(ctx, job_id).error_code == "internal_error"


def test_a_job_that_keeps_killing_workers_is_failed(ctx: WorkerContext) -> None:
    """After MAX_ATTEMPTS deliveries that never finished, the next one fails the job at once."""
    job_id = make_job(ctx, b"bytes")
    for _ in range(pipeline.MAX_ATTEMPTS):
        with ctx.sessions.begin() as session:
            jobs.mark_processing(session, job_id)  # the worker died right after this
    assert pipeline.run(job_id, context=ctx) is JobStatus.FAILED
    assert load_job(ctx, job_id).error_code == "internal_error"


def test_unknown_job_id_is_dropped(ctx: WorkerContext) -> None:
    """A message for a job that does not exist does nothing."""
    import uuid

    assert pipeline.run(uuid.uuid4(), context=ctx) is None


def test_sweep_seals_a_batch_whose_request_died_and_fires_its_completion(
    ctx: WorkerContext, broker
) -> None:
    """A batch never sealed by its (dead) request completes through the sweep, webhook included."""
    job_id = make_job(ctx, b"bytes")
    with ctx.sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        batch = Batch(
            org_id=job.org_id,
            callback_url="http://127.0.0.1:9/hook",
            file_count=1,
            created_at=utcnow() - timedelta(seconds=ctx.settings.sweep_deadline_s + 5),
        )
        session.add(batch)
        session.flush()
        job.batch_id = batch.id
        job.created_at = batch.created_at  # the request died right after its one file
        jobs.mark_processing(session, job_id)
        jobs.mark_failed(session, job_id, error_code="undecodable", error_message="x")
        batch_id = batch.id

    sweep.run(context=ctx)
    with ctx.sessions() as session:
        sealed = session.get(Batch, batch_id)
        assert sealed is not None and sealed.sealed_at is not None
        assert sealed.completed_at is not None
    tasks = queued_tasks(broker, "webhooks")
    assert [name for name, _ in tasks] == ["liverscan.deliver_webhook"]
    sweep.run(context=ctx)  # sealed once: no second completion event
    assert len(queued_tasks(broker, "webhooks")) == 1


def test_sweep_seals_plaintext_secrets_and_rotates_keys(ctx: WorkerContext) -> None:
    """Secrets stored in plaintext by an older version are sealed by the sweep; after a key
    rotation (new key, old one in PREVIOUS) the sweep re-seals them under the new key, so the old
    key can be dropped. Webhooks sign with the same plaintext throughout."""
    from api.domain import secrets
    from api.domain.models import Organization

    with ctx.sessions.begin() as session:
        org = Organization(name="legacy clinic", webhook_secret="whsec_legacy_plain")
        session.add(org)
        session.flush()
        org_id = org.id

    def stored() -> str:
        with ctx.sessions() as session:
            row = session.get(Organization, org_id)
            assert row is not None
            return row.webhook_secret

    assert sweep.run(context=ctx)["secrets"] >= 1
    sealed = stored()
    assert sealed.startswith(secrets.PREFIX)
    assert secrets.unseal(ctx.settings, sealed) == "whsec_legacy_plain"
    assert sweep.run(context=ctx)["secrets"] == 0  # nothing left to do

    old_key, new_key = ctx.settings.secrets_key, "rotated-" + "r" * 40
    rotated = ctx.settings.model_copy(
        update={"secrets_key": new_key, "secrets_key_previous": old_key}
    )
    ctx.settings = rotated
    try:
        assert sweep.run(context=ctx)["secrets"] >= 1
        after = stored()
        only_new = rotated.model_copy(update={"secrets_key_previous": ""})
        assert secrets.unseal(only_new, after) == "whsec_legacy_plain"
    finally:
        ctx.settings = ctx.settings.model_copy(
            update={"secrets_key": old_key, "secrets_key_previous": new_key}
        )
        sweep.run(context=ctx)  # back under the suite's key for the tests after this one
        ctx.settings = ctx.settings.model_copy(update={"secrets_key_previous": ""})


def test_without_a_previous_key_the_sweep_only_seals_plaintext_secrets(
    ctx: WorkerContext, caplog: pytest.LogCaptureFixture
) -> None:
    """With LIVERSCAN_SECRETS_KEY_PREVIOUS empty no row can be under an old key: the sweep seals
    plaintext rows and leaves sealed ones alone. A row no configured key opens (sealed elsewhere)
    is not decrypted again every sweep, so the log does not repeat an error for it each run."""
    from api.domain import secrets
    from api.domain.models import Organization

    assert ctx.settings.secrets_keys_previous == ()
    elsewhere = ctx.settings.model_copy(update={"secrets_key": "elsewhere-" + "e" * 40})
    foreign = secrets.seal(elsewhere, "whsec_sealed_elsewhere")
    with ctx.sessions.begin() as session:
        orgs = [
            Organization(name="plain clinic", webhook_secret="whsec_still_plain"),
            Organization(name="restored clinic", webhook_secret=foreign),
        ]
        session.add_all(orgs)
        session.flush()
        plain_id, foreign_id = (org.id for org in orgs)

    def stored(org_id: uuid.UUID) -> str:
        with ctx.sessions() as session:
            row = session.get(Organization, org_id)
            assert row is not None
            return row.webhook_secret

    try:
        with caplog.at_level(logging.ERROR, logger="api.domain.secrets"):
            results = [sweep.run(context=ctx)["secrets"] for _ in range(3)]
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert results[0] >= 1 and results[1:] == [0, 0]
        assert secrets.unseal(ctx.settings, stored(plain_id)) == "whsec_still_plain"
        assert stored(foreign_id) == foreign  # untouched, still readable with its own key
    finally:
        with ctx.sessions.begin() as session:
            session.execute(delete(Organization).where(Organization.id.in_([plain_id, foreign_id])))
