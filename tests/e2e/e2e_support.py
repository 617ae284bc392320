"""Helpers of the end-to-end tests: process stacks, an HTTP client for a clinic, a webhook receiver."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
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


@dataclass
class Receiver:
    """A loopback webhook endpoint that records every POST (headers, raw body)."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    def events(self, job_id: str) -> list[tuple[dict[str, str], bytes]]:
        """The deliveries received for one job."""
        return [(h, b) for h, b in self.received if json.loads(b)["job"]["id"] == job_id]


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


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start a stack process with its output appended to `log`."""
    handle = log.open("ab")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


def base_env(**liverscan: str) -> dict[str, str]:
    """The parent environment without LIVERSCAN_* leftovers, plus the given settings."""
    # LIVERSCAN_MODEL_PATH passes through: the suite can be pointed at another artifact.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LIVERSCAN_") or k == "LIVERSCAN_MODEL_PATH"
    }
    env.update({"LIVERSCAN_" + k.upper(): v for k, v in liverscan.items()})
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


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
