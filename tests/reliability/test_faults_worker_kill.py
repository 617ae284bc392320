"""kill -9 the worker mid-job, six times, over 100 jobs: every job ends in exactly one
terminal state, its result is written once, and its webhook arrives once (by delivery id), signed.

Most kills hit the prefork child running the job (Celery requeues its message: late ack, reject on
worker lost); every third kill takes the whole worker down (its message waits unacked in Redis, the
sweep re-drives the job from the database) and a new worker is started.
"""

from __future__ import annotations

import time

import pytest

from api.domain.models import JobStatus
from tests.e2e.e2e_support import Client
from tests.live_stack import Receiver
from tests.reliability.accounting import ResultsFile, Stack, audit, submit_raw

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.slow]

JOBS = 100
IN_FLIGHT = 6  # a steady producer: at most this many unfinished jobs at a time
KILL_EVERY = 16  # kill while every 16th job is processing: 6 kills (each costs a model load)
WHOLE_WORKER_EVERY = 3  # every 3rd kill is of the whole worker, not just the child
SCENARIO_TIMEOUT_S = 420.0


def wait_for_processing(stack: Stack, job_id: str, timeout_s: float) -> bool:
    """Poll one job's row every few ms; True once it is processing, False if it ended or timed out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = stack.jobs([job_id]).get(job_id)
        if row is not None and row.status is JobStatus.PROCESSING:
            return True
        if row is not None and row.status.is_terminal:
            return False
        time.sleep(0.002)
    return False


def test_every_job_survives_repeated_worker_kills(
    stack: Stack, clinic: Client, receiver: Receiver, liver_png: bytes, results: ResultsFile
) -> None:
    ids: list[str] = []
    targets: set[str] = set()  # jobs chosen to be killed mid-processing
    killed: dict[str, str] = {}  # job id → "child" | "worker"
    watched: set[str] = set()
    deadline = time.monotonic() + SCENARIO_TIMEOUT_S
    while time.monotonic() < deadline:
        rows = stack.jobs(ids) if ids else {}
        unfinished = [i for i in ids if not rows[i].status.is_terminal]
        while len(ids) < JOBS and len(unfinished) < IN_FLIGHT:
            response = submit_raw(stack, clinic, liver_png, callback_url=receiver.url)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
            unfinished.append(ids[-1])
            if len(ids) % KILL_EVERY == 0:
                targets.add(ids[-1])
                break  # watch it now: a job is done in ~0.1 s, before a few more POSTs return
        if len(ids) == JOBS and not unfinished:
            break
        for job_id in sorted(targets - set(killed) - watched):
            watched.add(job_id)  # one try per target: a job that finished first is not retried
            # A job takes ~0.1 s here: watch this one row closely until it is being processed.
            if wait_for_processing(stack, job_id, timeout_s=15.0):
                if (len(killed) + 1) % WHOLE_WORKER_EVERY == 0:
                    stack.worker.kill()
                    killed[job_id] = "worker"
                    stack.worker.start()
                elif stack.worker.kill_child() is not None:
                    killed[job_id] = "child"
            break
        time.sleep(0.05)

    stack.wait_settled(ids, timeout_s=max(30.0, deadline - time.monotonic()))
    books = audit(stack, "worker kill -9 mid-job", ids, clinic.webhook_secret())
    books.extra["rerun_after_kill"] = sum(
        1 for row in stack.jobs(list(killed)).values() if row.attempts >= 2
    )
    books.extra["kills"] = {
        "child": sum(1 for k in killed.values() if k == "child"),
        "worker": sum(1 for k in killed.values() if k == "worker"),
    }
    results.write(books.row())

    assert len(ids) == JOBS
    assert len(killed) >= JOBS // KILL_EVERY - 2, killed  # the kills really happened mid-job
    assert "worker" in killed.values()
    assert books.problems == [], books.problems[:10]
    assert (books.terminal, books.lost, books.duplicated) == (JOBS, 0, 0)
    assert books.webhooks_delivered == JOBS
    # One kill per job stays within the pipeline's attempt budget: nothing gave up.
    assert books.statuses == {"succeeded": JOBS}, books.statuses
    # The kills landed mid-job: those jobs were processed again (a kill may land just after a
    # job committed, so not every one of them needs a second attempt).
    rerun = sum(1 for row in stack.jobs(list(killed)).values() if row.attempts >= 2)
    assert rerun >= len(killed) // 2, (rerun, len(killed))
