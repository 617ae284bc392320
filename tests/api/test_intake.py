"""Submit ordering: bytes before the row, the row before the message; failures leave nothing behind."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.domain import intake
from api.domain.db import make_engine
from api.domain.errors import DatabaseUnavailable
from api.domain.models import Job, Organization
from api.domain.queue import CeleryQueue
from api.domain.settings import Settings
from api.domain.storage import LocalStorage
from tests.api.conftest import BROKER_URL, png_bytes


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_database_down_after_storing_deletes_the_bytes(tmp_path: Path, broker: redis.Redis) -> None:
    settings = Settings(
        env="test",
        data_dir=tmp_path,
        database_url="postgresql+psycopg2://postgres@127.0.0.1:1/x",
        broker_url=BROKER_URL,
    )
    storage = LocalStorage(tmp_path / "store")
    with sessionmaker(bind=make_engine(settings))() as session:
        with pytest.raises(DatabaseUnavailable) as info:
            intake.submit(
                session, settings=settings, storage=storage, queue=CeleryQueue(BROKER_URL),
                org_id=uuid.uuid4(), user_id=None, upload=intake.Upload(png_bytes(), "a.png", "image/png"),
            )  # fmt: skip
    assert info.value.code == "database_unavailable"
    assert _files(tmp_path / "store") == []
    assert broker.llen("inference") == 0


def test_enqueue_failure_after_commit_keeps_the_queued_row_for_the_sweep(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    org = Organization(name="Clinic", webhook_secret="whsec_x")
    session.add(org)
    session.commit()

    class BrokerDiesAfterPing(CeleryQueue):
        def ping(self) -> None:  # the broker answered the pre-check, then went away
            return None

    storage = LocalStorage(tmp_path / "store")
    result = intake.submit(
        session, settings=settings, storage=storage, queue=BrokerDiesAfterPing("redis://127.0.0.1:1/0"),
        org_id=org.id, user_id=None, upload=intake.Upload(png_bytes(), "a.png", "image/png"),
    )  # fmt: skip
    assert result.created and not result.enqueued
    row = session.scalars(select(Job)).one()
    assert row.status.value == "queued"
    assert storage.get(row.input_key) == png_bytes()


def _lose_the_answer_of_the_first_commit(
    monkeypatch: pytest.MonkeyPatch, session: Session, *, committed: bool, then_down: bool = False
) -> None:
    """The first COMMIT fails the way a connection dropped mid-COMMIT does (OperationalError),
    having committed (only its answer was lost) or not; later commits behave. `then_down`: the
    database answers no query afterwards."""
    real_commit = session.commit
    calls = []

    def lost() -> OperationalError:
        return OperationalError("COMMIT", {}, Exception("server closed the connection"))

    def commit() -> None:
        calls.append(1)
        if len(calls) > 1:
            return real_commit()
        if committed:
            real_commit()
        else:
            session.rollback()
        if then_down:
            monkeypatch.setattr(session, "scalar", lambda *a, **k: (_ for _ in ()).throw(lost()))
        raise lost()

    monkeypatch.setattr(session, "commit", commit)


def _org(session: Session) -> Organization:
    org = Organization(name="Clinic", webhook_secret="whsec_x")
    session.add(org)
    session.commit()
    return org


def test_a_commit_whose_answer_was_lost_keeps_the_job_and_its_upload(
    session: Session, settings: Settings, tmp_path: Path, broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The row is committed although COMMIT raised: the job is accepted (202, enqueued) and its
    bytes stay; deleting them would leave a queued job that can only fail."""
    org = _org(session)
    storage = LocalStorage(tmp_path / "store")
    _lose_the_answer_of_the_first_commit(monkeypatch, session, committed=True)
    result = intake.submit(
        session, settings=settings, storage=storage, queue=CeleryQueue(BROKER_URL),
        org_id=org.id, user_id=None, upload=intake.Upload(png_bytes(), "a.png", "image/png"),
    )  # fmt: skip
    assert result.created and result.enqueued
    row = session.scalars(select(Job).where(Job.org_id == org.id)).one()
    assert row.id == result.job.id
    assert storage.get(row.input_key) == png_bytes()
    assert broker.llen("inference") == 1


def test_a_commit_that_failed_deletes_the_bytes(
    session: Session, settings: Settings, tmp_path: Path, broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """COMMIT raised and nothing was committed: 503 database_unavailable, no row, no bytes."""
    org = _org(session)
    storage = LocalStorage(tmp_path / "store")
    _lose_the_answer_of_the_first_commit(monkeypatch, session, committed=False)
    with pytest.raises(DatabaseUnavailable) as info:
        intake.submit(
            session, settings=settings, storage=storage, queue=CeleryQueue(BROKER_URL),
            org_id=org.id, user_id=None, upload=intake.Upload(png_bytes(), "a.png", "image/png"),
        )  # fmt: skip
    assert info.value.code == "database_unavailable"
    assert session.scalars(select(Job).where(Job.org_id == org.id)).all() == []
    assert _files(tmp_path / "store") == []
    assert broker.llen("inference") == 0


def test_a_commit_nobody_can_check_keeps_the_bytes(
    session: Session, settings: Settings, tmp_path: Path, broker: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """COMMIT raised and the database is gone before anyone can tell whether it committed: 503,
    but the bytes stay (a committed job would be re-driven by the sweep and need them)."""
    org = _org(session)
    storage = LocalStorage(tmp_path / "store")
    _lose_the_answer_of_the_first_commit(monkeypatch, session, committed=False, then_down=True)
    with pytest.raises(DatabaseUnavailable):
        intake.submit(
            session, settings=settings, storage=storage, queue=CeleryQueue(BROKER_URL),
            org_id=org.id, user_id=None, upload=intake.Upload(png_bytes(), "a.png", "image/png"),
        )  # fmt: skip
    assert [p.read_bytes() for p in _files(tmp_path / "store")] == [png_bytes()]
    assert broker.llen("inference") == 0


def test_concurrent_submits_with_one_idempotency_key_make_one_job(
    pg_url: str, tmp_path: Path, broker: redis.Redis
) -> None:
    """Real commits on PostgreSQL from several threads at once (cleaned up afterwards)."""
    import threading

    from sqlalchemy import delete

    from api.domain.models import AuditEvent

    settings = Settings(env="test", data_dir=tmp_path, database_url=pg_url, broker_url=BROKER_URL)
    engine = make_engine(settings)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    storage = LocalStorage(tmp_path / "store")
    with factory() as s:
        org = Organization(name="Race clinic", webhook_secret="whsec_race")
        s.add(org)
        s.commit()
    data = png_bytes(seed=42)
    barrier = threading.Barrier(4)
    outcomes: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with factory() as session:
                barrier.wait(timeout=10)
                sub = intake.submit(
                    session, settings=settings, storage=storage, queue=CeleryQueue(BROKER_URL),
                    org_id=org.id, user_id=None, upload=intake.Upload(data, "a.png", "image/png"),
                    idempotency_key="race-1",
                )  # fmt: skip
                outcomes.append((str(sub.job.id), sub.created))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert errors == []
        assert len({job_id for job_id, _ in outcomes}) == 1
        assert sum(created for _, created in outcomes) == 1
        assert len(_files(tmp_path / "store")) == 1  # the losers' bytes were deleted
        assert broker.llen("inference") == 1
    finally:
        with factory() as s:
            s.execute(delete(AuditEvent).where(AuditEvent.org_id == org.id))
            s.execute(delete(Job).where(Job.org_id == org.id))
            s.execute(delete(Organization).where(Organization.id == org.id))
            s.commit()
        engine.dispose()
