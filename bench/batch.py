"""Issue-6 figures: end-to-end batch throughput against the bare model, in one run.

1. bare model: ``Classifier.predict`` img/s at the worker's batch size N (LIVERSCAN_WORKER_BATCH_SIZE,
   default 16) and at 1, on 512x512 liver slices. "The model" is what the worker must run per slice
   to classify and explain it: liver localiser + EfficientNet classifier + CAM mapped onto the full
   slice — one ``predict`` call on N slices. The content gate is validation, not classification,
   so it is reported separately (``gate_img_per_s``) and as ``model_and_gate_img_per_s``, the
   stricter reference (every model-shaped call the worker makes per slice);
2. end to end: the API (waitress) and K Celery worker processes (threads pool, micro-batches of N)
   on the production backends — PostgreSQL, Redis and S3 (moto's server over HTTP); one
   ``POST /api/v1/batches`` of ``--n`` slices, polled until the batch completes: img/s from the POST
   to completion, time to first result, and each worker's RSS sampled from /proc over the batch
   (peak, and growth from 10 % to 100 % of the jobs: flat means no growth per job);
3. ratios: end-to-end img/s with one worker / bare model img/s at batch N (and / model+gate).

Prints JSON lines {"name", "value", "unit", "config"}. Runtimes vary up to 2x from run to run on
this shared 2-core machine: compare within one run. The issue's figure is 2,000 slices
(``--n 2000``, what `make bench` runs); ``--n 200`` gives a quick look.

Usage: python bench/batch.py [--n 2000] [--workers 1,2] [--device-note "CPU 2 cores"]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import redis
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
BENCH_DB = "liverscan_scale_bench"
BENCH_REDIS = "redis://127.0.0.1:6379/6"  # the scale helper's Redis database
MOTO_PORT, API_PORT = 18150, 18151  # loopback ports of this benchmark
PASSWORD = "correct-horse-42"

log = logging.getLogger("bench.batch")


def emit(name: str, value: float, unit: str, config: dict[str, Any]) -> None:
    """Print one JSON line."""
    line = {"name": name, "value": round(float(value), 4), "unit": unit, "config": config}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def liver_slices(n: int) -> list[np.ndarray]:
    """``n`` distinct 512x512 uint8 liver CT slices (W400/L50) from 3Dircadb1.7, liver-bearing first."""
    from ml_core.preprocessing import window

    with np.load(DATA / "ircadb" / "3Dircadb1.7.npz") as volume:
        liver, ct_hu = volume["liver"], volume["ct_hu"]  # decompress once, not per slice
    order = np.argsort(-liver.sum(axis=(1, 2)))
    picks = [int(z) for z in order[: max(1, min(n, 40))]]
    windowed = {z: window(ct_hu[z].astype(np.float32), width=400.0, level=50.0) for z in picks}
    out = []
    for k in range(n):
        u8 = windowed[picks[k % len(picks)]].copy()
        u8[0, k % 512] ^= 1 + (k // 512) % 250  # distinct bytes per slice (sha256, no dedupe)
        out.append(u8)
    return out


def rate(fn: Any, items: int, min_s: float = 5.0) -> float:
    """Items per second of ``fn`` after one warm-up call, over at least ``min_s``."""
    fn()
    t0, calls = time.perf_counter(), 0
    while time.perf_counter() - t0 < min_s:
        fn()
        calls += 1
    return items * calls / (time.perf_counter() - t0)


def bench_model(
    slices: list[np.ndarray],
    batch: int,
    config: dict[str, Any],
    model: Path | None = None,
    runtime: str = "auto",
) -> dict[str, float]:
    """Bare model figures (img/s) at batch 1 and at the worker's batch size."""
    from ml_core.classifier import Classifier, default_model_path

    classifier = Classifier.load(model or default_model_path(), runtime=runtime)
    gate = classifier.gate()
    out: dict[str, float] = {}
    for size in sorted({1, batch}):
        group = slices[:size]
        model = rate(lambda g=group: classifier.predict(g), len(group))
        gated = rate(lambda g=group: gate.score(g), len(group))
        both = 1.0 / (1.0 / model + 1.0 / gated)
        emit(f"model_img_per_s/batch{size}", model, "img/s", config)
        emit(f"gate_img_per_s/batch{size}", gated, "img/s", config)
        emit(f"model_and_gate_img_per_s/batch{size}", both, "img/s", config)
        out[f"model{size}"], out[f"both{size}"] = model, both
    return out


def fresh_database() -> str:
    """A freshly migrated PostgreSQL database of this benchmark."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

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
    return url


def free_port() -> int:
    """A free loopback TCP port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    """Resident memory of one process (KiB), from /proc; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds consumed so far by these processes (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def pids_named(fragment: str) -> list[int]:
    """Processes whose command line contains `fragment` (e.g. the PostgreSQL backends)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def start_moto(port: int, log: Any) -> subprocess.Popen[bytes]:
    """moto's S3 server in its own process (production-like: the store is a network service)."""
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout_s} s")


def bench_end_to_end(
    pngs: list[bytes],
    workers: int,
    batch: int,
    config: dict[str, Any],
    *,
    drain: bool = False,
    model: Path | None = None,
    runtime: str = "auto",
) -> float:
    """One batch through API → Redis → K workers → PostgreSQL, bytes on S3; returns img/s.

    drain: the workers are frozen (SIGSTOP) while the batch is uploaded and thawed (SIGCONT) once
    the POST answered, and the clock starts then: queue → worker → database throughput without
    the upload competing for the cores (figures named `drain_*`).
    """
    prefix = "drain_" if drain else ""
    from api.domain.storage import S3Storage

    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    redis.Redis.from_url(BENCH_REDIS).flushdb()
    s3_port, api_port = MOTO_PORT, API_PORT
    s3_url = f"http://127.0.0.1:{s3_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")}
    env |= {
        "LIVERSCAN_ENV": "test",
        "LIVERSCAN_DATA_DIR": str(tmp),
        "LIVERSCAN_DATABASE_URL": fresh_database(),
        "LIVERSCAN_BROKER_URL": BENCH_REDIS,
        "LIVERSCAN_STORAGE_BACKEND": "s3",
        "LIVERSCAN_S3_BUCKET": "bench",
        "LIVERSCAN_S3_ENDPOINT_URL": s3_url,
        "LIVERSCAN_AWS_ACCESS_KEY_ID": "bench",
        "LIVERSCAN_AWS_SECRET_ACCESS_KEY": "bench-secret",
        "LIVERSCAN_PASSWORD_HASH_TIME_COST": "1",
        "LIVERSCAN_PASSWORD_HASH_MEMORY_KIB": "8192",
        "LIVERSCAN_WORKER_BATCH_SIZE": str(batch),
        "LIVERSCAN_DEVICE": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    if model is not None:
        env["LIVERSCAN_MODEL_PATH"] = str(model)
    env["LIVERSCAN_MODEL_RUNTIME"] = runtime
    base = f"http://127.0.0.1:{api_port}"
    api_cmd = [sys.executable, "-m", "waitress", "--host=127.0.0.1", f"--port={api_port}",
               "--threads=4", "--call", "api.app:create_app"]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    with (tmp / "stack.log").open("ab") as log:
        procs.append(start_moto(s3_port, log))
        _wait_http(s3_url, 60)
        S3Storage(
            "bench", endpoint_url=s3_url, access_key_id="bench", secret_access_key="bench-secret"
        ).ensure_bucket()
        procs.append(subprocess.Popen(api_cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
        worker_procs = []
        for k in range(workers):
            cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
                   "--queues=inference", f"--hostname=bench{k}@%h", "--loglevel=WARNING",
                   "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
            worker_procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
        procs += worker_procs
    try:
        _wait_http(base + "/healthz", 120)
        email = f"bench-{time.time_ns()}@clinic.example"
        requests.post(
            base + "/api/v1/auth/signup",
            json={"email": email, "password": PASSWORD, "name": "Bench", "organization": "Bench"},
            timeout=30,
        ).raise_for_status()
        token = requests.post(
            base + "/api/v1/auth/login", json={"email": email, "password": PASSWORD}, timeout=30
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        # Warm every worker (TensorFlow import, model load, first traces) outside the measurement.
        warm = requests.post(
            base + "/api/v1/batches",
            headers=headers,
            files=[("file", (f"w{k}.png", pngs[k])) for k in range(batch * workers * 2)],
            timeout=600,
        ).json()
        _wait_completed(base + f"/api/v1/batches/{warm['id']}", headers, 900)

        samples: list[tuple[int, list[int]]] = []  # (jobs done, RSS KiB of each worker)
        stop = threading.Event()

        def sample() -> None:  # reads the count itself: the POST may outlast the processing
            while not stop.is_set():
                finished = terminal_count(env["LIVERSCAN_DATABASE_URL"], not_batch=warm["id"])
                samples.append((finished, [rss_kib(p.pid) for p in worker_procs]))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        groups = {
            "api": [procs[1].pid],
            "store": [procs[0].pid],
            "workers": [p.pid for p in worker_procs],
            "postgres": pids_named("postgres: "),
            "redis": pids_named("redis-server"),
        }
        files = [("file", (f"s{k:05d}.png", data)) for k, data in enumerate(pngs)]
        if drain:
            for proc in worker_procs:
                proc.send_signal(signal.SIGSTOP)
        else:
            cpu_before = {name: cpu_s(pids) for name, pids in groups.items()}
            sampler.start()
        wall0 = time.time()
        t0 = time.perf_counter()
        created = requests.post(
            base + "/api/v1/batches", headers=headers, files=files, timeout=3600
        )
        created.raise_for_status()
        submitted_s = time.perf_counter() - t0
        if drain:
            cpu_before = {name: cpu_s(pids) for name, pids in groups.items()}
            sampler.start()
            wall0 = time.time()
            t0 = time.perf_counter()
            for proc in worker_procs:
                proc.send_signal(signal.SIGCONT)
        url = created.json()["status_url"]
        # Poll the rows, not the API: GET /batches/<id> over 2,000 jobs costs the API more CPU
        # than the figure should include (a client polls every 2 s; the CLI does).
        while True:
            if terminal_count(env["LIVERSCAN_DATABASE_URL"], created.json()["id"]) >= len(pngs):
                break
            time.sleep(0.5)
        elapsed = time.perf_counter() - t0
        state = requests.get(url, headers=headers, timeout=60).json()
        stop.set()
        sampler.join()
        n = len(pngs)
        cfg = {**config, "workers": workers, "batch": batch, "n": n, "counts": state["counts"]}
        groups["postgres"] = sorted(set(groups["postgres"]) | set(pids_named("postgres: ")))
        for name, pids in groups.items():
            used = cpu_s(pids) - cpu_before.get(name, 0.0)
            emit(f"{prefix}cpu_ms_per_image/{name}/workers{workers}", 1000 * used / n, "ms", cfg)
        throughput = n / elapsed
        emit(f"{prefix}e2e_img_per_s/workers{workers}", throughput, "img/s", cfg)
        emit(f"{prefix}e2e_submit_s/workers{workers}", submitted_s, "s", cfg)
        stages, first_finished = job_figures(env["LIVERSCAN_DATABASE_URL"], created.json()["id"])
        emit(f"{prefix}e2e_first_result_s/workers{workers}", first_finished - wall0, "s", cfg)
        for stage, ms in stages.items():  # wall time per job; concurrent jobs overlap
            emit(f"{prefix}stage_ms_mean/{stage}/workers{workers}", ms, "ms", cfg)
        peak = max(max(rss) for _, rss in samples) if samples else 0
        emit(f"{prefix}worker_rss_mib_peak/workers{workers}", peak / 1024, "MiB", cfg)
        early = [rss for d, rss in samples if d >= 0.1 * n]
        if early:
            growth = max(b - a for a, b in zip(early[0], samples[-1][1], strict=True))
            emit(
                f"{prefix}worker_rss_growth_mib_10_to_100pct/workers{workers}",
                growth / 1024,
                "MiB",
                cfg,
            )
        return throughput
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


_engines: dict[str, Any] = {}


def terminal_count(
    database_url: str, batch_id: str | None = None, *, not_batch: str | None = None
) -> int:
    """Jobs in a terminal state (one cheap query): of ``batch_id``, or of every batch but ``not_batch``."""
    from sqlalchemy import create_engine, text

    if database_url not in _engines:  # pre-ping: the next run drops and recreates the database
        _engines[database_url] = create_engine(database_url, pool_size=1, pool_pre_ping=True)
    engine = _engines[database_url]
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    f"SELECT count(*) FROM jobs WHERE batch_id {'=' if batch_id else '<>'} :b "
                    "AND status IN ('succeeded', 'rejected', 'failed')"
                ),
                {"b": batch_id or not_batch},
            ).scalar_one()
        )


def job_figures(database_url: str, batch_id: str) -> tuple[dict[str, float], float]:
    """Mean stage milliseconds of the batch's jobs (their `timings`) and its first finish (epoch s)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    stages = ("fetch", "decode", "validate", "infer", "explain", "store")
    cols = ", ".join(f"avg((timings->>'{st}_s')::float)" for st in stages)
    with engine.connect() as conn:
        row = conn.execute(
            text(
                f"SELECT {cols}, extract(epoch from min(finished_at)) FROM jobs WHERE batch_id = :b"
            ),
            {"b": batch_id},
        ).one()
    engine.dispose()
    means = {st: 1000 * float(v) for st, v in zip(stages, row[:-1], strict=True) if v is not None}
    return means, float(row[-1])


def _wait_completed(url: str, headers: dict[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if requests.get(url, headers=headers, timeout=30).json()["status"] == "completed":
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not complete in {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    """Run the batch benchmark and print JSON lines."""
    from api.domain.settings import Settings

    parser = argparse.ArgumentParser(prog="bench/batch.py")
    parser.add_argument("--n", type=int, default=2000, help="slices in the end-to-end batch")
    parser.add_argument("--workers", default="1,2", help="worker process counts to run")
    parser.add_argument("--batch", type=int, default=Settings().worker_batch_size)
    parser.add_argument("--device-note", default="CPU", help="recorded in every line's config")
    parser.add_argument("--skip-e2e", action="store_true", help="model figures only")
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: ml_core/models/CURRENT)"
    )
    parser.add_argument(
        "--runtime",
        choices=("auto", "tf", "onnx"),
        default="auto",
        help="classifier forward runtime (LIVERSCAN_MODEL_RUNTIME) for the bare model and workers",
    )
    parser.add_argument(
        "--no-drain",
        dest="drain",
        action="store_false",
        help="skip the 1-worker drain run (queue → worker → database without the upload)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from ml_core.overlay import encode_png

    config = {"device": args.device_note, "cpus": os.cpu_count(), "batch": args.batch}
    if args.model is not None:
        config["model"] = args.model.name
    config["runtime"] = args.runtime
    slices = liver_slices(max(args.n, args.batch))
    bare = bench_model(slices, args.batch, config, args.model, args.runtime)
    if args.skip_e2e:
        return 0
    pngs = [encode_png(s) for s in slices[: args.n]]
    for workers in (int(w) for w in args.workers.split(",")):
        throughput = bench_end_to_end(
            pngs, workers, args.batch, config, model=args.model, runtime=args.runtime
        )
        if workers == 1 and args.drain:
            drained = bench_end_to_end(
                pngs, 1, args.batch, config, drain=True, model=args.model, runtime=args.runtime
            )
            emit(
                f"drain_over_model_batch{args.batch}",
                drained / bare[f"model{args.batch}"],
                "ratio",
                {**config, "n": args.n},
            )
        if workers == 1:
            cfg = {**config, "n": args.n}
            emit(
                f"e2e_over_model_batch{args.batch}",
                throughput / bare[f"model{args.batch}"],
                "ratio",
                cfg,
            )
            emit(
                f"e2e_over_model_and_gate_batch{args.batch}",
                throughput / bare[f"both{args.batch}"],
                "ratio",
                cfg,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
