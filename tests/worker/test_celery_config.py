"""What an operator relies on from the Celery app: queues, late acks, prefetch 1, redelivery window."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import kombu.transport.sqlalchemy
import pytest

from api.domain.settings import Settings
from worker.celery_app import celery_app, make_celery

ROOT = Path(__file__).resolve().parents[2]


def test_tasks_are_routed_to_their_queues() -> None:
    """Model work and webhook delivery never wait behind each other's messages."""
    import worker.tasks  # noqa: F401 (registers the tasks)

    routes = celery_app.conf.task_routes
    assert routes["liverscan.process_job"] == {"queue": "inference"}
    assert routes["liverscan.deliver_webhook"] == {"queue": "webhooks"}
    assert routes["liverscan.sweep"] == {"queue": "webhooks"}
    assert {"liverscan.process_job", "liverscan.deliver_webhook", "liverscan.sweep"} <= set(
        celery_app.tasks
    )


def test_a_dying_worker_loses_no_job() -> None:
    """Acks after the task, one message prefetched, a redelivery window longer than any job."""
    app = make_celery(Settings(broker_url="redis://127.0.0.1:6379/0", visibility_timeout_s=7200))
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options == {"visibility_timeout": 7200}


def test_embedded_broker_gets_no_engine_options_and_polls_fast(tmp_path) -> None:
    """The SQLAlchemy transport's options go to create_engine, so none are passed; polling is set on the class."""
    app = make_celery(Settings(data_dir=tmp_path))
    assert app.conf.broker_url.startswith("sqla+sqlite:///")
    assert app.conf.broker_transport_options == {}
    assert kombu.transport.sqlalchemy.Transport.polling_interval <= 0.5


def test_sweep_is_scheduled_by_beat() -> None:
    """Production beat runs the sweep every LIVERSCAN_SWEEP_INTERVAL_S."""
    app = make_celery(Settings(sweep_interval_s=45))
    (entry,) = app.conf.beat_schedule.values()
    assert entry == {"task": "liverscan.sweep", "schedule": 45.0}


def _worker_start_log(tmp_path: Path, pool: str, *options: str) -> str:
    """What a real worker (embedded broker, no model) logs from its start until it is ready."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")}
    env.update(
        LIVERSCAN_DATA_DIR=str(tmp_path),
        LIVERSCAN_WORKER_POOL=pool,
        LIVERSCAN_WORKER_PRELOAD_MODEL="false",
        PYTHONPATH=str(ROOT),
    )
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker"]
    command += ["--queues=webhooks", "--concurrency=2", "--loglevel=INFO", *options]
    worker = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert worker.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = worker.stdout.readline()
            if not line:
                break
            lines.append(line)
            if " ready." in line:
                break
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    assert any(" ready." in line for line in lines), "".join(lines)
    return "".join(lines)


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_recycling_options_a_pool_ignores_are_reported_at_start(tmp_path: Path, pool: str) -> None:
    """Celery recycles processes only in prefork: with threads or solo the worker says that
    --max-tasks-per-child and --max-memory-per-child bound nothing, rather than ignoring them."""
    log = _worker_start_log(
        tmp_path, pool, "--max-tasks-per-child=50", "--max-memory-per-child=1500000"
    )
    assert f"--max-tasks-per-child=50 is not applied: the {pool} pool" in log
    assert f"--max-memory-per-child=1500000 is not applied: the {pool} pool" in log
    assert "WARNING/MainProcess] --max-tasks-per-child" in log


def test_recycling_options_prefork_applies_are_not_reported(tmp_path: Path) -> None:
    """Prefork does replace its children after N jobs: no warning there, nor without the options."""
    assert "is not applied" not in _worker_start_log(
        tmp_path, "prefork", "--max-tasks-per-child=50"
    )
    assert "is not applied" not in _worker_start_log(tmp_path, "threads")
