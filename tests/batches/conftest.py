"""Batch tests reuse the API fixtures: PostgreSQL and SQLite, a local store, real Redis."""

from __future__ import annotations

from tests.api.conftest import (  # noqa: F401  (fixtures re-exported for this package)
    app,
    broker,
    client,
    database_url,
    engine,
    pg_url,
    settings,
    sqlite_url,
    storage,
    user_headers,
)
