"""Operations: liveness, readiness (database, broker, store) and Prometheus metrics."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator, Sequence
from statistics import quantiles
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from api.auth import Unauthenticated
from api.domain import retention
from api.domain.db import ping as db_ping
from api.domain.errors import LiverscanError
from api.domain.models import Job, JobStatus
from api.domain.queue import QUEUES
from api.errors import error_response
from api.resources import Resources, resources

log = logging.getLogger(__name__)

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """The process is alive."""
    return jsonify({"status": "ok"}), 200


def readiness(res: Resources) -> dict[str, str]:
    """ "ok" or the error code for each dependency: database, broker, store."""
    checks: dict[str, str] = {}
    for name, probe in (
        ("database", lambda: db_ping(res.engine) if res.engine is not None else None),
        ("broker", res.queue.ping),
        ("storage", res.storage.ping),
    ):
        try:
            probe()
            checks[name] = "ok"
        except LiverscanError as exc:
            checks[name] = exc.code
        except Exception as exc:
            log.warning("readiness probe %s failed: %s", name, exc)
            checks[name] = "unavailable"
    return checks


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    """200 when database, broker and store answer; 503 naming the failing parts otherwise."""
    checks = readiness(resources())
    failing = [name for name, state in checks.items() if state != "ok"]
    if failing:
        return error_response(
            "not_ready",
            "Not ready: " + ", ".join(failing) + " unavailable.",
            503,
            {"checks": checks},
        )
    return jsonify({"status": "ready", "checks": checks}), 200


class LiverscanCollector(Collector):
    """Reads job counts, queue depth, stage durations, model version and the store deletions still
    owed at scrape time."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (read from the database and broker now)."""
        res: Resources = self.app.extensions["liverscan"]
        jobs = GaugeMetricFamily("liverscan_jobs", "Jobs by status.", labels=["status"])
        depth = GaugeMetricFamily(
            "liverscan_queue_depth", "Messages waiting per queue.", labels=["queue"]
        )
        stage = GaugeMetricFamily(
            "liverscan_stage_duration_seconds",
            "Stage durations of the last 500 finished jobs.",
            labels=["stage", "quantile"],
        )
        model = InfoMetricFamily("liverscan_model", "Model of the most recent succeeded job.")
        up = GaugeMetricFamily("liverscan_database_up", "Whether the database answered the scrape.")
        pending = GaugeMetricFamily(
            "liverscan_store_deletions_pending",
            "Store objects (of deleted jobs, failed submits, used upload slots) whose deletion "
            "failed and that the sweep still retries "
            "(counted at scrape time; above 0 for long: the store refuses deletes).",
        )
        try:
            with res.session_factory() as session:
                counts = dict(
                    session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
                )
                for status in JobStatus:
                    jobs.add_metric([status.value], float(counts.get(status, 0)))
                pending.add_metric([], float(retention.pending_deletions(session)))
                latest = session.execute(
                    select(Job.model_name, Job.model_version, Job.model_sha256)
                    .where(Job.status == JobStatus.SUCCEEDED)
                    .order_by(Job.finished_at.desc())
                    .limit(1)
                ).first()
                if latest is not None:
                    model.add_metric(
                        [],
                        {
                            "name": latest[0] or "",
                            "version": latest[1] or "",
                            "sha256": latest[2] or "",
                        },
                    )
                recent = session.execute(
                    select(Job.timings, Job.created_at, Job.finished_at)
                    .where(Job.finished_at.is_not(None))
                    .order_by(Job.finished_at.desc())
                    .limit(500)
                ).all()
            for name, values in _stage_samples(recent).items():
                for q, v in _quantiles(values).items():
                    stage.add_metric([name, q], v)
            up.add_metric([], 1.0)
        except Exception as exc:
            log.warning("metrics: database unavailable: %s", exc)
            up.add_metric([], 0.0)
        for queue in QUEUES:
            n = res.queue.depth(queue)
            if n is not None:
                depth.add_metric([queue], float(n))
        yield from (jobs, depth, stage, model, up, pending)


def _stage_samples(rows: Sequence[Any]) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    for timings, created, finished in rows:
        if created and finished:
            samples.setdefault("end_to_end", []).append((finished - created).total_seconds())
        for name, value in (timings or {}).items():
            if isinstance(value, int | float):
                samples.setdefault(str(name).removesuffix("_s"), []).append(float(value))
    return samples


def _quantiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"0.5": values[0], "0.95": values[0]}
    cuts = quantiles(values, n=20, method="inclusive")
    return {"0.5": cuts[9], "0.95": cuts[18]}


def init_metrics(app: Flask) -> None:
    """Give the app its own registry (several apps may live in one test process)."""
    registry = CollectorRegistry()
    registry.register(LiverscanCollector(app))
    app.extensions["liverscan_metrics"] = registry


def scraper_allowed(token: str, authorization: str) -> bool:
    """Whether a request with this Authorization header may read /metrics: any request when no
    token is configured, else one sending `Bearer <token>` (compared in constant time)."""
    if not token:
        return True
    scheme, _, given = authorization.strip().partition(" ")
    matches = hmac.compare_digest(given.strip().encode(), token.encode())
    return scheme.lower() == "bearer" and matches


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text exposition (401 unauthorized without LIVERSCAN_METRICS_TOKEN when set)."""
    token = resources().settings.metrics_token
    if not scraper_allowed(token, request.headers.get("Authorization", "")):
        raise Unauthenticated("/metrics needs Authorization: Bearer <LIVERSCAN_METRICS_TOKEN>.")
    registry: CollectorRegistry = current_app.extensions["liverscan_metrics"]
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
