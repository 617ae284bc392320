"""The app's shared resources (settings, database, store, queue) and the request-scoped session."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app, g
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.domain.db import make_engine, make_session_factory
from api.domain.queue import Queue, make_queue
from api.domain.settings import Settings
from api.domain.storage import Storage, make_storage

EXTENSION_KEY = "liverscan"


@dataclass
class Resources:
    """Long-lived objects one app instance uses."""

    settings: Settings
    engine: Engine | None
    session_factory: sessionmaker[Session]
    storage: Storage
    queue: Queue


def build_resources(settings: Settings) -> Resources:
    """Resources for these settings (engine, session factory, store, queue)."""
    engine = make_engine(settings)
    return Resources(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        storage=make_storage(settings),
        queue=make_queue(settings),
    )


def resources() -> Resources:
    """The current app's resources."""
    res: Resources = current_app.extensions[EXTENSION_KEY]
    return res


def db() -> Session:
    """The request's database session (opened lazily, closed at the end of the request)."""
    if "db_session" not in g:
        g.db_session = resources().session_factory()
    session: Session = g.db_session
    return session


def close_db(_exc: BaseException | None = None) -> None:
    """Close the request's session, rolling back anything not committed."""
    session: Session | None = g.pop("db_session", None)
    if session is not None:
        session.close()
