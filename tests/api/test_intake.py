"""Submit ordering: bytes before the row, the row before the message; failures leave nothing behind
(bytes the store cannot delete then are owed to the sweep, never left unrecorded)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import Connection, Engine, event, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.domain import intake, uploads
from api.domain.db import make_engine
from api.domain.errors import DatabaseUnavailable, StorageUnavailable
from api.domain.models import Job, Organization
from api.domain.queue import CeleryQueue
from api.domain.retention import PendingDeletion
from api.domain.settings import Settings
from api.domain.storage import LocalStorage
from tests.api.conftest import BROKER_URL, png_bytes
from worker import sweep
from worker.context import WorkerContext


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


class DeletesRefused(LocalStorage):
    """A local store whose deletes fail as during an outage (puts and reads answered just before)
    until `down` is cleared: the store is back."""

    down = True

    def delete(self, key: str) -> None:
        if self.down:
            raise StorageUnavailable(details={"reason": "EndpointConnectionError"})
        super().delete(key)


@pytest.fixture
def refusing_store(settings: Settings) -> DeletesRefused:
    """The test's local store, refusing deletes."""
    assert settings.storage_dir is not None
    return DeletesRefused(settings.storage_dir)


@pytest.fixture
def org(session: Session) -> Organization:
    """An organization of the test's transaction."""
    org = Organization(name="Clinic", webhook_secret="whsec_x")
    session.add(org)
    session.commit()
    return org


def _stored_keys(store: LocalStorage) -> set[str]:
    return {p.relative_to(store.root).as_posix() for p in _files(store.root)}


def _owed(session: Session) -> dict[str, uuid.UUID | None]:
    """The keys owed a deletion, with the job each names."""
    session.expire_all()
    return {row.key: row.job_id for row in session.scalars(select(PendingDeletion))}


@pytest.fixture
def sweep_now(
    settings: Settings,
    refusing_store: DeletesRefused,
    session_factory: sessionmaker[Session],
    engine: Engine,
) -> Callable[[], dict[str, int]]:
    """One run of the periodic sweep against the test's transaction and store, when called."""
    ctx = WorkerContext(
        settings=settings,
        engine=engine,
        sessions=session_factory,
        storage=refusing_store,
        queue=CeleryQueue(BROKER_URL),
    )
    return lambda: sweep.run(context=ctx)


@pytest.fixture
def failing_job_insert(connection: Connection) -> Iterator[list[BaseException]]:
    """Append an exception to the list and the next INSERT INTO jobs raises it (once), after the
    upload's bytes were stored: the database refusing the job's transaction."""
    faults: list[BaseException] = []

    def refuse(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> Any:
        if faults and statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            raise faults.pop()
        return statement, params

    event.listen(connection, "before_cursor_execute", refuse, retval=True)
    yield faults
    event.remove(connection, "before_cursor_execute", refuse)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (
            OperationalError("INSERT INTO jobs", {}, Exception("deadlock detected")),
            DatabaseUnavailable,
        ),
        (RuntimeError("a bug"), RuntimeError),
    ],
    ids=["database-error", "unexpected-error"],
)
def test_bytes_the_store_cannot_delete_after_a_failed_insert_are_owed_to_the_sweep(
    fault: BaseException,
    expected: type[BaseException],
    session: Session,
    settings: Settings,
    refusing_store: DeletesRefused,
    org: Organization,
    failing_job_insert: list[BaseException],
    sweep_now: Callable[[], dict[str, int]],
) -> None:
    """The job's transaction failed after the scan was stored and the store is down when its bytes
    are deleted: the key is recorded in pending_deletions (committed, though the job's transaction
    rolled back) and the sweep deletes it once the store is back."""
    failing_job_insert.append(fault)
    with pytest.raises(expected):
        intake.submit(
            session, settings=settings, storage=refusing_store, queue=CeleryQueue(BROKER_URL),
            org_id=org.id, user_id=None, upload=intake.Upload(png_bytes(), "a.png", "image/png"),
        )  # fmt: skip
    assert session.scalars(select(Job)).all() == []
    stored = _stored_keys(refusing_store)
    assert len(stored) == 1  # the scan, still in the store
    assert _owed(session) == {stored.pop(): None}

    assert sweep_now()["deletions_pending"] == 1
    refusing_store.down = False
    assert sweep_now()["deletions_pending"] == 0
    assert _files(refusing_store.root) == []
    assert _owed(session) == {}


def test_a_slot_the_store_cannot_delete_after_its_job_copied_it_is_owed_to_the_sweep(
    session: Session,
    settings: Settings,
    refusing_store: DeletesRefused,
    org: Organization,
    sweep_now: Callable[[], dict[str, int]],
    broker: redis.Redis,
) -> None:
    """A job made from a direct-to-store upload holds its own copy; the slot's copy, which the
    store refused to delete, is owed (naming the job) and the sweep deletes it once the store is
    back, leaving the job's input alone."""
    slot, _ = uploads.create(
        session, settings=settings, storage=refusing_store, org_id=org.id, user_id=None,
        filename="a.png", content_type="image/png",
    )  # fmt: skip
    session.commit()
    refusing_store.put(slot.key, png_bytes(), "image/png")

    sub = intake.submit(
        session, settings=settings, storage=refusing_store, queue=CeleryQueue(BROKER_URL),
        org_id=org.id, user_id=None, upload=intake.Upload(b"", None, None), upload_id=slot.id,
    )  # fmt: skip
    assert sub.created and broker.llen("inference") == 1
    assert _owed(session) == {slot.key: sub.job.id}

    refusing_store.down = False
    assert sweep_now()["deletions_pending"] == 0
    assert _stored_keys(refusing_store) == {sub.job.input_key}
    assert refusing_store.get(sub.job.input_key) == png_bytes()


def _submit_with_the_database_down(tmp_path: Path, store: LocalStorage) -> None:
    """Submit one scan with the database unreachable: database_unavailable."""
    settings = Settings(
        env="test",
        data_dir=tmp_path,
        database_url="postgresql+psycopg2://postgres@127.0.0.1:1/x",
        broker_url=BROKER_URL,
    )
    with sessionmaker(bind=make_engine(settings))() as session:
        with pytest.raises(DatabaseUnavailable) as info:
            intake.submit(
                session, settings=settings, storage=store, queue=CeleryQueue(BROKER_URL),
                org_id=uuid.uuid4(), user_id=None, upload=intake.Upload(png_bytes(), "a.png", "image/png"),
            )  # fmt: skip
    assert info.value.code == "database_unavailable"


def test_database_down_after_storing_deletes_the_bytes(tmp_path: Path, broker: redis.Redis) -> None:
    _submit_with_the_database_down(tmp_path, LocalStorage(tmp_path / "store"))
    assert _files(tmp_path / "store") == []
    assert broker.llen("inference") == 0


def test_database_and_store_both_down_log_the_orphaned_key_for_an_operator(
    tmp_path: Path, broker: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing can be recorded without the database: the key is logged as an error, and the
    client still gets database_unavailable (not whatever the failed recording raised)."""
    store = DeletesRefused(tmp_path / "store")
    with caplog.at_level(logging.ERROR):
        _submit_with_the_database_down(tmp_path, store)
    (key,) = _stored_keys(store)
    assert any(r.levelno >= logging.ERROR and key in r.getMessage() for r in caplog.records)


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


def test_a_losing_idempotent_submit_replays_the_winner_and_owes_its_bytes(
    pg_url: str, tmp_path: Path, broker: redis.Redis
) -> None:
    """Another request with the same Idempotency-Key commits while this one stores its bytes; the
    store then refuses to delete this one's copy. It still replays the winner's job (no 503) and
    its copy is owed to the sweep. Real commits on PostgreSQL (cleaned up afterwards)."""
    from sqlalchemy import delete

    from api.domain import jobs
    from api.domain.models import AuditEvent
    from api.domain.storage import job_key

    settings = Settings(env="test", data_dir=tmp_path, database_url=pg_url, broker_url=BROKER_URL)
    engine = make_engine(settings)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    store = DeletesRefused(tmp_path / "store")
    data = png_bytes(seed=7)
    with factory.begin() as s:
        org = Organization(name="Retry clinic", webhook_secret="whsec_retry")
        s.add(org)
    winner_id = uuid.uuid4()

    class WinnerCommitsMeanwhile(CeleryQueue):
        def ping(self) -> None:  # after this request's idempotency check, before its insert
            with factory.begin() as other:
                stored = store.put(job_key(org.id, winner_id, "input"), data, "image/png")
                jobs.create_job(
                    other, org_id=org.id, upload=stored, job_id=winner_id, idempotency_key="k-1"
                )

    try:
        with factory() as session:
            sub = intake.submit(
                session, settings=settings, storage=store, queue=WinnerCommitsMeanwhile(BROKER_URL),
                org_id=org.id, user_id=None, upload=intake.Upload(data, "a.png", "image/png"),
                idempotency_key="k-1",
            )  # fmt: skip
            assert (sub.job.id, sub.created) == (winner_id, False)
            winner_key = job_key(org.id, winner_id, "input")
            (loser_key,) = _stored_keys(store) - {winner_key}
            assert _owed(session) == {loser_key: None}
    finally:
        with factory.begin() as s:
            s.execute(delete(PendingDeletion).where(PendingDeletion.key.like(f"{org.id}/%")))
            s.execute(delete(AuditEvent).where(AuditEvent.org_id == org.id))
            s.execute(delete(Job).where(Job.org_id == org.id))
            s.execute(delete(Organization).where(Organization.id == org.id))
        engine.dispose()
