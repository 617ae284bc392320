"""Scale fixtures: a PostgreSQL database and Redis databases of these tests' own, a worker context."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from api.domain.settings import Settings
from tests.e2e.e2e_support import DATA, fresh_postgres_database
from worker.context import WorkerContext, set_context

DB_NAME = "liverscan_scale_tests"
BROKER_URL = "redis://127.0.0.1:6379/5"  # this suite's own Redis databases: 5 (and 6)


@pytest.fixture(scope="session")
def database_url() -> str:
    """A freshly created PostgreSQL database upgraded to the Alembic head."""
    return fresh_postgres_database(DB_NAME)


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    """The Redis database behind the queue, empty at the start and end of each test."""
    client = redis.Redis.from_url(BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """PostgreSQL, Redis, a local store; batches of 4 gathered for up to 200 ms."""
    return Settings(
        env="test",
        data_dir=tmp_path,
        database_url=database_url,
        broker_url=BROKER_URL,
        storage_backend="local",
        storage_dir=tmp_path / "store",
        worker_batch_size=4,
        worker_batch_wait_ms=200,
        sweep_deadline_s=60,
    )


@pytest.fixture
def ctx(settings: Settings, broker: redis.Redis) -> Iterator[WorkerContext]:
    """The worker context the pipeline and the sweep use in this process."""
    context = WorkerContext.from_settings(settings)
    set_context(context)
    yield context
    set_context(None)
    context.engine.dispose()


@pytest.fixture(scope="session")
def liver_slices() -> list[np.ndarray]:
    """Six distinct liver CT slices of 3Dircadb1.7 windowed W400/L50, uint8 (512, 512)."""
    from ml_core.preprocessing import window

    path = DATA / "ircadb" / "3Dircadb1.7.npz"
    if not path.is_file():
        pytest.skip("../shared/data is not available")
    with np.load(path) as volume:
        order = np.argsort(-volume["liver"].sum(axis=(1, 2)))[:6]
        return [window(volume["ct_hu"][int(z)].astype(np.float32)) for z in order]
