"""The database pool of a process whose threads share one engine (a threads-pool worker)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from api.domain.db import make_engine, make_session_factory, session_scope
from tests.api.conftest import base_settings

THREADS = 32  # a worker's default: 2 x batch 16


def _hammer(engine: Any, rounds: int = 15) -> None:
    sessions = make_session_factory(engine)
    start = threading.Barrier(THREADS)

    def work() -> None:
        start.wait()
        for _ in range(rounds):
            with session_scope(sessions) as session:
                session.execute(text("SELECT pg_sleep(0.002)"))

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_worker_threads_keep_their_postgres_connections(pg_url: str, tmp_path: Path) -> None:
    # 32 threads against a pool of 12: at most 12 connections are ever opened and none is
    # closed while the process lives (SQLAlchemy's 5 + 10 overflow closed every one beyond 5).
    engine = make_engine(base_settings(tmp_path, pg_url, db_pool_size=12))
    opened: list[int] = []
    closed: list[int] = []
    event.listen(engine, "connect", lambda *_: opened.append(1))
    event.listen(engine, "close", lambda *_: closed.append(1))
    try:
        _hammer(engine)
        assert 1 < len(opened) <= 12
        assert closed == []
        assert engine.pool.size() == 12
    finally:
        engine.dispose()
