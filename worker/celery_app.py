"""The Celery app: two queues (inference, webhooks), late acks, prefetch 1, broker from Settings."""

from __future__ import annotations

import logging
from typing import Any

import kombu.transport.sqlalchemy
from celery import Celery
from celery.concurrency import ALIASES
from celery.signals import celeryd_after_setup, worker_process_init, worker_ready
from kombu import Exchange, Queue

from api.domain.queue import (
    DELIVER_WEBHOOK,
    INFERENCE_QUEUE,
    PROCESS_JOB,
    QUEUES,
    RENDER_REPORT,
    REPORTS_QUEUE,
    SWEEP,
    WEBHOOKS_QUEUE,
)
from api.domain.settings import Settings, get_settings

log = logging.getLogger(__name__)

# The kombu SQLAlchemy transport reads its polling interval from the class; options put in
# broker_transport_options go to create_engine and fail. 0.1 s keeps the embedded runner snappy.
kombu.transport.sqlalchemy.Transport.polling_interval = 0.1

PROC_ALIVE_TIMEOUT_S = 300  # TensorFlow import + model load, on two shared cores

TASK_ROUTES = {
    PROCESS_JOB: {"queue": INFERENCE_QUEUE},
    DELIVER_WEBHOOK: {"queue": WEBHOOKS_QUEUE},
    RENDER_REPORT: {"queue": REPORTS_QUEUE},
    # The sweep is a short query + enqueue: keep it off the queue where slow model jobs wait.
    SWEEP: {"queue": WEBHOOKS_QUEUE},
}


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app for these settings (broker, queues, routes, reliability options)."""
    app = Celery("liverscan", broker=settings.broker_url, include=["worker.tasks"])
    transport_options: dict[str, object] = {}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        # A message not acked within this many seconds is redelivered: longer than any job.
        transport_options["visibility_timeout"] = settings.visibility_timeout_s
    app.conf.update(
        task_queues=tuple(Queue(q, Exchange(q), routing_key=q) for q in QUEUES),
        task_default_queue=INFERENCE_QUEUE,
        task_routes=TASK_ROUTES,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A prefork child loads the model before it reports "up" (worker_process_init). Celery
        # SIGKILLs a replacement child that is not up within 4 s by default, so after one child
        # crash on a busy CPU the pool killed every replacement, forever (tests/reliability).
        worker_proc_alive_timeout=float(PROC_ALIVE_TIMEOUT_S),
        # Micro-batching (worker/batching.py): the threads pool runs `worker_threads` jobs side by
        # side, so up to that many messages are reserved; each is acked after its own job ends.
        worker_pool=settings.worker_pool,
        worker_concurrency=settings.worker_threads,
        task_ignore_result=True,  # the job row is the result
        result_backend=None,
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        beat_schedule={
            "liverscan-sweep": {"task": SWEEP, "schedule": float(settings.sweep_interval_s)},
        },
    )
    return app


celery_app = make_celery(get_settings())


@celeryd_after_setup.connect
def _warn_recycling_not_applied(instance: Any = None, **_: object) -> None:
    """Warn at start for each of --max-tasks-per-child / --max-memory-per-child that this pool
    ignores: Celery hands them to the prefork pool only, so threads or solo recycle nothing."""
    pool = f"{instance.pool_cls.__module__}:{instance.pool_cls.__qualname__}"
    if pool == ALIASES["prefork"]:
        return
    name = next((alias for alias, path in ALIASES.items() if path == pool), pool)
    for option, value in (
        ("max-tasks-per-child", instance.max_tasks_per_child),
        ("max-memory-per-child", instance.max_memory_per_child),
    ):
        if value:
            log.warning(
                "--%s=%s is not applied: the %s pool runs jobs in this one process and Celery "
                "replaces processes only in the prefork pool, so nothing restarts this worker "
                "after a number of jobs or above a memory size; its memory is bounded by its "
                "container's memory limit (docs/operations.md, 'Worker memory')",
                option,
                value,
                name,
            )


@worker_process_init.connect
def _load_model_after_fork(**_: object) -> None:
    """Load the model in each prefork child, after fork (TensorFlow state must not cross a fork)."""
    from worker import model_cache

    if get_settings().worker_preload_model:
        model_cache.preload()


@worker_ready.connect
def _start_in_process_pool(sender: Any = None, **_: object) -> None:
    """threads/solo pools have no child processes: load the model and serve metrics here."""
    from worker import metrics, model_cache

    settings = get_settings()
    metrics.serve(settings.worker_metrics_port, settings.worker_threads)
    if settings.worker_pool != "prefork" and settings.worker_preload_model:
        model_cache.preload()
