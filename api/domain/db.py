"""Engines and sessions; the caller (request or task) owns the transaction and commits once."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.domain.errors import DatabaseUnavailable
from api.domain.settings import Settings

log = logging.getLogger(__name__)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling breaks SAVEPOINTs; let SQLAlchemy emit BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a worker process writes; foreign keys are off by default in SQLite.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front, so concurrent units of work wait (busy_timeout)
    # instead of failing with "database is locked" when a deferred reader upgrades to a writer.
    # Read-only probes opt out with execution_options(sqlite_begin="DEFERRED").
    mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
    conn.exec_driver_sql(f"BEGIN {mode}")


def make_engine(settings: Settings, **kwargs: Any) -> Engine:
    """Create the engine for `settings.database_url` (SQLite file folders are created)."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {"check_same_thread": False, "timeout": 10})
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    # All of it as the pool proper, no overflow: SQLAlchemy's default (5 + 10 overflow) has the
    # same ceiling but closes every connection returned beyond the 5th, so a worker's 32 threads
    # kept opening and closing PostgreSQL connections.
    kwargs.setdefault("pool_size", settings.db_pool_size)
    kwargs.setdefault("max_overflow", 0)
    kwargs.setdefault("connect_args", {"connect_timeout": 5})
    return create_engine(url, **kwargs)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error, close always."""
    session = factory()
    try:
        yield session
        session.commit()
    except (OperationalError, DBAPIError) as exc:
        session.rollback()
        if getattr(exc, "connection_invalidated", False) or isinstance(exc, OperationalError):
            raise DatabaseUnavailable(details={"reason": type(exc.orig).__name__}) from exc
        raise
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def rows_deleted(result: object) -> int:
    """Rows a DELETE statement removed (0 where the driver does not say)."""
    return int(getattr(result, "rowcount", 0) or 0)


def ping(engine: Engine) -> None:
    """Raise DatabaseUnavailable unless a trivial query succeeds."""
    try:
        with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # any driver error means "not ready"
        log.warning("database ping failed: %s", exc)
        raise DatabaseUnavailable(details={"reason": type(exc).__name__}) from exc
