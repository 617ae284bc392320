"""End-to-end stacks: the API and a Celery worker as real processes, on production or embedded backends.

Production: PostgreSQL (a database of its own), Redis (a database of its own), S3 through moto's
server over HTTP (the suite's `s3_endpoint`). Embedded: `python -m worker.embedded` on SQLite + a
local folder + the kombu SQLAlchemy broker. Webhooks reach a loopback receiver
(LIVERSCAN_WEBHOOK_ALLOW_PRIVATE=true).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis
from e2e_support import (
    DATA,
    E2E_DB,
    E2E_REDIS,
    Receiver,
    Stack,
    base_env,
    free_port,
    fresh_postgres_database,
    spawn,
    wait_ready,
)

from tests.live_stack import liver_slice_png


@pytest.fixture(scope="session", autouse=True)
def require_model() -> None:
    """The served model (LIVERSCAN_MODEL_PATH or the shipped one) must exist: no model, no product."""
    from api.domain.settings import Settings
    from ml_core.errors import ModelLoadError
    from worker.model_cache import model_path

    try:
        path = model_path(Settings())
    except ModelLoadError as exc:
        pytest.fail(f"no model to serve: {exc}")
    if not (path / "model_card.json").is_file():
        pytest.fail(f"no model artifact at {path}")


@pytest.fixture(scope="session")
def liver_png() -> bytes:
    """A real liver CT slice (3Dircadb1.7, the slice with the most liver) windowed W400/L50 as PNG."""
    return liver_slice_png()


@pytest.fixture(scope="session")
def photo_png() -> bytes:
    """A photograph that is not a scan (scikit-image's camera man)."""
    return (DATA / "negatives" / "skimage" / "camera.png").read_bytes()


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
def production_stack(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
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
        s3_endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        webhook_allow_private="true",
        webhook_backoff_base_s="1",
        sweep_deadline_s="5",
    )
    S3Storage(
        "liverscan-e2e",
        endpoint_url=s3_endpoint,
        region="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    ).ensure_bucket()
    port = free_port()
    processes = [
        spawn(
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
        spawn(
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
