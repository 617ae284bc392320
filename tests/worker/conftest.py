"""Worker fixtures: a migrated PostgreSQL database of its own, a local store, a real Redis queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api.domain.settings import Settings
from tests.e2e.e2e_support import fresh_postgres_database  # the repo root is on sys.path
from worker.context import WorkerContext, set_context

DB_NAME = "liverscan_worker_tests"
REDIS_DB = 13  # a Redis database of these tests' own; flushed per test
BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


@pytest.fixture(scope="session")
def database_url() -> str:
    """A freshly created PostgreSQL database upgraded to the Alembic head."""
    return fresh_postgres_database(DB_NAME)


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    """The Redis database the worker's queue publishes to, empty at the start of each test."""
    client = redis.Redis.from_url(BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Test settings: PostgreSQL, Redis, a local store, loopback callbacks allowed, fast backoff."""
    return Settings(
        env="test",
        data_dir=tmp_path,
        database_url=database_url,
        broker_url=BROKER_URL,
        storage_backend="local",
        storage_dir=tmp_path / "store",
        webhook_allow_private=True,
        webhook_max_attempts=3,
        webhook_backoff_base_s=1.0,
        webhook_timeout_s=2.0,
        sweep_deadline_s=60,
    )


@pytest.fixture
def ctx(settings: Settings, broker: redis.Redis) -> Iterator[WorkerContext]:
    """The worker context the pipeline, webhooks and sweep use in this process."""
    context = WorkerContext.from_settings(settings)
    set_context(context)
    yield context
    set_context(None)
    context.engine.dispose()
