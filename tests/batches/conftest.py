"""Batch tests reuse the API fixtures: PostgreSQL and SQLite, a local store, real Redis."""

from __future__ import annotations

from tests.api.conftest import (  # noqa: F401  (fixtures re-exported for this package)
    app,
    broker,
    client,
    connection,
    database_url,
    engine,
    pg_url,
    session,
    session_factory,
    settings,
    sqlite_url,
    storage,
    user_headers,
)
