"""Worker fixtures: a migrated PostgreSQL database of its own, a local store, a real Redis queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from api.domain.settings import Settings
from worker.context import WorkerContext, set_context

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
DB_NAME = "liverscan_worker_tests"
REDIS_DB = 13  # a Redis database of these tests' own; flushed per test
BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


@pytest.fixture(scope="session")
def database_url() -> str:
    """A freshly created PostgreSQL database upgraded to the Alembic head."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{DB_NAME}"'))
    admin.dispose()
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{DB_NAME}"
    engine = create_engine(url)
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    engine.dispose()
    return url


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
