"""Issue-2 service figures: submit latency (p50/p99) at 1/16/64 clients and GET /jobs/<id> rate.

Runs the API (waitress, 8 threads) as a subprocess on loopback against the production backends
(PostgreSQL + Redis + moto's S3 server) and the embedded default (SQLite + local folder + kombu
SQLAlchemy broker). No worker runs: the figures are the API's. Prints one JSON line per figure:
{"name", "value", "unit", "config"}. Bounded: a few hundred requests per figure.

Usage: python bench/service.py [--backends production,embedded] [--get-requests 2000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
BENCH_DB = "liverscan_bench"
BENCH_REDIS = "redis://127.0.0.1:6379/11"
CLIENTS = (1, 16, 64)
THREADS = 8

log = logging.getLogger("bench.service")
_local = threading.local()


def http() -> requests.Session:
    """This thread's keep-alive HTTP session."""
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
    return _local.session  # type: ignore[no-any-return]


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` until true or raise after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}")


def slice_png() -> bytes:
    """A 512x512 liver CT slice, windowed W400/L50, as PNG."""
    import cv2

    volume = np.load(DATA / "ircadb" / "3Dircadb1.7.npz")
    z = int(volume["liver"].sum(axis=(1, 2)).argmax())
    hu = volume["ct_hu"][z].astype(np.float32)
    u8 = np.clip((hu - (50 - 200)) / 400 * 255, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", u8)
    assert ok
    return bytes(encoded)


def production_env(tmp: Path) -> tuple[dict[str, str], list[subprocess.Popen[bytes]]]:
    """Fresh PostgreSQL database and Redis db, a moto S3 server; the API's environment."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from api.domain.storage import S3Storage

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{BENCH_DB}"'))
    admin.dispose()
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{BENCH_DB}"
    engine = create_engine(url)
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    engine.dispose()
    redis.Redis.from_url(BENCH_REDIS).flushdb()

    port = free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(endpoint, timeout=1).status_code < 500, 60, "moto")
    S3Storage(
        "liverscan-bench",
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id="bench",
        secret_access_key="bench",
    ).ensure_bucket()
    env = {
        "LIVERSCAN_ENV": "test",
        "LIVERSCAN_DATA_DIR": str(tmp),
        "LIVERSCAN_DATABASE_URL": url,
        "LIVERSCAN_BROKER_URL": BENCH_REDIS,
        "LIVERSCAN_STORAGE_BACKEND": "s3",
        "LIVERSCAN_S3_BUCKET": "liverscan-bench",
        "LIVERSCAN_S3_ENDPOINT_URL": endpoint,
        "LIVERSCAN_AWS_ACCESS_KEY_ID": "bench",
        "LIVERSCAN_AWS_SECRET_ACCESS_KEY": "bench",
    }
    return env, [moto]


def embedded_env(tmp: Path) -> tuple[dict[str, str], list[subprocess.Popen[bytes]]]:
    """The embedded default on a fresh data folder, migrated."""
    env = {"LIVERSCAN_DATA_DIR": str(tmp)}
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, **env},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return env, []


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`."""
    return float(np.percentile(np.asarray(values), q))


def run_backend(name: str, make_env: Callable[..., Any], png: bytes, get_requests: int) -> None:
    """Start the API on one backend, measure, print the figures."""
    with tempfile.TemporaryDirectory(prefix=f"liverscan-bench-{name}-") as tmp:
        backend_env, helpers = make_env(Path(tmp))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")}
        env.update(backend_env)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "waitress",
                "--host=127.0.0.1",
                f"--port={port}",
                f"--threads={THREADS}",
                "--call",
                "api.app:create_app",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: requests.get(base + "/healthz", timeout=2).ok, 120, "the API")
            measure(name, base, png, get_requests)
        finally:
            api.terminate()
            api.wait(timeout=30)
            for helper in helpers:
                helper.terminate()
                helper.wait(timeout=30)


def measure(backend: str, base: str, png: bytes, get_requests: int) -> None:
    """Submit latency at each client count, then GET requests per second."""
    user = {
        "email": f"bench-{time.time_ns()}@bench.example",
        "password": "bench-password-42",
        "name": "Bench",
        "organization": "Bench",
    }
    requests.post(base + "/api/v1/auth/signup", json=user, timeout=30).raise_for_status()
    login = requests.post(
        base + "/api/v1/auth/login",
        json={"email": user["email"], "password": user["password"]},
        timeout=30,
    )
    headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
    config = {
        "backend": backend,
        "server": f"waitress threads={THREADS}",
        "png_bytes": len(png),
        "cpus": os.cpu_count(),
        "loopback": True,
    }
    job_id = ""
    for clients in CLIENTS:
        total = max(32, 4 * clients)

        def submit(_: int) -> tuple[float, int, str]:
            s = http()
            start = time.perf_counter()
            r = s.post(
                base + "/api/v1/jobs",
                headers=headers,
                files={"file": ("slice.png", png, "image/png")},
                timeout=120,
            )
            body = r.json()
            code = body.get("id") if r.status_code == 202 else body.get("error", {}).get("code")
            return time.perf_counter() - start, r.status_code, str(code)

        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(submit, range(total)))
        ok = [t for t, status, _ in results if status == 202]
        job_id = next(j for _, status, j in results if status == 202)
        errors = sorted({f"{status} {code}" for _, status, code in results if status != 202})
        cfg = {
            **config,
            "clients": clients,
            "requests": total,
            "errors": total - len(ok),
            "error_kinds": errors,
        }
        emit("submit_latency_p50", percentile(ok, 50) * 1000, "ms", cfg)
        emit("submit_latency_p99", percentile(ok, 99) * 1000, "ms", cfg)

    clients = 16

    def get(_: int) -> int | str:
        s = http()
        r = s.get(f"{base}/api/v1/jobs/{job_id}", headers=headers, timeout=60)
        return r.status_code if r.ok else f"{r.status_code} {r.json()['error']['code']}"

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(get, range(get_requests)))
    elapsed = time.perf_counter() - start
    cfg = {
        **config,
        "clients": clients,
        "requests": get_requests,
        "errors": sum(1 for s in statuses if s != 200),
        "error_kinds": sorted({str(s) for s in statuses if s != 200}),
    }
    emit("get_job_rps", get_requests / elapsed, "requests/s", cfg)


def emit(name: str, value: float, unit: str, config: dict[str, Any]) -> None:
    """Print one figure as a JSON line."""
    print(
        json.dumps({"name": name, "value": round(value, 2), "unit": unit, "config": config}),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the selected backends."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="production,embedded")
    parser.add_argument("--get-requests", type=int, default=2000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    png = slice_png()
    makers = {"production": production_env, "embedded": embedded_env}
    for name in args.backends.split(","):
        run_backend(name, makers[name], png, args.get_requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
