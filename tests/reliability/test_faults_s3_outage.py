"""The S3 endpoint down (its proxy refuses and resets connections): uploads are refused with a
503 envelope and leave no job row; jobs already accepted wait out the outage (bounded retries)
and finish; every job row's upload is in the store."""

from __future__ import annotations

import time

import pytest
import requests

from tests.e2e.e2e_support import Client
from tests.live_stack import Receiver
from tests.reliability.accounting import ResultsFile, Stack, audit, submit_many, submit_raw

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

BEFORE, AFTER = 6, 4
OUTAGE_S = 4.0


def test_store_outage_refuses_uploads_and_never_leaves_a_row_without_bytes(
    stack: Stack, clinic: Client, receiver: Receiver, liver_png: bytes, results: ResultsFile
) -> None:
    ids = submit_many(stack, clinic, liver_png, BEFORE)

    answers = []
    in_flight = sum(1 for job in stack.jobs(ids).values() if not job.status.is_terminal)
    with stack.s3.outage():
        started = time.monotonic()
        while time.monotonic() - started < OUTAGE_S:
            refused = submit_raw(stack, clinic, liver_png, callback_url=receiver.url)
            answers.append((refused.status_code, refused.json()["error"]["code"]))
            ready = requests.get(f"{stack.base_url}/readyz", timeout=30)
            assert ready.status_code == 503
            assert ready.json()["error"]["details"]["checks"]["storage"] == "storage_unavailable"
            time.sleep(0.5)
    assert set(answers) == {(503, "storage_unavailable")}, set(answers)

    ids += submit_many(stack, clinic, liver_png, AFTER)

    stack.wait_settled(ids, timeout_s=180)
    books = audit(stack, "s3 endpoint down", ids, clinic.webhook_secret())
    books.extra.update(refused_during_outage=len(answers), in_flight_at_outage=in_flight)
    results.write(books.row())

    assert in_flight > 0  # the outage caught accepted jobs on their way through the worker
    assert books.problems == [], books.problems[:10]
    assert (books.terminal, books.lost, books.duplicated) == (len(ids), 0, 0)
    assert books.webhooks_delivered == len(ids) and books.statuses == {"succeeded": len(ids)}
    rows = stack.org_jobs(clinic.org_id)
    assert {str(j.id) for j in rows} == set(ids)  # no row for a refused upload
    keys = stack.store_keys(clinic.org_id)
    assert all(job.input_key in keys for job in rows)  # never a row without bytes
