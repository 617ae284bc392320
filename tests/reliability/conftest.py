"""Fault-injection fixtures: one live stack for the package (API + one prefork Celery worker serving
a tiny random-weight model), on PostgreSQL, Redis and S3 that the tests can take away and give back.

    client ──▶ API (waitress) ──▶ PostgreSQL proxy ──▶ 127.0.0.1:5432 / liverscan_reliability
                                ──▶ redis-server of its own (port 16379+, no persistence)
                                ──▶ S3 proxy ──▶ moto server
    worker ──▶ the same three; webhooks ──▶ receiver proxy ──▶ receiver (dedupes by delivery id)
    sweep  ──▶ worker.sweep.run() every second from this process (what beat schedules)

Assertions read the database directly (5432) and the store directly (moto), not through proxies.
Each test heals the stack first, so one scenario's failure does not cascade into the next.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from api.domain.settings import Settings
from api.domain.storage import S3Storage
from tests.e2e.e2e_support import Client, base_env, fresh_postgres_database, spawn, wait_ready
from tests.live_stack import (
    Periodic,
    Receiver,
    RedisServer,
    TcpProxy,
    WorkerProcess,
    api_command,
    liver_slice_png,
    port_in,
    running_receiver,
)
from tests.reliability.accounting import RESULTS_ENV, ResultsFile, Stack

DB_NAME = "liverscan_reliability"
BUCKET = "liverscan-reliability"
# A job untouched this long is re-driven by the sweep: longer than any job here (a fresh pool
# child's first job traces the model, ~10 s on a busy machine), short enough for the test budget.
SWEEP_DEADLINE_S = 20
SWEEP_EVERY_S = 1.0


def tiny_model(folder: Path) -> Path:
    """ml_core's tiny random-weight artifact plus a gate that admits every decodable slice
    (threshold 0), so jobs run the whole pipeline (validate → predict → PNGs → PDF) in well
    under a second. Written fresh for each session (a few seconds), so it always matches ml_core."""
    from ml_core.classifier import write_untrained_artifact

    return write_untrained_artifact(folder, gate_threshold=0.0)


@pytest.fixture(scope="session")
def liver_png() -> bytes:
    """A real liver CT slice, as PNG (every job of these tests submits it)."""
    return liver_slice_png()


@pytest.fixture(scope="session")
def reliability_stack(
    s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The whole stack, started once for the package and torn down at the end."""
    logs = tmp_path_factory.mktemp("reliability-stack")
    model = tiny_model(tmp_path_factory.mktemp("reliability-model") / "liverscan-untrained")
    pg = TcpProxy(5432, port_in(15433, 15440))
    s3 = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]), port_in(18001, 18049))
    hook_port = port_in(18050, 18074)
    hooks = TcpProxy(hook_port, port_in(hook_port + 1, 18099))
    for proxy in (pg, s3, hooks):
        proxy.up()
    redis_server = RedisServer(port_in(16379, 16399), logs / "redis")
    redis_server.start()
    fresh_postgres_database(DB_NAME)
    values: dict[str, Any] = {
        "env": "test",
        "data_dir": str(logs),
        "database_url": f"postgresql+psycopg2://postgres@127.0.0.1:{pg.port}/{DB_NAME}",
        "broker_url": redis_server.url,
        "storage_backend": "s3",
        "s3_bucket": BUCKET,
        "s3_endpoint_url": f"http://127.0.0.1:{s3.port}",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "model_path": str(model),
        # The kill scenario kills prefork pool children as well as whole workers (the default
        # threads pool, where a kill is always the whole worker, is killed mid-batch in
        # tests/scale). Celery takes the pool from the app's settings, not the --pool flag.
        "worker_pool": "prefork",
        "webhook_allow_private": "true",
        "webhook_backoff_base_s": "0.5",
        "webhook_max_attempts": "10",
        "webhook_timeout_s": "3",
        "sweep_deadline_s": str(SWEEP_DEADLINE_S),
        "visibility_timeout_s": "60",
        "password_hash_time_cost": "1",
        "password_hash_memory_kib": "8192",
    }
    env = base_env(**values)
    env["LIVERSCAN_MODEL_PATH"] = str(model)
    direct_store = S3Storage(
        BUCKET,
        endpoint_url=s3_endpoint,
        access_key_id="testing",
        secret_access_key="testing",
    )
    direct_store.ensure_bucket()
    api_port = port_in(18000, 18000)
    api = spawn(api_command(api_port), env, logs / "api.log")
    worker = WorkerProcess(env, logs)
    db = create_engine(f"postgresql+psycopg2://postgres@127.0.0.1:5432/{DB_NAME}")

    from worker import sweep
    from worker.context import WorkerContext

    sweep_ctx = WorkerContext.from_settings(Settings(**values))
    sweeper = Periodic(lambda: sweep.run(context=sweep_ctx), SWEEP_EVERY_S)
    with running_receiver(hook_port) as receiver:
        receiver.url = f"http://127.0.0.1:{hooks.port}/liverscan-events"
        stack = Stack(
            base_url=f"http://127.0.0.1:{api_port}",
            api=api,
            worker=worker,
            pg=pg,
            s3=s3,
            hooks=hooks,
            redis=redis_server,
            receiver=receiver,
            db=db,
            store=direct_store,
            logs=logs,
        )
        try:
            wait_ready(_api_only(stack))
            worker.start()
            sweeper.start()
            yield stack
        finally:
            sweeper.stop()
            worker.stop()
            api.terminate()
            api.wait(timeout=30)
            redis_server.kill()
            for proxy in (pg, s3, hooks):
                proxy.down()
            sweep_ctx.engine.dispose()
            db.dispose()


def _api_only(stack: Stack) -> Any:
    from tests.e2e.e2e_support import Stack as ProcessStack

    return ProcessStack(stack.base_url, {}, [stack.api], stack.logs)


@pytest.fixture
def stack(reliability_stack: Stack) -> Stack:
    """The package's stack, healed: every dependency reachable, Redis and the worker running."""
    reliability_stack.heal()
    return reliability_stack


@pytest.fixture
def clinic(stack: Stack) -> Client:
    """A freshly signed-up clinic (its own organization) on the stack."""
    return Client(stack.base_url, f"Reliability {os.urandom(3).hex()}")


@pytest.fixture
def receiver(stack: Stack) -> Receiver:
    """The stack's webhook receiver (reached through its proxy)."""
    return stack.receiver


@pytest.fixture(scope="session")
def results() -> ResultsFile:
    """The results file of `make reliability` (RELIABILITY_RESULTS; unset: nowhere)."""
    raw = os.environ.get(RESULTS_ENV)
    return ResultsFile(Path(raw) if raw else None)
