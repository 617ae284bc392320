"""The queue port publishes real Celery task messages by name (no worker import) to Redis."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from api.domain.errors import BrokerUnavailable
from api.domain.queue import CeleryQueue, make_queue
from api.domain.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/14"


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    """The Redis database these tests publish to, emptied around each test."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


def test_enqueue_puts_a_celery_message_on_the_named_queue(broker: redis.Redis) -> None:
    job_id = str(uuid.uuid4())
    task_id = CeleryQueue(REDIS_URL).enqueue("liverscan.process_job", job_id, queue="inference")
    raw = broker.lrange("inference", 0, -1)
    assert len(raw) == 1
    message = json.loads(raw[0])
    assert message["headers"]["task"] == "liverscan.process_job"
    assert message["headers"]["id"] == task_id
    assert message["properties"]["delivery_info"]["routing_key"] == "inference"
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [job_id] and kwargs == {}
    assert broker.llen("webhooks") == 0


def test_a_real_celery_worker_runs_the_task_by_name(broker: redis.Redis) -> None:
    received: list[str] = []
    done = threading.Event()
    app = Celery("queue-test", broker=REDIS_URL)
    app.conf.update(
        task_default_queue="inference",
        result_backend=None,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
    )

    @app.task(name="liverscan.process_job")
    def process_job(job_id: str) -> None:
        received.append(job_id)
        done.set()

    job_id = str(uuid.uuid4())
    with start_worker(
        app, pool="solo", perform_ping_check=False, loglevel="WARNING", queues=["inference"]
    ):
        CeleryQueue(REDIS_URL).enqueue("liverscan.process_job", job_id)
        assert done.wait(30), "the Celery worker never ran the task"
    assert received == [job_id]


def test_countdown_sets_an_eta(broker: redis.Redis) -> None:
    CeleryQueue(REDIS_URL).enqueue(
        "liverscan.deliver_webhook", "d1", queue="webhooks", countdown=60
    )
    message = json.loads(broker.lrange("webhooks", 0, -1)[0])
    assert message["headers"]["eta"] is not None


def test_depth_counts_waiting_messages(broker: redis.Redis) -> None:
    queue = CeleryQueue(REDIS_URL)
    for i in range(3):
        queue.enqueue("liverscan.process_job", str(i))
    assert queue.depth("inference") == 3


def test_dead_broker_is_broker_unavailable() -> None:
    queue = CeleryQueue("redis://127.0.0.1:1/0")
    for call in (queue.ping, lambda: queue.enqueue("liverscan.process_job", "x")):
        with pytest.raises(BrokerUnavailable) as info:
            call()
        assert info.value.code == "broker_unavailable"


def test_embedded_default_broker_needs_no_server(tmp_path: Path) -> None:
    queue = make_queue(Settings(env="test", data_dir=tmp_path))
    queue.ping()
    queue.enqueue("liverscan.process_job", "abc")
    assert queue.depth("inference") == 1
    assert (tmp_path / "broker.sqlite").exists()
