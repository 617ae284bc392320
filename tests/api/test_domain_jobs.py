"""The job state machine and the sweep query, on PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session

from api.domain import jobs
from api.domain.errors import InvalidTransition, JobNotFound
from api.domain.models import Job, JobStatus, Organization, utcnow
from api.domain.storage import StoredObject


@pytest.fixture
def job(session: Session) -> Job:
    """A queued job in a fresh organization."""
    org = Organization(name="Clinic", webhook_secret="whsec_test")
    session.add(org)
    session.flush()
    job_id = uuid.uuid4()
    upload = StoredObject(
        key=f"{org.id}/{job_id}/input", size=3, sha256="a" * 64, content_type="image/png"
    )
    return jobs.create_job(session, org_id=org.id, upload=upload, job_id=job_id, filename="x.png")


def _succeed(session: Session, job_id: uuid.UUID, label: str = "tumor") -> Job:
    return jobs.mark_succeeded(
        session, job_id, label=label, probability=0.9, threshold=0.5,
        model_name="m", model_version="1", model_sha256="f" * 64,
    )  # fmt: skip


def test_happy_path_sets_timestamps_and_attempts(session: Session, job: Job) -> None:
    assert job.status is JobStatus.QUEUED and job.attempts == 0
    jobs.mark_processing(session, job.id)
    assert job.status is JobStatus.PROCESSING and job.attempts == 1 and job.started_at is not None
    _succeed(session, job.id)
    assert job.status is JobStatus.SUCCEEDED
    assert job.finished_at is not None and job.finished_at >= job.started_at
    assert job.finished_at.tzinfo is not None


def test_terminal_states_are_final_and_marks_idempotent(session: Session, job: Job) -> None:
    jobs.mark_processing(session, job.id)
    _succeed(session, job.id, label="tumor")
    finished = job.finished_at
    _succeed(session, job.id, label="normal")  # a redelivered task finishing again
    jobs.mark_failed(session, job.id, error_code="late", error_message="too late")
    jobs.mark_rejected(session, job.id, reason_code="not_liver", validation={"passed": False})
    after = jobs.mark_processing(session, job.id)
    assert after.status is JobStatus.SUCCEEDED
    assert job.label == "tumor" and job.error_code is None and job.reason_code is None
    assert job.finished_at == finished and job.attempts == 1


def test_a_locked_row_is_used_only_for_its_own_job(session: Session, job: Job) -> None:
    """`locked=` saves a read of the same job; another job's row passed by mistake is ignored, so
    the mark lands on the job whose id was given, never on the row handed in."""
    other = jobs.create_job(
        session,
        org_id=job.org_id,
        upload=StoredObject(key=f"{job.org_id}/o/input", size=3, sha256="b" * 64,
                            content_type="image/png"),
        job_id=uuid.uuid4(),
        filename="y.png",
    )  # fmt: skip
    locked = jobs.lock(session, job.id)
    assert locked is job and jobs.lock(session, uuid.uuid4()) is None
    jobs.mark_processing(session, job.id, locked=locked)
    jobs.mark_processing(session, other.id, locked=locked)
    jobs.mark_failed(session, other.id, error_code="x", error_message="y", locked=locked)
    assert job.status is JobStatus.PROCESSING and job.attempts == 1 and job.error_code is None
    assert other.status is JobStatus.FAILED and other.error_code == "x"


def test_redelivery_goes_back_to_queued_and_counts_attempts(session: Session, job: Job) -> None:
    jobs.mark_processing(session, job.id)
    jobs.requeue(session, job.id)
    assert job.status is JobStatus.QUEUED
    jobs.mark_processing(session, job.id)
    jobs.mark_processing(session, job.id)  # a duplicate delivery while processing
    assert job.status is JobStatus.PROCESSING and job.attempts == 3


def test_cannot_succeed_without_processing(session: Session, job: Job) -> None:
    with pytest.raises(InvalidTransition) as info:
        _succeed(session, job.id)
    assert info.value.code == "invalid_transition"
    failed = jobs.mark_failed(session, job.id, error_code="input_missing", error_message="gone")
    assert failed.status is JobStatus.FAILED


def test_unknown_job_is_job_not_found(session: Session) -> None:
    with pytest.raises(JobNotFound):
        jobs.mark_processing(session, uuid.uuid4())
    assert jobs.get(session, uuid.uuid4()) is None


def test_get_is_scoped_to_the_organization(session: Session, job: Job) -> None:
    assert jobs.get(session, job.id, org_id=job.org_id) is job
    assert jobs.get(session, job.id, org_id=uuid.uuid4()) is None
    with pytest.raises(JobNotFound):
        jobs.get_or_raise(session, job.id, org_id=uuid.uuid4())


def test_stuck_jobs_finds_stale_queued_and_processing_only(session: Session, job: Job) -> None:
    assert list(jobs.stuck_jobs(session, timedelta(minutes=5))) == []
    job.updated_at = utcnow() - timedelta(minutes=10)
    session.flush()
    assert [j.id for j in jobs.stuck_jobs(session, timedelta(minutes=5))] == [job.id]
    jobs.mark_processing(session, job.id)
    job.updated_at = utcnow() - timedelta(minutes=10)
    session.flush()
    assert [j.id for j in jobs.stuck_jobs(session, timedelta(minutes=5))] == [job.id]
    jobs.mark_failed(session, job.id, error_code="x", error_message="y")
    job.updated_at = utcnow() - timedelta(minutes=10)
    session.flush()
    assert list(jobs.stuck_jobs(session, timedelta(minutes=5))) == []
