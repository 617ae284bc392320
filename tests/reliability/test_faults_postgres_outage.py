"""PostgreSQL unreachable for a while (its proxy refuses and resets every connection): the API
answers 503 with the envelope instead of hanging or crashing, nothing half-written remains, jobs
caught mid-flight finish after it returns, and the same API process serves again (no restart)."""

from __future__ import annotations

import time

import pytest
import requests

from tests.e2e.e2e_support import Client
from tests.live_stack import Receiver
from tests.reliability.accounting import ResultsFile, Stack, audit, submit_many, submit_raw

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

BEFORE, AFTER = 6, 4
OUTAGE_S = 6.0


def test_database_outage_answers_503_and_recovers_without_restart(
    stack: Stack, clinic: Client, receiver: Receiver, liver_png: bytes, results: ResultsFile
) -> None:
    api_pid = stack.api.pid
    ids = submit_many(stack, clinic, liver_png, BEFORE)

    answers = []
    in_flight = sum(1 for job in stack.jobs(ids).values() if not job.status.is_terminal)
    with stack.pg.outage():
        started = time.monotonic()
        while time.monotonic() - started < OUTAGE_S:
            submit = submit_raw(stack, clinic, liver_png, callback_url=receiver.url)
            poll = requests.get(
                f"{stack.base_url}/api/v1/jobs/{ids[0]}", headers=clinic.headers, timeout=30
            )
            ready = requests.get(f"{stack.base_url}/readyz", timeout=30)
            answers.append((submit.status_code, submit.json()["error"]["code"]))
            answers.append((poll.status_code, poll.json()["error"]["code"]))
            assert ready.status_code == 503
            assert ready.json()["error"]["details"]["checks"]["database"] == "database_unavailable"
            time.sleep(0.5)
    assert set(answers) == {(503, "database_unavailable")}, set(answers)

    # The same API process serves again: its pool reconnects by itself.
    ids += submit_many(stack, clinic, liver_png, AFTER)
    assert stack.api.poll() is None and stack.api.pid == api_pid

    stack.wait_settled(ids, timeout_s=180)
    books = audit(stack, "postgresql unreachable", ids, clinic.webhook_secret())
    books.extra.update(refused_during_outage=len(answers) // 2, in_flight_at_outage=in_flight)
    results.write(books.row())

    assert in_flight > 0  # the outage caught accepted jobs on their way through the worker
    assert books.problems == [], books.problems[:10]
    assert (books.terminal, books.lost, books.duplicated) == (len(ids), 0, 0)
    assert books.webhooks_delivered == len(ids) and books.statuses == {"succeeded": len(ids)}
    # No partial rows: exactly the accepted jobs exist, and every stored object belongs to one.
    assert {str(j.id) for j in stack.org_jobs(clinic.org_id)} == set(ids)
    assert {key.split("/")[1] for key in stack.store_keys(clinic.org_id)} == set(ids)
