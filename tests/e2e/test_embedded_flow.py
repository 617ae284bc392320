"""`make run`'s embedded default end to end: SQLite, a local folder, a broker with no server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import (
    JOB_TIMEOUT_S,
    ROOT,
    Client,
    Receiver,
    Stack,
    base_env,
    free_port,
    wait_ready,
    wait_until,
)

from api.domain.webhooks import verify


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`python -m worker.embedded` on a fresh data folder (it migrates SQLite itself)."""
    data_dir = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = base_env(data_dir=str(data_dir), webhook_allow_private="true", sweep_interval_s="2")
    log = (data_dir / "embedded.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.embedded", f"--port={port}"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack = Stack(f"http://127.0.0.1:{port}", env, [process], data_dir)
    wait_ready(stack)
    yield stack
    stack.stop()


def test_upload_to_overlay_and_webhook_on_embedded_backends(
    embedded: Stack, receiver: Receiver, liver_png: bytes
) -> None:
    """The same journey as production: succeeded, overlay served by the API, signed webhook."""
    client = Client(embedded.base_url, "Solo Practice")
    job_id = client.submit(liver_png, "slice.png", callback_url=receiver.url)
    job = client.wait_terminal(job_id)

    assert job["status"] == "succeeded", job
    assert job["result"]["label"] in ("tumor", "normal")
    overlay = client.get(job["result"]["overlay_url"])  # the authenticated local-store route
    assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")
    assert (Path(embedded.logs) / "liverscan.db").exists()

    events = wait_until(lambda: receiver.events(job_id), JOB_TIMEOUT_S, "the webhook")
    ((headers, body),) = events
    assert verify(client.webhook_secret(), body, headers["X-Liverscan-Signature"])
    assert json.loads(body)["event"] == "job.succeeded"


def test_sigterm_stops_api_and_worker_cleanly(embedded: Stack) -> None:
    """SIGTERM to the runner stops the API and the worker; the runner exits 0."""
    (process,) = embedded.processes
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True)
    child_pids = [int(p) for p in children.stdout.split()]
    assert len(child_pids) == 2
    assert embedded.stop(signal.SIGTERM) == [0]
    for pid in child_pids:
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
