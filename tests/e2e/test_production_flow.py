"""A clinic's whole journey on the production backends: PostgreSQL, Redis, S3 over HTTP, real worker."""

from __future__ import annotations

import json
import time
import uuid

from e2e_support import E2E_REDIS, JOB_TIMEOUT_S, Client, Receiver, Stack, wait_until

from api.domain import jobs
from api.domain.db import make_engine, make_session_factory, session_scope
from api.domain.queue import INFERENCE_QUEUE, PROCESS_JOB, SWEEP, WEBHOOKS_QUEUE, CeleryQueue
from api.domain.settings import Settings
from api.domain.storage import job_key, make_storage
from api.domain.webhooks import verify

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _one_event(receiver: Receiver, job_id: str) -> tuple[dict[str, str], bytes]:
    events = wait_until(lambda: receiver.events(job_id), JOB_TIMEOUT_S, "the webhook")
    assert len(events) == 1
    return events[0]


def test_liver_slice_is_classified_with_overlay_and_signed_webhook(
    production_stack: Stack, receiver: Receiver, liver_png: bytes
) -> None:
    """Upload → succeeded with a model result → overlay PNG → webhook signed with the org secret."""
    client = Client(production_stack.base_url, "Hepatology North")
    job_id = client.submit(liver_png, "slice.png", callback_url=receiver.url)
    job = client.wait_terminal(job_id)

    assert job["status"] == "succeeded", job
    assert job["validation"]["passed"] is True and job["validation"]["reason_code"] is None
    result = job["result"]
    assert result["label"] in ("tumor", "normal")
    assert 0.0 <= result["probability"] <= 1.0
    assert result["label"] == (
        "tumor" if result["probability"] >= result["threshold"] else "normal"
    )
    assert result["model"]["name"] and len(result["model"]["sha256"]) == 64
    assert job["input"]["width"] == 512 and job["input"]["height"] == 512

    overlay = client.get(result["overlay_url"])  # a presigned S3 URL on this backend
    assert overlay.status_code == 200 and overlay.content.startswith(PNG_MAGIC)
    via_api = client.get(f"/api/v1/jobs/{job_id}/artifacts/overlay")  # redirect to the store
    assert via_api.status_code == 200 and via_api.content == overlay.content

    headers, body = _one_event(receiver, job_id)
    assert headers["X-Liverscan-Event"] == "job.succeeded"
    uuid.UUID(headers["X-Liverscan-Delivery"])
    assert verify(client.webhook_secret(), body, headers["X-Liverscan-Signature"])
    event = json.loads(body)
    assert event["event"] == "job.succeeded"
    assert event["job"]["result"]["probability"] == result["probability"]


def test_photo_is_rejected_with_a_reason_and_never_classified(
    production_stack: Stack, receiver: Receiver, photo_png: bytes
) -> None:
    """A grey photograph passes the container checks, then the content gate rejects it; no result."""
    client = Client(production_stack.base_url, "Hepatology South")
    job_id = client.submit(photo_png, "camera.png", callback_url=receiver.url)
    job = client.wait_terminal(job_id)

    assert job["status"] == "rejected", job
    assert job["result"] is None
    validation = job["validation"]
    assert validation["passed"] is False
    assert validation["reason_code"] == "not_liver_ct"  # the learned content gate said no
    (failed,) = [c for c in validation["checks"] if not c["passed"]]
    assert failed["name"] == "content"
    headers, body = _one_event(receiver, job_id)
    assert headers["X-Liverscan-Event"] == "job.rejected"
    assert json.loads(body)["job"]["validation"]["reason_code"] == validation["reason_code"]
    # The upload is kept for audit.
    assert client.get(f"/api/v1/jobs/{job_id}/artifacts/input").content == photo_png


def test_process_job_twice_gives_one_result_and_one_event(
    production_stack: Stack, receiver: Receiver, liver_png: bytes
) -> None:
    """A redelivered process_job message leaves the finished job and its single webhook alone."""
    client = Client(production_stack.base_url, "Hepatology East")
    job_id = client.submit(liver_png, "slice.png", callback_url=receiver.url)
    first = client.wait_terminal(job_id)
    _one_event(receiver, job_id)

    queue = CeleryQueue(E2E_REDIS)
    queue.enqueue(PROCESS_JOB, job_id, queue=INFERENCE_QUEUE)
    # One worker, prefetch 1, FIFO queue: once a job submitted later is done, the duplicate
    # message before it has been consumed.
    marker = client.submit(liver_png, "marker.png")
    client.wait_terminal(marker)

    again = client.job(job_id)
    assert again["finished_at"] == first["finished_at"]
    assert again["result"] == {
        **first["result"],
        "overlay_url": again["result"]["overlay_url"],
        "heatmap_url": again["result"]["heatmap_url"],
    }
    assert len(receiver.events(job_id)) == 1


def test_sweep_re_drives_a_job_whose_message_was_lost(
    production_stack: Stack, liver_png: bytes
) -> None:
    """A job committed but never enqueued (the API died in between) is finished via the sweep."""
    client = Client(production_stack.base_url, "Hepatology West")
    settings = Settings(
        **{
            k.removeprefix("LIVERSCAN_").lower(): v
            for k, v in production_stack.env.items()
            if k.startswith("LIVERSCAN_")
        }
    )
    job_id = uuid.uuid4()
    engine = make_engine(settings)
    with session_scope(make_session_factory(engine)) as session:
        key = job_key(uuid.UUID(client.org_id), job_id, "input")
        upload = make_storage(settings).put(key, liver_png, "image/png")
        jobs.create_job(session, org_id=uuid.UUID(client.org_id), upload=upload, job_id=job_id)
    engine.dispose()

    queue = CeleryQueue(E2E_REDIS)
    last_sweep = [0.0]

    def swept() -> dict | None:
        if time.monotonic() - last_sweep[0] > 2:  # what celery beat does every interval
            queue.enqueue(SWEEP, queue=WEBHOOKS_QUEUE)
            last_sweep[0] = time.monotonic()
        job = client.job(str(job_id))
        return job if job["status"] in ("succeeded", "rejected", "failed") else None

    job = wait_until(swept, JOB_TIMEOUT_S, "the sweep to re-drive the job")
    assert job["status"] == "succeeded"
    assert job["result"]["label"] in ("tumor", "normal")
