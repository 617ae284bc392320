"""Batches end to end: the API (waitress) and a real Celery worker with the shipped model, on
PostgreSQL, Redis and a local store; a loopback webhook receiver; the `liverscan` CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from api.domain.webhooks import verify
from tests.e2e.e2e_support import (
    DATA,
    JOB_TIMEOUT_S,
    ROOT,
    Stack,
    base_env,
    free_port,
    fresh_postgres_database,
    spawn,
    wait_ready,
    wait_until,
)
from tests.live_stack import liver_slice_png

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DB_NAME = "liverscan_batches_e2e"
REDIS_URL = "redis://127.0.0.1:6379/10"  # this suite's own (api 14, worker 13, e2e 12, bench 11)
PASSWORD = "correct-horse-42"


@dataclass
class Receiver:
    """A loopback webhook endpoint that records every POST (headers, raw body)."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def batch_events(self, batch_id: str) -> list[tuple[dict[str, str], bytes]]:
        """The `batch.completed` deliveries of one batch."""
        return [
            (h, b)
            for h, b in self.received
            if json.loads(b).get("event") == "batch.completed"
            and json.loads(b)["batch"]["id"] == batch_id
        ]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """The running receiver; answers 204 to everything."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.received.append((dict(self.headers.items()), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_port}/batch-events"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one prefork worker (inference and webhooks queues) on PostgreSQL, Redis, local store."""
    logs = tmp_path_factory.mktemp("batches-stack")
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = base_env(
        env="test",
        data_dir=str(logs),
        database_url=fresh_postgres_database(DB_NAME),
        broker_url=REDIS_URL,
        storage_backend="local",
        storage_dir=str(logs / "store"),
        webhook_allow_private="true",
        webhook_backoff_base_s="1",
        password_hash_time_cost="1",
        password_hash_memory_kib="8192",
    )
    port = free_port()
    api = [sys.executable, "-m", "waitress", "--host=127.0.0.1", f"--port={port}", "--threads=4",
           "--call", "api.app:create_app"]  # fmt: skip
    worker = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
              "--pool=prefork", "--concurrency=1", "--queues=inference,webhooks",
              "--hostname=batches@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle"]  # fmt: skip
    processes = [spawn(api, env, logs / "api.log"), spawn(worker, env, logs / "worker.log")]
    running = Stack(f"http://127.0.0.1:{port}", env, processes, logs)
    wait_ready(running)
    yield running
    running.stop()
    redis.Redis.from_url(REDIS_URL).flushdb()


@pytest.fixture(scope="module")
def liver_png() -> bytes:
    """A real liver CT slice (3Dircadb1.7, the slice with the most liver) windowed W400/L50 as PNG."""
    return liver_slice_png()


@pytest.fixture(scope="module")
def photo_png() -> bytes:
    """A photograph that is not a scan (scikit-image's camera man)."""
    return (DATA / "negatives" / "skimage" / "camera.png").read_bytes()


def sign_up(base_url: str, organization: str) -> tuple[str, dict[str, str]]:
    """A fresh clinic user; returns (email, bearer headers)."""
    email = f"{organization.lower().replace(' ', '-')}-{os.urandom(4).hex()}@clinic.example"
    body = {"email": email, "password": PASSWORD, "name": "Dr Test", "organization": organization}
    r = requests.post(f"{base_url}/api/v1/auth/signup", json=body, timeout=30)
    assert r.status_code == 201, r.text
    r = requests.post(
        f"{base_url}/api/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=30
    )
    assert r.status_code == 200, r.text
    return email, {"Authorization": f"Bearer {r.json()['access_token']}"}


def test_mixed_batch_completes_with_one_signed_event_and_a_full_csv(
    stack: Stack, receiver: Receiver, liver_png: bytes, photo_png: bytes
) -> None:
    """Good slices succeed, bad files are rejected one by one, the batch completes, one event."""
    _, headers = sign_up(stack.base_url, "Screening West")
    files = [
        ("file", ("liver.png", liver_png, "image/png")),
        ("file", ("camera.png", photo_png, "image/png")),
        ("file", ("notes.txt", b"not an image at all", "text/plain")),
        ("file", ("empty.png", b"", "image/png")),
    ]
    r = requests.post(
        f"{stack.base_url}/api/v1/batches",
        headers=headers,
        files=files,
        data={"callback_url": receiver.url},
        timeout=60,
    )
    assert r.status_code == 202, r.text
    created = r.json()
    assert len(created["job_ids"]) == 3
    assert [(x["filename"], x["code"]) for x in created["rejected"]] == [
        ("empty.png", "missing_file")
    ]

    def completed() -> dict[str, Any] | None:
        batch = requests.get(created["status_url"], headers=headers, timeout=30).json()
        return batch if batch["status"] == "completed" else None

    batch = wait_until(completed, JOB_TIMEOUT_S, "the batch to complete")
    assert batch["counts"]["succeeded"] == 1
    assert batch["counts"]["rejected"] == 2
    assert batch["progress"] == 1.0
    by_name = {job["filename"]: job for job in batch["jobs"]}
    assert by_name["camera.png"]["reason_code"] == "not_liver_ct"
    assert by_name["notes.txt"]["reason_code"] == "unsupported_format"

    events = wait_until(lambda: receiver.batch_events(created["id"]), 60, "batch.completed")
    assert len(events) == 1
    event_headers, body = events[0]
    assert event_headers["X-Liverscan-Event"] == "batch.completed"
    secret = requests.get(
        f"{stack.base_url}/api/v1/org/webhook-secret", headers=headers, timeout=30
    ).json()["webhook_secret"]
    assert verify(secret, body, event_headers["X-Liverscan-Signature"])
    assert json.loads(body)["batch"]["counts"]["succeeded"] == 1

    text = requests.get(created["results_url"], headers=headers, timeout=30).text
    rows = {row["filename"]: row for row in csv.DictReader(io.StringIO(text))}
    assert set(rows) == {"liver.png", "camera.png", "notes.txt", "empty.png"}
    liver = rows["liver.png"]
    assert liver["status"] == "succeeded" and liver["label"] in ("tumor", "normal")
    assert 0.0 <= float(liver["probability"]) <= 1.0 and liver["model_version"]
    overlay = requests.get(liver["overlay_url"], headers=headers, timeout=30)
    assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")


def test_cli_submits_a_folder_waits_and_writes_the_csv(
    stack: Stack, liver_png: bytes, photo_png: bytes, tmp_path: Path
) -> None:
    """`liverscan submit DIR --batch --wait --out` against the real worker."""
    email, _ = sign_up(stack.base_url, "Screening East")
    folder = tmp_path / "slices"
    folder.mkdir()
    (folder / "liver.png").write_bytes(liver_png)
    (folder / "camera.png").write_bytes(photo_png)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "api.cli", *args],
            cwd=ROOT,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT_S,
        )

    done = cli(
        "login", "--server", stack.base_url, "--email", email, "--password-stdin",
        stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = tmp_path / "results.csv"
    done = cli("submit", str(folder), "--batch", "--wait", "--out", str(out), "--poll", "0.5")
    assert done.returncode == 0, done.stderr
    assert "2/2" in done.stderr
    rows = {row["filename"]: row for row in csv.DictReader(io.StringIO(out.read_text()))}
    assert rows["liver.png"]["status"] == "succeeded"
    assert rows["camera.png"]["status"] == "rejected"
    assert rows["camera.png"]["reason_code"] == "not_liver_ct"
