"""Per-process resources of a worker (settings, database, store, queue), created lazily after fork."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.domain.db import make_engine, make_session_factory
from api.domain.queue import Queue, make_queue
from api.domain.settings import Settings, get_settings
from api.domain.storage import Storage, make_storage


@dataclass
class WorkerContext:
    """What a task needs besides the model: one engine, session factory, store and queue."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    storage: Storage
    queue: Queue

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        """Build every resource from the settings."""
        engine = make_engine(settings)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            storage=make_storage(settings),
            queue=make_queue(settings),
        )


_lock = threading.Lock()
_context: WorkerContext | None = None


def get_context() -> WorkerContext:
    """This process's context, built on first use (never in the prefork parent before fork)."""
    global _context
    if _context is None:
        with _lock:
            if _context is None:
                _context = WorkerContext.from_settings(get_settings())
    return _context


def set_context(context: WorkerContext | None) -> None:
    """Replace this process's context (tests, embedded runner)."""
    global _context
    with _lock:
        _context = context
