"""Prometheus metrics of one worker process: micro-batch sizes, stage latencies, utilisation.

Served by the worker itself on LIVERSCAN_WORKER_METRICS_PORT (0 = off; one process per pod or
container, so no multi-process registry is needed). The API's /metrics adds queue depths and
job counts read from the broker and the database.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

STAGES = ("fetch", "decode", "validate", "infer", "explain", "store")

BATCH_SIZE = Histogram(
    "liverscan_worker_batch_size",
    "Slices per batched model call (model: gate or classifier).",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_SECONDS = Histogram(
    "liverscan_worker_batch_seconds",
    "Seconds one batched model call took.",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STAGE_SECONDS = Histogram(
    "liverscan_worker_stage_seconds",
    "Seconds one job spent per stage: fetch (bytes from the store), decode (decode and pixel "
    "checks), validate (content gate), infer (localiser, classifier and CAM), explain (heatmap "
    "and overlay PNGs), store (artifacts and result row).",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JOBS = Counter("liverscan_worker_jobs_total", "Jobs this worker finished, by outcome.", ["status"])
IN_FLIGHT = Gauge("liverscan_worker_jobs_in_flight", "Jobs this worker process is running now.")
CAPACITY = Gauge("liverscan_worker_capacity", "Jobs this worker process may run side by side.")
BUSY = Counter(
    "liverscan_worker_busy_seconds_total",
    "Seconds with at least one job in flight (rate() of it is the worker's utilisation, 0..1).",
)
MODEL_BUSY = Counter(
    "liverscan_worker_model_busy_seconds_total",
    "Seconds spent inside batched model calls (rate() of it: the model's utilisation, 0..1).",
)
# Not the API's liverscan_store_deletions_pending (counted at every scrape, the one to alert on):
# this process's count goes stale once another worker's sweep clears the backlog.
DELETIONS_PENDING = Gauge(
    "liverscan_sweep_deletions_pending",
    "Store objects (of deleted jobs, failed submits, used upload slots) whose deletion failed "
    "and that the sweep still retries, as "
    "this worker's sweep last counted them (stale once another worker's sweep ran; alert on the "
    "API's liverscan_store_deletions_pending).",
)


class Utilisation:
    """Counts the seconds during which the process has at least one job in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running = 0
        self._since = 0.0

    def enter(self) -> None:
        """A job started."""
        with self._lock:
            if self._running == 0:
                self._since = time.monotonic()
            self._running += 1
            IN_FLIGHT.set(self._running)

    def leave(self) -> None:
        """A job ended (any outcome)."""
        with self._lock:
            self._running = max(0, self._running - 1)
            IN_FLIGHT.set(self._running)
            if self._running == 0:
                BUSY.inc(time.monotonic() - self._since)


utilisation = Utilisation()


def observe_batch(model: str, size: int, seconds: float) -> None:
    """Record one batched model call."""
    BATCH_SIZE.labels(model).observe(size)
    BATCH_SECONDS.labels(model).observe(seconds)
    MODEL_BUSY.inc(seconds)


def observe_stages(timings: dict[str, float]) -> None:
    """Record a job's stage timings (keys `<stage>_s`)."""
    for stage in STAGES:
        value = timings.get(f"{stage}_s")
        if value is not None:
            STAGE_SECONDS.labels(stage).observe(value)


_server_lock = threading.Lock()
_serving = False


def serve(port: int, capacity: int) -> None:
    """Start this process's /metrics HTTP server once (port 0: do nothing)."""
    global _serving
    CAPACITY.set(capacity)
    if port <= 0:
        return
    with _server_lock:
        if _serving:
            return
        try:
            start_http_server(port)
            _serving = True
            log.info("worker metrics on :%d/metrics", port)
        except OSError as exc:  # e.g. a second worker on the same host: metrics off, work goes on
            log.warning("worker metrics port %d unavailable: %s", port, exc)
