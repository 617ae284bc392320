"""CLI tests: the app served on a loopback port (embedded backends: SQLite, SQLite broker, local
store), the `liverscan` client run as a real subprocess against it with its own config dir."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.serving import make_server

from api.domain.db import make_engine, make_session_factory
from api.domain.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "liver-scan-2024"


@dataclass
class Server:
    """The live API, its settings, and sessions on its database (to play the worker's part)."""

    url: str
    settings: Settings
    sessions: sessionmaker[Session]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Migrate a fresh SQLite database and serve the app from a background thread."""
    from api.app import create_app

    data_dir = tmp_path_factory.mktemp("cli-data")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")}
    env |= {"LIVERSCAN_ENV": "test", "LIVERSCAN_DATA_DIR": str(data_dir)}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    settings = Settings(
        env="test",
        data_dir=data_dir,
        max_upload_mb=2,
        jwt_secret_key=secrets.token_hex(32),
        password_hash_time_cost=1,
        password_hash_memory_kib=8192,
    )
    app = create_app(settings)
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, name="cli-test-server", daemon=True)
    thread.start()
    engine = make_engine(settings)
    try:
        yield Server(
            f"http://127.0.0.1:{httpd.server_port}", settings, make_session_factory(engine)
        )
    finally:
        httpd.shutdown()
        thread.join(timeout=10)
        engine.dispose()


@dataclass
class Account:
    """A signed-up user and the environment that gives the CLI its own config dir."""

    email: str
    env: dict[str, str]
    config_dir: Path


@pytest.fixture
def account(server: Server, tmp_path: Path) -> Account:
    """A fresh user in a fresh organization; XDG_CONFIG_HOME points into the test's tmp dir."""
    email = f"cli-{uuid.uuid4().hex[:8]}@clinic.test"
    r = requests.post(
        f"{server.url}/api/v1/auth/signup",
        json={"email": email, "password": PASSWORD, "name": "Dr Cli", "organization": "Screening"},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    env["COLUMNS"] = "120"
    return Account(email, env, tmp_path / "config" / "liverscan")


def cli(
    account: Account, *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `liverscan ARGS…` (as `python -m api.cli`, what the entry point calls) to completion."""
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT,
        env=account.env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(account: Account, *args: str) -> subprocess.Popen[str]:
    """Start `liverscan ARGS…` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT,
        env=account.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def logged_in(server: Server, account: Account) -> Account:
    """An account whose credentials the CLI has stored."""
    done = cli(
        account, "login", "--server", server.url, "--email", account.email, "--password-stdin",
        stdin=PASSWORD + "\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return account
