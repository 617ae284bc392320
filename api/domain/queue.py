"""The queue port: enqueue Celery tasks by name, without importing Celery or the worker.

`api.domain` must stay framework-free (import contract), so CeleryQueue speaks Celery's
task message protocol v2 directly through kombu — exactly the message `send_task` would
publish — to the default exchange with the queue name as routing key.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from kombu import Connection
from kombu.pools import producers

from api.domain.errors import BrokerUnavailable
from api.domain.settings import Settings

log = logging.getLogger(__name__)

PROCESS_JOB = "liverscan.process_job"
DELIVER_WEBHOOK = "liverscan.deliver_webhook"
SWEEP = "liverscan.sweep"
RENDER_REPORT = "liverscan.render_report"
INFERENCE_QUEUE = "inference"
WEBHOOKS_QUEUE = "webhooks"
REPORTS_QUEUE = "reports"
QUEUES = (INFERENCE_QUEUE, WEBHOOKS_QUEUE, REPORTS_QUEUE)

_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}


class Queue(Protocol):
    """Where the API and the worker hand ids to workers."""

    def enqueue(
        self,
        task_name: str,
        *args: Any,
        queue: str = INFERENCE_QUEUE,
        countdown: float | None = None,
    ) -> str: ...

    def ping(self) -> None: ...

    def depth(self, queue: str) -> int | None: ...

    def waiting_args(self, queue: str, task_name: str) -> set[str] | None: ...


def celery_message(
    task_name: str, args: tuple[Any, ...], task_id: str, eta: str | None = None
) -> tuple[Any, dict[str, Any]]:
    """Body and headers of a Celery protocol-2 task message."""
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task_name,
        "id": task_id,
        "shadow": None,
        "eta": eta,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(args),
        "kwargsrepr": "{}",
        "origin": f"{os.getpid()}@{socket.gethostname()}",
        "ignore_result": True,
        "stamped_headers": None,
        "stamps": {},
    }
    body: tuple[list[Any], dict[str, Any], dict[str, Any]] = (
        list(args),
        {},
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    )
    return body, headers


class CeleryQueue:
    """Publishes Celery task messages by task name to a broker URL (Redis, SQLAlchemy, filesystem)."""

    def __init__(self, broker_url: str, *, connect_timeout: float = 3.0) -> None:
        self.broker_url = broker_url
        transport_options: dict[str, Any] = {}
        if broker_url.startswith(("redis://", "rediss://")):
            transport_options = {"socket_connect_timeout": connect_timeout, "socket_timeout": 10}
        self._connection = Connection(
            broker_url, connect_timeout=connect_timeout, transport_options=transport_options
        )

    def enqueue(
        self,
        task_name: str,
        *args: Any,
        queue: str = INFERENCE_QUEUE,
        countdown: float | None = None,
    ) -> str:
        """Publish one task message; returns the task id. Raises BrokerUnavailable."""
        task_id = str(uuid.uuid4())
        eta = None
        if countdown:
            eta = (datetime.now(UTC) + timedelta(seconds=countdown)).isoformat()
        body, headers = celery_message(task_name, tuple(args), task_id, eta)
        try:
            with producers[self._connection].acquire(block=True, timeout=5) as producer:
                producer.publish(
                    body,
                    exchange="",
                    routing_key=queue,
                    serializer="json",
                    headers=headers,
                    correlation_id=task_id,
                    reply_to="",
                    delivery_mode=2,
                    retry=True,
                    retry_policy=_RETRY_POLICY,
                )
        except Exception as exc:  # kombu raises transport-specific errors
            log.warning("enqueue of %s failed: %s", task_name, exc)
            raise BrokerUnavailable(details={"reason": type(exc).__name__}) from exc
        log.info("enqueued %s%s on %s as %s", task_name, json.dumps(list(args)), queue, task_id)
        return task_id

    def ping(self) -> None:
        """Raise BrokerUnavailable unless the broker accepts a connection."""
        try:
            with self._connection.clone() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
                if conn.transport_cls in ("redis", "rediss") or str(self.broker_url).startswith(
                    "redis"
                ):
                    conn.default_channel.client.ping()
        except Exception as exc:
            log.warning("broker ping failed: %s", exc)
            raise BrokerUnavailable(details={"reason": type(exc).__name__}) from exc

    def depth(self, queue: str) -> int | None:
        """Messages waiting in `queue`, or None when the broker cannot say."""
        try:
            with self._connection.clone() as conn:
                channel = conn.default_channel
                if self.broker_url.startswith(("redis://", "rediss://")):
                    # The list's length (what KEDA reads); a drained queue's list does not exist,
                    # where a passive declare would fail instead of answering 0.
                    return int(channel.client.llen(queue))
                return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except Exception as exc:
            log.debug("queue depth of %s unavailable: %s", queue, exc)
            return None

    def waiting_args(self, queue: str, task_name: str) -> set[str] | None:
        """First arguments of the `task_name` messages waiting (not yet delivered) in `queue`.

        Redis: the list behind the queue, read in chunks; kombu SQLAlchemy: its visible rows.
        None when the broker cannot list its messages (filesystem, unreachable): callers treat
        that as "unknown". Cost is linear in the queue length (the sweep calls it once a run).
        """
        try:
            with self._connection.clone() as conn:
                channel = conn.default_channel
                raws: Sequence[bytes | str]  # Redis answers bytes, the SQL transport text
                if self.broker_url.startswith(("redis://", "rediss://")):
                    raws = _redis_list(channel.client, queue)
                elif self.broker_url.startswith("sqla+"):
                    raws = _sqlalchemy_rows(channel, queue)
                else:
                    return None
                return {arg for arg in (_first_arg(raw, task_name) for raw in raws) if arg}
        except Exception as exc:
            log.warning("cannot list the messages of %s: %s", queue, exc)
            return None


def _redis_list(client: Any, queue: str, chunk: int = 1000) -> list[bytes]:
    out: list[bytes] = []
    start = 0
    while True:
        part = client.lrange(queue, start, start + chunk - 1)
        out.extend(part)
        if len(part) < chunk:
            return out
        start += chunk


def _sqlalchemy_rows(channel: Any, queue: str) -> list[str]:
    from sqlalchemy import text

    rows = channel.session.execute(
        text(
            "SELECT m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id "
            "WHERE q.name = :name AND m.visible"
        ),
        {"name": queue},
    )
    return [row[0] for row in rows]


def _first_arg(raw: bytes | str, task_name: str) -> str | None:
    """The first task argument of one serialized kombu message, if it is a `task_name` message."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != task_name:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def make_queue(settings: Settings) -> Queue:
    """The Celery queue on `settings.broker_url`."""
    return CeleryQueue(settings.broker_url)
