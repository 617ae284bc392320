"""The sweep re-drives only jobs whose message is really gone: a backed-up inference queue is not
inflated with duplicates (the autoscaler reads its length)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import redis
from scale_support import make_job, make_org
from sqlalchemy import update

from api.domain.models import Job, utcnow
from api.domain.queue import INFERENCE_QUEUE, PROCESS_JOB, make_queue
from api.domain.settings import Settings
from worker import sweep
from worker.context import WorkerContext


def _age(ctx: WorkerContext, job_ids: list[uuid.UUID], seconds: float) -> None:
    with ctx.sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids))
            .values(updated_at=utcnow() - timedelta(seconds=seconds))
        )


def test_waiting_jobs_get_no_duplicate_message_and_lost_ones_are_re_driven(
    ctx: WorkerContext, broker: redis.Redis
) -> None:
    """Five jobs wait behind a backlog past the deadline, sweep after sweep: still five messages.
    Two messages are then lost: the next sweep re-drives exactly those two."""
    org = make_org(ctx)
    job_ids = [make_job(ctx, b"bytes", org_id=org) for _ in range(5)]
    for job_id in job_ids:
        ctx.queue.enqueue(PROCESS_JOB, str(job_id), queue=INFERENCE_QUEUE)

    for _ in range(3):  # three deadlines pass with no worker consuming
        _age(ctx, job_ids, ctx.settings.sweep_deadline_s + 5)
        assert sweep.run(context=ctx)["jobs"] == 0
        assert broker.llen(INFERENCE_QUEUE) == 5

    lost = {str(job_ids[1]), str(job_ids[3])}
    for raw in broker.lrange(INFERENCE_QUEUE, 0, -1):
        if any(job_id in raw.decode() for job_id in lost):
            broker.lrem(INFERENCE_QUEUE, 1, raw)
    assert broker.llen(INFERENCE_QUEUE) == 3
    _age(ctx, job_ids, ctx.settings.sweep_deadline_s + 5)

    assert sweep.run(context=ctx)["jobs"] == 2
    assert ctx.queue.waiting_args(INFERENCE_QUEUE, PROCESS_JOB) == {str(j) for j in job_ids}
    assert broker.llen(INFERENCE_QUEUE) == 5


def test_the_embedded_broker_lists_its_waiting_messages_too(tmp_path) -> None:
    """kombu's SQLAlchemy transport (`make run`) answers which job ids wait in a queue."""
    queue = make_queue(Settings(data_dir=tmp_path))
    queue.enqueue(PROCESS_JOB, "job-a", queue=INFERENCE_QUEUE)
    queue.enqueue(PROCESS_JOB, "job-b", queue=INFERENCE_QUEUE)
    queue.enqueue("liverscan.deliver_webhook", "delivery-c", queue=INFERENCE_QUEUE)
    assert queue.waiting_args(INFERENCE_QUEUE, PROCESS_JOB) == {"job-a", "job-b"}
    assert queue.waiting_args("webhooks", PROCESS_JOB) == set()


def test_a_broker_that_cannot_list_messages_answers_unknown(tmp_path) -> None:
    """The filesystem transport cannot say: None (the sweep then re-drives as before)."""
    queue = make_queue(Settings(data_dir=tmp_path, broker_url="filesystem://"))
    assert queue.waiting_args(INFERENCE_QUEUE, PROCESS_JOB) is None
