"""End-to-end stacks: the API and a Celery worker as real processes, on production or embedded backends.

Production: PostgreSQL (a database of its own), Redis (a database of its own), S3 through moto's
server over HTTP. Embedded: `python -m worker.embedded` on SQLite + a local folder + the kombu
SQLAlchemy broker. Webhooks reach a loopback receiver (LIVERSCAN_WEBHOOK_ALLOW_PRIVATE=true).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
E2E_DB = "liverscan_e2e_tests"
E2E_REDIS = "redis://127.0.0.1:6379/12"
STARTUP_TIMEOUT_S = 240.0  # TensorFlow import + model load on two shared cores
JOB_TIMEOUT_S = 240.0


def free_port() -> int:
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture(scope="session", autouse=True)
def require_model() -> None:
    """These tests drive the shipped model; without an artifact there is nothing to test end to end."""
    from ml_core.classifier import default_model_path
    from ml_core.errors import ModelLoadError

    try:
        default_model_path()
    except ModelLoadError as exc:
        pytest.skip(f"no shipped model under ml_core/models yet: {exc}")


@pytest.fixture(scope="session")
def liver_png() -> bytes:
    """A real liver CT slice (3Dircadb1.7, the slice with the most liver) windowed W400/L50 as PNG."""
    from ml_core.overlay import encode_png
    from ml_core.preprocessing import window

    volume = np.load(DATA / "ircadb" / "3Dircadb1.7.npz")
    z = int(volume["liver"].sum(axis=(1, 2)).argmax())
    return encode_png(window(volume["ct_hu"][z].astype(np.float32), width=400.0, level=50.0))


@pytest.fixture(scope="session")
def photo_png() -> bytes:
    """A photograph that is not a scan (scikit-image's camera man)."""
    return (DATA / "negatives" / "skimage" / "camera.png").read_bytes()


@dataclass
class Receiver:
    """A loopback webhook endpoint that records every POST (headers, raw body)."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def events(self, job_id: str) -> list[tuple[dict[str, str], bytes]]:
        """The deliveries received for one job."""
        return [(h, b) for h, b in self.received if json.loads(b)["job"]["id"] == job_id]


@pytest.fixture(scope="session")
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
    state.url = f"http://127.0.0.1:{server.server_port}/liverscan-events"
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a loopback port; yields its endpoint URL."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(url, timeout=1).status_code < 500
        except requests.ConnectionError:
            return False

    wait_until(up, 60, "moto server")
    yield url
    process.terminate()
    process.wait(timeout=10)


def fresh_postgres_database(name: str) -> str:
    """Drop and create a PostgreSQL database, upgrade it to the Alembic head; returns its URL."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    engine = create_engine(url)
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    engine.dispose()
    return url


@dataclass
class Stack:
    """Running liverscan processes reachable at `base_url`, with the env they were started with."""

    base_url: str
    env: dict[str, str]
    processes: list[subprocess.Popen[bytes]]
    logs: Path

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> list[int]:
        """Signal every process and return their exit codes."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(sig)
        codes = []
        for process in self.processes:
            try:
                codes.append(process.wait(timeout=timeout_s))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return codes


def wait_ready(stack: Stack) -> None:
    """Until /healthz answers (the API is up)."""

    def up() -> bool:
        for process in stack.processes:
            if process.poll() is not None:
                pytest.fail(f"a stack process exited early; see {stack.logs}")
        try:
            return requests.get(stack.base_url + "/healthz", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_until(up, STARTUP_TIMEOUT_S, "the API to answer /healthz")


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def base_env(**liverscan: str) -> dict[str, str]:
    """The parent environment without LIVERSCAN_* leftovers, plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")}
    env.update({"LIVERSCAN_" + k.upper(): v for k, v in liverscan.items()})
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@pytest.fixture(scope="session")
def production_stack(moto_s3: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API (waitress) + a prefork Celery worker on PostgreSQL, Redis and S3 over HTTP."""
    from api.domain.storage import S3Storage

    logs = tmp_path_factory.mktemp("production-stack")
    redis.Redis.from_url(E2E_REDIS).flushdb()
    env = base_env(
        env="test",
        data_dir=str(logs),
        database_url=fresh_postgres_database(E2E_DB),
        broker_url=E2E_REDIS,
        storage_backend="s3",
        s3_bucket="liverscan-e2e",
        s3_endpoint_url=moto_s3,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        webhook_allow_private="true",
        webhook_backoff_base_s="1",
        sweep_deadline_s="5",
    )
    S3Storage(
        "liverscan-e2e",
        endpoint_url=moto_s3,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    ).ensure_bucket()
    port = free_port()
    processes = [
        _spawn(
            [
                sys.executable,
                "-m",
                "waitress",
                "--host=127.0.0.1",
                f"--port={port}",
                "--threads=8",
                "--call",
                "api.app:create_app",
            ],
            env,
            logs / "api.log",
        ),
        _spawn(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.celery_app:celery_app",
                "worker",
                "--pool=prefork",
                "--concurrency=1",
                "--queues=inference,webhooks",
                "--hostname=e2e@%h",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ],
            env,
            logs / "worker.log",
        ),
    ]
    stack = Stack(f"http://127.0.0.1:{port}", env, processes, logs)
    wait_ready(stack)
    yield stack
    stack.stop()
    redis.Redis.from_url(E2E_REDIS).flushdb()


class Client:
    """A signed-up clinic user talking to a stack over HTTP."""

    def __init__(self, base_url: str, organization: str) -> None:
        self.base_url = base_url
        email = f"{organization.lower().replace(' ', '-')}-{time.time_ns()}@clinic.example"
        password = "correct-horse-42"
        body = {
            "email": email,
            "password": password,
            "name": "Dr Test",
            "organization": organization,
        }
        response = requests.post(f"{base_url}/api/v1/auth/signup", json=body, timeout=30)
        assert response.status_code == 201, response.text
        self.org_id = str(response.json()["user"]["organization"]["id"])
        response = requests.post(
            f"{base_url}/api/v1/auth/login", json={"email": email, "password": password}, timeout=30
        )
        assert response.status_code == 200, response.text
        self.headers = {"Authorization": f"Bearer {response.json()['access_token']}"}

    def submit(self, data: bytes, filename: str, callback_url: str | None = None) -> str:
        """Upload one image; returns the job id from the 202."""
        form = {"callback_url": callback_url} if callback_url else {}
        response = requests.post(
            f"{self.base_url}/api/v1/jobs",
            headers=self.headers,
            files={"file": (filename, data, "image/png")},
            data=form,
            timeout=30,
        )
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        return str(response.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        """GET the job JSON."""
        response = requests.get(
            f"{self.base_url}/api/v1/jobs/{job_id}", headers=self.headers, timeout=30
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def wait_terminal(self, job_id: str) -> dict[str, Any]:
        """Poll until the job is succeeded, rejected or failed."""

        def done() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in ("succeeded", "rejected", "failed") else None

        return dict(wait_until(done, JOB_TIMEOUT_S, f"job {job_id} to finish"))

    def webhook_secret(self) -> str:
        """The organization's webhook signing secret."""
        response = requests.get(
            f"{self.base_url}/api/v1/org/webhook-secret", headers=self.headers, timeout=30
        )
        assert response.status_code == 200, response.text
        return str(response.json()["webhook_secret"])

    def get(self, url: str) -> requests.Response:
        """GET an absolute or API-relative URL with the bearer token."""
        full = url if url.startswith("http") else self.base_url + url
        return requests.get(full, headers=self.headers, timeout=30)
