"""Two workers finishing a batch's last two jobs at the same moment fire `batch.completed` exactly
once, never zero times (real PostgreSQL, two connections, READ COMMITTED)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from api.domain import batches, jobs
from api.domain.models import Batch, Job, JobStatus, Organization, WebhookDelivery, utcnow
from tests.e2e.e2e_support import fresh_postgres_database


@pytest.fixture(scope="module")
def pg_engine() -> Iterator[Engine]:
    """A freshly migrated PostgreSQL database of this module."""
    engine = create_engine(fresh_postgres_database("liverscan_batches_race"))
    yield engine
    engine.dispose()


def sealed_batch_of_two(sessions: sessionmaker[Session]) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A sealed batch with a callback URL and two jobs already processing."""
    with sessions() as session:
        org = Organization(name="Race clinic", webhook_secret="whsec_test")
        session.add(org)
        session.flush()
        batch = Batch(
            org_id=org.id,
            callback_url="https://hooks.example/batch",
            file_count=2,
            rejected=[],
            sealed_at=utcnow(),
        )
        session.add(batch)
        session.flush()
        ids = []
        for n in range(2):
            job = Job(
                org_id=org.id,
                batch_id=batch.id,
                status=JobStatus.PROCESSING,
                input_key=f"{org.id}/{uuid.uuid4()}/input",
                input_sha256=f"{n:064d}",
            )
            session.add(job)
            session.flush()
            ids.append(job.id)
        session.commit()
        return batch.id, ids


def finish_concurrently(
    sessions: sessionmaker[Session], batch_id: uuid.UUID, ids: list[uuid.UUID]
) -> list[uuid.UUID | None]:
    """Each job marked terminal in its own transaction; both marks happen before either checks."""
    both_marked = threading.Barrier(len(ids), timeout=30)
    results: list[uuid.UUID | None] = [None] * len(ids)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with sessions() as session:
                jobs.mark_rejected(
                    session,
                    ids[k],
                    reason_code="not_liver_ct",
                    validation={"passed": False, "reason_code": "not_liver_ct", "checks": []},
                    input_meta=None,
                )
                session.flush()
                both_marked.wait()  # neither has committed: each sees the other still processing
                results[k] = batches.on_job_terminal(session, batch_id)
                session.commit()
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(ids))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return results


@pytest.mark.parametrize("attempt", range(5))
def test_last_two_jobs_finishing_together_complete_the_batch_once(
    pg_engine: Engine, attempt: int
) -> None:
    sessions = sessionmaker(bind=pg_engine, expire_on_commit=False)
    batch_id, ids = sealed_batch_of_two(sessions)
    results = finish_concurrently(sessions, batch_id, ids)
    assert sum(r is not None for r in results) == 1  # exactly one finisher fired the event

    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.completed_at is not None
        events = session.scalars(
            select(WebhookDelivery).where(
                WebhookDelivery.event == batches.COMPLETED_EVENT,
                WebhookDelivery.job_id.in_(ids),
            )
        ).all()
        assert len(events) == 1
        assert events[0].payload is not None
        assert events[0].payload["batch"]["counts"]["rejected"] == 2


def test_a_batch_whose_request_died_is_sealed_and_completed_by_the_sweep(pg_engine: Engine) -> None:
    sessions = sessionmaker(bind=pg_engine, expire_on_commit=False)
    batch_id, ids = sealed_batch_of_two(sessions)
    with sessions() as session:  # as if the API died before sealing, an hour ago
        batch = session.get(Batch, batch_id)
        assert batch is not None
        batch.sealed_at = None
        batch.created_at = utcnow() - timedelta(hours=1)
        for job_id in ids:
            job = session.get(Job, job_id)
            assert job is not None
            job.created_at = batch.created_at
            jobs.mark_failed(session, job_id, error_code="internal_error", error_message="x")
            assert batches.on_job_terminal(session, batch_id) is None  # not sealed: no event
        session.commit()

        assert batches.seal_stale(session, older_than_s=60)  # one batch.completed delivery
        session.refresh(batch)
        assert batch.sealed_at is not None and batch.completed_at is not None
        assert batches.seal_stale(session, older_than_s=60) == []  # once


def test_the_sweep_leaves_a_batch_alone_while_its_request_still_adds_jobs(
    pg_engine: Engine,
) -> None:
    # A batch POST of thousands of files takes minutes (tests/scale/test_cli_large_batch.py); one
    # that outlasts the sweep deadline is still alive as long as it keeps adding jobs. Sealing it
    # then would fire batch.completed for the jobs so far, and never for the ones still to come.
    sessions = sessionmaker(bind=pg_engine, expire_on_commit=False)
    batch_id, ids = sealed_batch_of_two(sessions)
    with sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        batch.sealed_at = None
        batch.created_at = utcnow() - timedelta(hours=1)  # receiving for an hour
        first, second = (session.get(Job, job_id) for job_id in ids)
        assert first is not None and second is not None
        first.created_at = utcnow() - timedelta(hours=1)
        second.created_at = utcnow()  # the request stored a file a moment ago
        for job_id in ids:
            jobs.mark_failed(session, job_id, error_code="undecodable", error_message="x")
        session.commit()

        assert batches.seal_stale(session, older_than_s=60) == []
        session.refresh(batch)
        assert batch.sealed_at is None and batch.completed_at is None

        second.created_at = utcnow() - timedelta(minutes=2)  # then nothing more: the request died
        session.commit()
        assert len(batches.seal_stale(session, older_than_s=60)) == 1
        session.refresh(batch)
        assert batch.sealed_at is not None and batch.completed_at is not None
