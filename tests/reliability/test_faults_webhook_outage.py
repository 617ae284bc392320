"""A webhook receiver down for a long stretch (connections refused) and then back: every event is
delivered once per job (by delivery id), signed, and the delivery log shows each failed attempt
before the one that got through, in order, with backoff between them."""

from __future__ import annotations

import time

import pytest

from tests.e2e.e2e_support import Client, wait_until
from tests.live_stack import Receiver
from tests.reliability.accounting import ResultsFile, Stack, audit, submit_many

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

JOBS = 8
FAILED_ATTEMPTS = 5  # down until every job failed this often (backoff 0.5 s doubling: ~8 s)


def test_events_survive_a_long_receiver_outage_in_order_and_signed(
    stack: Stack, clinic: Client, receiver: Receiver, liver_png: bytes, results: ResultsFile
) -> None:
    with stack.hooks.outage():
        started = time.monotonic()
        ids = submit_many(stack, clinic, liver_png, JOBS)

        def all_failed_enough() -> bool:
            log = stack.deliveries(ids)
            return all(
                sum(1 for a in log.get(i, []) if a.status == "failed") >= FAILED_ATTEMPTS
                for i in ids
            )

        wait_until(all_failed_enough, 180, f"{FAILED_ATTEMPTS} failed attempts per job")
        outage_s = time.monotonic() - started

    stack.wait_settled(ids, timeout_s=180)
    books = audit(stack, "webhook receiver down", ids, clinic.webhook_secret())
    books.extra["outage_s"] = round(outage_s, 1)
    results.write(books.row())

    assert books.problems == [], books.problems[:10]
    assert (books.terminal, books.lost, books.duplicated) == (JOBS, 0, 0)
    assert books.webhooks_delivered == JOBS and books.retried_deliveries == JOBS
    for job_id, attempts in stack.deliveries(ids).items():
        assert [a.attempt for a in attempts] == list(range(1, len(attempts) + 1))
        assert len({a.delivery_id for a in attempts}) == 1  # one event, retried
        *failed, last = attempts
        assert len(failed) >= FAILED_ATTEMPTS, job_id
        assert all(a.status == "failed" and a.error and a.status_code is None for a in failed)
        assert last.status == "succeeded" and last.status_code == 204
        starts = [a.next_attempt_at for a in attempts]
        assert starts == sorted(starts)  # attempts in order, each after the previous one's backoff
