"""The `make run` supervisor: one dead part stops the rest; a signal stops everything with status 0."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.domain.settings import Settings
from worker.embedded import Supervisor, child_commands


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    """The supervisor installs SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_a_dead_child_stops_the_others_with_status_1(tmp_path: Path) -> None:
    """If the worker exits, the API is stopped too and the runner reports failure."""
    supervisor = Supervisor(
        Settings(data_dir=tmp_path, sweep_interval_s=3600),
        {"api": ["sleep", "300"], "worker": ["false"]},
    )
    assert supervisor.run() == 1
    assert not _alive(supervisor.children["api"].pid)


def test_sigterm_stops_every_child_with_status_0(tmp_path: Path) -> None:
    """SIGTERM (what Ctrl-C or `kill` sends) ends all children and the runner exits cleanly."""
    supervisor = Supervisor(
        Settings(data_dir=tmp_path, sweep_interval_s=3600),
        {"api": ["sleep", "300"], "worker": ["sleep", "300"]},
    )
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    assert supervisor.run() == 0
    timer.join()
    assert not any(_alive(p.pid) for p in supervisor.children.values())


def test_children_are_the_api_server_and_one_micro_batching_worker() -> None:
    """`make run` serves on the requested port and runs one threads-pool worker on every queue."""
    commands = child_commands(Settings(worker_batch_size=4), "127.0.0.1", 8123)
    assert "--port=8123" in commands["api"] and "api.app:create_app" in commands["api"]
    assert "--pool=threads" in commands["worker"]
    assert "--concurrency=8" in commands["worker"]  # two batches in flight
    assert "--queues=inference,webhooks,reports" in commands["worker"]
