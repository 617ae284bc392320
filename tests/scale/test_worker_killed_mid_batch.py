"""A micro-batching worker (threads pool, shipped model) killed in the middle of a batch: its jobs
come back through the sweep and through the broker's redelivery, and each finishes exactly once.
Then a PDF report is rendered by the worker on the first GET of its URL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from kombu import Connection
from scale_support import load_job, make_job, make_org, webhook_events
from sqlalchemy import select, update

from api.app import create_app
from api.domain import accounts
from api.domain.models import TERMINAL_STATUSES, Job, JobStatus, User, utcnow
from api.domain.queue import INFERENCE_QUEUE, PROCESS_JOB
from api.domain.settings import Settings
from ml_core.overlay import encode_png
from tests.e2e.e2e_support import ROOT, STARTUP_TIMEOUT_S, base_env, wait_until
from worker import sweep
from worker.context import WorkerContext

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_JOBS = 12
PASSWORD = "correct-horse-42"


def start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    """A real Celery worker: threads pool, batches of 4, on the inference and reports queues."""
    env = base_env(
        env="test",
        data_dir=str(settings.data_dir),
        database_url=settings.database_url,
        broker_url=settings.broker_url,
        storage_backend="local",
        storage_dir=str(settings.storage_dir),
        worker_batch_size="4",
        worker_batch_wait_ms="200",
        webhook_allow_private="true",
    )
    args = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
            "--queues=inference,reports", f"--hostname=scale-kill-{time.time_ns()}@%h",
            "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
    handle = log.open("ab")
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker processes a test starts; any still running at the end are stopped."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _statuses(ctx: WorkerContext, ids: list[uuid.UUID]) -> list[JobStatus]:
    with ctx.sessions() as session:
        rows = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(ids))).all())
    return [rows[j] for j in ids]


def test_jobs_of_a_worker_killed_mid_batch_finish_once(
    ctx: WorkerContext, settings: Settings, liver_slices: list[np.ndarray], workers, tmp_path: Path
) -> None:
    """SIGKILL while jobs are processing; sweep + redelivered messages + a new worker: every job
    succeeds, each with one terminal event, although some got two messages."""
    org = make_org(ctx)
    ids = [
        make_job(
            ctx, encode_png(liver_slices[k % 6]), callback_url="http://127.0.0.1:9/h", org_id=org
        )
        for k in range(N_JOBS)
    ]
    for job_id in ids:
        ctx.queue.enqueue(PROCESS_JOB, str(job_id), queue=INFERENCE_QUEUE)
    first = start_worker(settings, tmp_path / "worker-1.log")
    workers.append(first)
    wait_until(
        lambda: JobStatus.PROCESSING in _statuses(ctx, ids), STARTUP_TIMEOUT_S, "a batch in flight"
    )
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    at_kill = _statuses(ctx, ids)
    assert JobStatus.PROCESSING in at_kill and set(at_kill) - TERMINAL_STATUSES

    # What happens next in production, made immediate: the sweep deadline passes...
    with ctx.sessions.begin() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids), Job.status.in_([JobStatus.QUEUED, JobStatus.PROCESSING]))
            .values(updated_at=utcnow() - timedelta(seconds=settings.sweep_deadline_s + 5))
        )
    redriven = sweep.run(context=ctx)["jobs"]
    assert redriven >= 1
    # ...and the broker's visibility timeout hands the dead worker's unacked messages out again.
    with Connection(settings.broker_url, transport_options={"visibility_timeout": 0}) as conn:
        conn.default_channel.qos.restore_visible(num=1000, interval=1)
    waiting = ctx.queue.waiting_args(INFERENCE_QUEUE, PROCESS_JOB) or set()
    unfinished = {str(j) for j, s in zip(ids, at_kill, strict=True) if s not in TERMINAL_STATUSES}
    assert unfinished <= waiting  # every unfinished job has a message again

    workers.append(start_worker(settings, tmp_path / "worker-2.log"))
    wait_until(
        lambda: set(_statuses(ctx, ids)) <= TERMINAL_STATUSES, STARTUP_TIMEOUT_S, "every job"
    )
    wait_until(lambda: ctx.queue.depth(INFERENCE_QUEUE) == 0, 120, "the duplicates consumed")
    assert _statuses(ctx, ids) == [JobStatus.SUCCEEDED] * N_JOBS
    assert [webhook_events(ctx, j) for j in ids] == [1] * N_JOBS  # finished once, not twice
    assert all(load_job(ctx, j).attempts <= 3 for j in ids)

    # The PDF of a succeeded job: rendered by that worker (reports queue) on the first GET.
    app = create_app(
        settings.model_copy(
            update={"jwt_secret_key": "scale-secret-" + "k" * 40, "report_wait_s": 120}
        )
    )
    email = f"dr-{uuid.uuid4().hex[:8]}@clinic.test"
    with ctx.sessions.begin() as session:
        user = accounts.signup(
            session, accounts.make_hasher(settings), settings=settings, email=email, password=PASSWORD,
            name="Dr Scale", organization="Scale",
        )  # fmt: skip
        session.flush()
        session.execute(update(Job).where(Job.id == ids[0]).values(org_id=user.org_id))
        session.execute(update(User).where(User.id == user.id).values(org_id=user.org_id))
    client = app.test_client()
    token = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    headers = {"Authorization": f"Bearer {token.get_json()['access_token']}"}
    job = client.get(f"/api/v1/jobs/{ids[0]}", headers=headers).get_json()
    assert job["result"]["report_url"].endswith(f"/api/v1/jobs/{ids[0]}/report")
    assert load_job(ctx, ids[0]).report_key is None
    pdf = client.get(f"/api/v1/jobs/{ids[0]}/report", headers=headers)
    assert pdf.status_code == 200 and pdf.data.startswith(b"%PDF")
    assert load_job(ctx, ids[0]).report_key is not None
