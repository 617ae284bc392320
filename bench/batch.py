"""Issue-6 figures: end-to-end batch throughput against the bare model, in one run.

1. bare model: ``Classifier.predict`` img/s at the worker's batch size (1: one job per model call
   today) and at 32 (what micro-batching could reach), on 512x512 liver slices;
2. in-process pipeline: validate + predict + overlay PNGs per slice, img/s (no queue, no database);
3. end to end: the API (waitress) and N Celery worker processes (prefork, concurrency N) on
   PostgreSQL + Redis + a local store; one ``POST /api/v1/batches`` of ``--n`` slices, polled until
   the batch completes: img/s from the POST to completion, time to first result, and the workers'
   peak RSS sampled from /proc (flat means no growth per job);
4. ratio: end-to-end img/s with one worker / bare model img/s at batch 1.

Prints JSON lines {"name", "value", "unit", "config"}. Runtimes vary up to 2x from run to run on
this shared 2-core machine: compare within one run. The issue's figure is 2,000 slices
(``--n 2000``); the default is smaller so a run fits in minutes on CPU.

Usage: python bench/batch.py [--n 200] [--workers 1,2] [--device-note "CPU 2 cores"]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
BENCH_DB = "liverscan_bench_batch"
BENCH_REDIS = "redis://127.0.0.1:6379/9"
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

    volume = np.load(DATA / "ircadb" / "3Dircadb1.7.npz")
    order = np.argsort(-volume["liver"].sum(axis=(1, 2)))
    picks = [int(z) for z in order[: max(1, min(n, 40))]]
    out = []
    for k in range(n):
        u8 = window(
            volume["ct_hu"][picks[k % len(picks)]].astype(np.float32), width=400.0, level=50.0
        )
        u8 = u8.copy()
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


def bench_model(slices: list[np.ndarray], config: dict[str, Any]) -> float:
    """Bare model and in-process pipeline figures; returns img/s at batch 1."""
    from ml_core.classifier import Classifier, default_model_path
    from ml_core.overlay import encode_png, heatmap_png, overlay_png
    from ml_core.validation import validate

    classifier = Classifier.load(default_model_path())
    at_1 = 0.0
    for batch in (1, 32):
        group = slices[:batch]
        value = rate(lambda g=group: classifier.predict(g), len(group))
        emit(f"model_img_per_s/batch{batch}", value, "img/s", config)
        if batch == 1:
            at_1 = value
    gate = classifier.gate()
    pngs = [encode_png(s) for s in slices[:8]]
    state = {"k": 0}

    def one_job() -> None:
        data = pngs[state["k"] % len(pngs)]
        state["k"] += 1
        report = validate(data, gate=gate)
        assert report.slice_u8 is not None
        (prediction,) = classifier.predict([report.slice_u8])
        heatmap_png(prediction.heatmap)
        overlay_png(report.slice_u8, prediction.heatmap)

    emit("pipeline_in_process_img_per_s", rate(one_job, 1), "img/s", config)
    return at_1


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


def tree_rss_kib(root_pid: int) -> int:
    """Resident memory of a process and its children (KiB), from /proc."""
    total = 0
    pids = [root_pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == root_pid:
                pids.append(int(entry.name))
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def bench_end_to_end(pngs: list[bytes], workers: int, config: dict[str, Any]) -> float:
    """One batch through API → Redis → N workers → PostgreSQL; returns img/s."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    redis.Redis.from_url(BENCH_REDIS).flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")}
    env |= {
        "LIVERSCAN_ENV": "test",
        "LIVERSCAN_DATA_DIR": str(tmp),
        "LIVERSCAN_DATABASE_URL": fresh_database(),
        "LIVERSCAN_BROKER_URL": BENCH_REDIS,
        "LIVERSCAN_STORAGE_BACKEND": "local",
        "LIVERSCAN_STORAGE_DIR": str(tmp / "store"),
        "LIVERSCAN_PASSWORD_HASH_TIME_COST": "1",
        "LIVERSCAN_PASSWORD_HASH_MEMORY_KIB": "8192",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api_cmd = [sys.executable, "-m", "waitress", "--host=127.0.0.1", f"--port={port}",
               "--threads=4", "--call", "api.app:create_app"]  # fmt: skip
    worker_cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
                  "--pool=prefork", f"--concurrency={workers}", "--queues=inference,webhooks",
                  "--loglevel=WARNING", "--without-gossip", "--without-mingle"]  # fmt: skip
    with (tmp / "api.log").open("ab") as api_log, (tmp / "worker.log").open("ab") as worker_log:
        api = subprocess.Popen(api_cmd, cwd=ROOT, env=env, stdout=api_log, stderr=subprocess.STDOUT)
        worker = subprocess.Popen(
            worker_cmd, cwd=ROOT, env=env, stdout=worker_log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
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
        # Warm the worker (TensorFlow import, model load, first trace) outside the measurement.
        warm = requests.post(
            base + "/api/v1/batches",
            headers=headers,
            files=[("file", ("w.png", pngs[0]))],
            timeout=60,
        ).json()
        _wait_completed(base + f"/api/v1/batches/{warm['id']}", headers, 600)

        peak = {"kib": 0}
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak["kib"] = max(peak["kib"], tree_rss_kib(worker.pid))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        rss_before = tree_rss_kib(worker.pid)
        sampler.start()
        files = [("file", (f"s{k:05d}.png", data)) for k, data in enumerate(pngs)]
        t0 = time.perf_counter()
        created = requests.post(base + "/api/v1/batches", headers=headers, files=files, timeout=600)
        created.raise_for_status()
        submitted_s = time.perf_counter() - t0
        url = created.json()["status_url"]
        first = None
        while True:
            batch = requests.get(url, headers=headers, timeout=60).json()
            if first is None and batch["done"] > 0:
                first = time.perf_counter() - t0
            if batch["status"] == "completed":
                break
            time.sleep(0.5)
        elapsed = time.perf_counter() - t0
        stop.set()
        sampler.join()
        cfg = {**config, "workers": workers, "n": len(pngs), "counts": batch["counts"]}
        throughput = len(pngs) / elapsed
        emit(f"e2e_img_per_s/workers{workers}", throughput, "img/s", cfg)
        emit(f"e2e_submit_s/workers{workers}", submitted_s, "s", cfg)
        emit(f"e2e_first_result_s/workers{workers}", first or elapsed, "s", cfg)
        emit(f"worker_rss_mib_before/workers{workers}", rss_before / 1024, "MiB", cfg)
        emit(f"worker_rss_mib_peak/workers{workers}", peak["kib"] / 1024, "MiB", cfg)
        return throughput
    finally:
        for proc in (worker, api):
            proc.terminate()
        for proc in (worker, api):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_completed(url: str, headers: dict[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if requests.get(url, headers=headers, timeout=30).json()["status"] == "completed":
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not complete in {timeout_s} s")


def main(argv: list[str] | None = None) -> int:
    """Run the batch benchmark and print JSON lines."""
    parser = argparse.ArgumentParser(prog="bench/batch.py")
    parser.add_argument("--n", type=int, default=200, help="slices in the end-to-end batch")
    parser.add_argument("--workers", default="1,2", help="worker process counts to run")
    parser.add_argument("--device-note", default="CPU", help="recorded in every line's config")
    parser.add_argument("--skip-e2e", action="store_true", help="model figures only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from ml_core.overlay import encode_png

    config = {"device": args.device_note, "cpus": os.cpu_count()}
    slices = liver_slices(max(args.n, 32))
    bare = bench_model(slices, config)
    if args.skip_e2e:
        return 0
    pngs = [encode_png(s) for s in slices[: args.n]]
    for workers in (int(w) for w in args.workers.split(",")):
        throughput = bench_end_to_end(pngs, workers, config)
        if workers == 1:
            emit("e2e_over_model_batch1", throughput / bare, "ratio", {**config, "n": args.n})
    return 0


if __name__ == "__main__":
    sys.exit(main())
