"""Store keys owed a deletion (pending_deletions), recorded while the sweep deletes them, on
PostgreSQL and SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete
from sqlalchemy.orm import Session, sessionmaker

from api.domain import retention
from api.domain.retention import PendingDeletion
from api.domain.storage import LocalStorage


@pytest.fixture
def sessions(engine: Engine) -> Iterator[sessionmaker[Session]]:
    """Sessions that commit for real (two of them race); the keys they owe are removed after."""
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    yield factory
    with factory.begin() as session:
        session.execute(delete(PendingDeletion).where(PendingDeletion.key.like("blocked/%")))


@pytest.fixture
def failing_store(tmp_path: Path) -> LocalStorage:
    """A local folder whose `blocked/...` keys cannot be deleted: a file stands where their folder
    should be (the store answers storage_unavailable, as during an outage)."""
    store = LocalStorage(tmp_path / "store")
    store.root.mkdir(parents=True, exist_ok=True)
    (store.root / "blocked").write_bytes(b"not a folder")
    return store


def _owed(sessions: sessionmaker[Session], key: str) -> PendingDeletion | None:
    with sessions() as session:
        return session.get(PendingDeletion, key)


def test_a_key_that_keeps_failing_is_owed_once_with_its_attempts_counted(
    sessions: sessionmaker[Session], failing_store: LocalStorage
) -> None:
    key = f"blocked/{uuid.uuid4()}/heatmap.png"
    for _ in range(2):
        with sessions.begin() as session:
            assert retention.delete_or_defer(session, failing_store, [key], job_id=None) == (0, 1)
    row = _owed(sessions, key)
    assert row is not None and row.attempts == 2
    assert row.error is not None and row.error.startswith("NotADirectoryError")


def test_a_deletion_failing_while_the_sweep_deletes_its_owed_row_keeps_the_key_owed(
    engine: Engine, sessions: sessionmaker[Session], failing_store: LocalStorage
) -> None:
    """A DELETE request reads the key's row, the sweep deletes that row and commits, then the
    request's own deletion of the key fails: no StaleDataError (a 500), and the key is owed."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite's BEGIN IMMEDIATE serialises the two transactions: no such race")
    key = f"blocked/{uuid.uuid4()}/heatmap.png"
    with sessions.begin() as session:
        session.add(PendingDeletion(key=key, job_id=None, error="earlier outage"))
    with sessions() as request:
        read = request.get(PendingDeletion, key)  # read (and held) before the sweep commits
        assert read is not None
        with sessions.begin() as sweep:
            sweep.execute(delete(PendingDeletion).where(PendingDeletion.key == key))
        assert retention.delete_or_defer(request, failing_store, [key], job_id=None) == (0, 1)
        request.commit()
    row = _owed(sessions, key)
    assert row is not None and row.attempts == 1
