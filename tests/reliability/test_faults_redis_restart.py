"""The broker (a redis-server of the test's own, without persistence) is killed while jobs wait in
it and comes back empty: submits during the outage are refused with the envelope and leave
nothing behind, and every accepted job still finishes once — the sweep re-drives it from the
database. A batch submitted beside them completes and sends its `batch.completed` event once."""

from __future__ import annotations

import time

import pytest
import redis

from api.domain.models import JobStatus
from tests.e2e.e2e_support import Client, wait_until
from tests.live_stack import Receiver
from tests.reliability.accounting import (
    ResultsFile,
    Stack,
    audit,
    batch_events,
    submit_batch,
    submit_many,
    submit_raw,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

JOBS, BATCH = 16, 4


def test_jobs_queued_in_a_dead_redis_finish_after_it_returns(
    stack: Stack, clinic: Client, receiver: Receiver, liver_png: bytes, results: ResultsFile
) -> None:
    ids = submit_many(stack, clinic, liver_png, JOBS)
    batch = submit_batch(stack, clinic, liver_png, BATCH)
    ids += batch["job_ids"]
    waiting = redis.Redis.from_url(stack.redis.url).llen("inference")
    stack.redis.kill()
    still_queued = sum(1 for j in stack.jobs(ids).values() if j.status is JobStatus.QUEUED)

    refused = submit_raw(stack, clinic, liver_png, callback_url=receiver.url)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "broker_unavailable"
    time.sleep(2.0)
    stack.redis.start()  # empty: every message it held is gone

    stack.wait_settled(ids, timeout_s=180)
    wait_until(lambda: batch_events(receiver, batch["id"]), 60, "the batch.completed event")
    books = audit(stack, "redis killed and restarted empty", ids, clinic.webhook_secret())
    books.extra.update(
        messages_lost_with_redis=waiting, queued_at_kill=still_queued, batches_completed=1
    )
    results.write(books.row())

    assert waiting > 0 and still_queued > 0  # the outage really took queued work with it
    assert books.problems == [], books.problems[:10]
    total = JOBS + BATCH
    assert (books.terminal, books.lost, books.duplicated) == (total, 0, 0)
    assert books.webhooks_delivered == total and books.statuses == {"succeeded": total}
    (event,) = batch_events(receiver, batch["id"]).values()  # one, whatever was redelivered
    assert receiver.signed(event, clinic.webhook_secret())
    assert event.payload["batch"]["counts"]["succeeded"] == BATCH
    assert event.payload["batch"]["status"] == "completed"
    # The refused submit left no row and no bytes.
    assert {str(j.id) for j in stack.org_jobs(clinic.org_id)} == set(ids)
    assert {key.split("/")[1] for key in stack.store_keys(clinic.org_id)} == set(ids)
