"""Webhook delivery as a clinic's receiver sees it: signed events, retries, recorded attempts."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from calendar import timegm
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select
from worker_support import load_job, make_job, queued_tasks

from api.domain import jobs, secrets
from api.domain.models import JobStatus, Organization, WebhookDelivery
from api.domain.settings import Settings
from api.domain.storage import HEATMAP_NAME, OVERLAY_NAME, S3Storage, job_key
from api.domain.webhooks import verify
from worker import webhooks
from worker.context import WorkerContext


@dataclass
class Receiver:
    """A loopback HTTP endpoint that records every POST and answers with scripted statuses."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A running receiver on 127.0.0.1; answers 200 once its scripted statuses run out."""
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests.append(({k: v for k, v in self.headers.items()}, body))
            self.send_response(state.statuses.pop(0) if state.statuses else 200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_port}/hooks/liverscan"
    yield state
    server.shutdown()
    server.server_close()


def _fail_job(ctx: WorkerContext, callback_url: str) -> uuid.UUID:
    """A terminal job with a scheduled (not yet sent) event; returns the first attempt's row id."""
    job_id = make_job(ctx, b"\x89PNG not really", callback_url=callback_url)
    with ctx.sessions.begin() as session:
        jobs.mark_processing(session, job_id)
        job = jobs.mark_failed(
            session, job_id, error_code="undecodable", error_message="bad pixels"
        )
        row_id = webhooks.schedule(session, job, ctx)
    assert row_id is not None
    return row_id


def _secret(ctx: WorkerContext, job_id: uuid.UUID) -> str:
    with ctx.sessions() as session:
        org = session.get(Organization, load_job(ctx, job_id).org_id)
        assert org is not None
        return secrets.unseal(ctx.settings, org.webhook_secret)


def _attempts(ctx: WorkerContext, job_id: uuid.UUID) -> list[WebhookDelivery]:
    with ctx.sessions() as session:
        return list(
            session.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.job_id == job_id)
                .order_by(WebhookDelivery.attempt)
            )
        )


def test_event_is_signed_with_the_org_secret(ctx: WorkerContext, receiver: Receiver) -> None:
    """The receiver gets the job JSON with event, delivery id and a verifiable signature."""
    row_id = _fail_job(ctx, receiver.url)
    assert webhooks.deliver(row_id, context=ctx) == "succeeded"

    (headers, body) = receiver.requests[0]
    payload = json.loads(body)
    job_id = uuid.UUID(payload["job"]["id"])
    assert payload["event"] == "job.failed" and headers["X-Liverscan-Event"] == "job.failed"
    assert payload["job"]["status"] == "failed"
    assert payload["job"]["error"] == {"code": "undecodable", "message": "bad pixels"}
    assert payload["job"]["result"] is None
    assert verify(_secret(ctx, job_id), body, headers["X-Liverscan-Signature"])
    assert not verify("whsec_someone_else", body, headers["X-Liverscan-Signature"])
    (attempt,) = _attempts(ctx, job_id)
    assert str(attempt.delivery_id) == headers["X-Liverscan-Delivery"]
    assert attempt.status == "succeeded" and attempt.status_code == 200
    assert attempt.latency_ms is not None and attempt.latency_ms > 0


def test_non_2xx_is_retried_with_the_same_delivery_id(
    ctx: WorkerContext, receiver: Receiver, broker
) -> None:
    """A 500 records the attempt and queues the next one; the retry reuses X-Liverscan-Delivery."""
    receiver.statuses = [500]
    row_id = _fail_job(ctx, receiver.url)
    assert webhooks.deliver(row_id, context=ctx) == "failed"

    ((task, args),) = queued_tasks(broker, "webhooks")
    assert task == "liverscan.deliver_webhook"
    assert webhooks.deliver(args[0], context=ctx) == "succeeded"

    first, second = receiver.requests
    assert first[0]["X-Liverscan-Delivery"] == second[0]["X-Liverscan-Delivery"]
    assert json.loads(first[1]) == json.loads(second[1])
    job_id = uuid.UUID(json.loads(first[1])["job"]["id"])
    attempts = _attempts(ctx, job_id)
    assert [(a.attempt, a.status, a.status_code) for a in attempts] == [
        (1, "failed", 500),
        (2, "succeeded", 200),
    ]
    # Exponential backoff: the second attempt was due base · 2^0 s after the first.
    assert attempts[1].next_attempt_at > attempts[0].created_at


def test_attempts_stop_at_the_configured_maximum(
    ctx: WorkerContext, receiver: Receiver, broker
) -> None:
    """After webhook_max_attempts failures the event is exhausted and nothing more is queued."""
    receiver.statuses = [503, 503, 503, 503]
    row_id: str = str(_fail_job(ctx, receiver.url))
    statuses = []
    for _ in range(ctx.settings.webhook_max_attempts):
        statuses.append(webhooks.deliver(row_id, context=ctx))
        queued = queued_tasks(broker, "webhooks")
        broker.delete("webhooks")
        row_id = queued[0][1][0] if queued else ""
    assert statuses == ["failed", "failed", "exhausted"]
    assert row_id == ""
    assert len(receiver.requests) == ctx.settings.webhook_max_attempts


def test_unreachable_receiver_counts_as_a_failed_attempt(ctx: WorkerContext, broker) -> None:
    """A closed port is recorded as an error (no status code) and retried."""
    row_id = _fail_job(ctx, "http://127.0.0.1:9/hook")
    assert webhooks.deliver(row_id, context=ctx) == "failed"
    with ctx.sessions() as session:
        row = session.get(WebhookDelivery, row_id)
        assert row is not None and row.status_code is None and row.error == "ConnectionError"
    assert [t for t, _ in queued_tasks(broker, "webhooks")] == ["liverscan.deliver_webhook"]


def test_private_callback_is_refused_at_delivery_time(
    ctx: WorkerContext, receiver: Receiver
) -> None:
    """Without WEBHOOK_ALLOW_PRIVATE a loopback URL is never POSTed to, and not retried."""
    row_id = _fail_job(ctx, receiver.url)
    ctx.settings.webhook_allow_private = False
    assert webhooks.deliver(row_id, context=ctx) == "exhausted"
    assert receiver.requests == []
    with ctx.sessions() as session:
        row = session.get(WebhookDelivery, row_id)
        assert row is not None and row.error == "callback_url_refused: private_address"


def test_duplicate_message_does_not_post_twice(ctx: WorkerContext, receiver: Receiver) -> None:
    """A redelivered attempt message is a no-op once the attempt was made."""
    row_id = _fail_job(ctx, receiver.url)
    assert webhooks.deliver(row_id, context=ctx) == "succeeded"
    assert webhooks.deliver(row_id, context=ctx) == "succeeded"
    assert len(receiver.requests) == 1


def test_one_event_per_terminal_state(ctx: WorkerContext, receiver: Receiver) -> None:
    """Scheduling the same job's event again creates no second delivery."""
    job_id = make_job(ctx, b"x", callback_url=receiver.url)
    with ctx.sessions.begin() as session:
        jobs.mark_processing(session, job_id)
        job = jobs.mark_failed(session, job_id, error_code="undecodable", error_message="x")
        assert webhooks.schedule(session, job, ctx) is not None
        assert webhooks.schedule(session, job, ctx) is None
    assert load_job(ctx, job_id).status is JobStatus.FAILED


@pytest.fixture
def s3_ctx(settings: Settings, s3_endpoint: str, broker) -> Iterator[WorkerContext]:
    """A worker context on an S3 store whose presigned URLs live one second."""
    s3_settings = settings.model_copy(
        update={
            "storage_backend": "s3",
            "s3_endpoint_url": s3_endpoint,
            "s3_bucket": "liverscan-webhooks",
            "aws_access_key_id": "test",
            "aws_secret_access_key": "test",
            "presign_expires_s": 1,
        }
    )
    context = WorkerContext.from_settings(s3_settings)
    assert isinstance(context.storage, S3Storage)
    context.storage.ensure_bucket()
    yield context
    context.engine.dispose()


def _succeed_job(ctx: WorkerContext, callback_url: str) -> uuid.UUID:
    """A succeeded job with an overlay and a heatmap in the store and its event scheduled."""
    job_id = make_job(ctx, b"\x89PNG input", callback_url=callback_url)
    org_id = load_job(ctx, job_id).org_id
    keys = {
        "heatmap": job_key(org_id, job_id, HEATMAP_NAME),
        "overlay": job_key(org_id, job_id, OVERLAY_NAME),
    }
    for name, key in keys.items():
        ctx.storage.put(key, f"{name} bytes".encode(), "image/png")
    with ctx.sessions.begin() as session:
        jobs.mark_processing(session, job_id)
        job = jobs.mark_succeeded(
            session,
            job_id,
            label="tumor",
            probability=0.9,
            threshold=0.5,
            model_name="m",
            model_version="1",
            model_sha256="0" * 64,
            heatmap_key=keys["heatmap"],
            overlay_key=keys["overlay"],
        )
        row_id = webhooks.schedule(session, job, ctx)
    assert row_id is not None
    return row_id


def _expires_at(url: str) -> int:
    """Unix time at which a SigV4 presigned URL stops working (X-Amz-Date + X-Amz-Expires)."""
    query = parse_qs(urlsplit(url).query)
    signed = time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ")
    return timegm(signed) + int(query["X-Amz-Expires"][0])


def test_a_late_retry_carries_artifact_urls_minted_when_it_is_sent(
    s3_ctx: WorkerContext, receiver: Receiver, broker
) -> None:
    """A retry sent after the scheduled URLs' lifetime still hands the receiver working links:
    each attempt presigns them anew, and the signature covers the body actually sent."""
    receiver.statuses = [500]
    row_id = _succeed_job(s3_ctx, receiver.url)
    assert webhooks.deliver(row_id, context=s3_ctx) == "failed"
    ((_, args),) = queued_tasks(broker, "webhooks")

    time.sleep(2.2)  # past the 1 s lifetime of any URL made at scheduling or the first attempt
    sent_at = time.time()
    assert webhooks.deliver(args[0], context=s3_ctx) == "succeeded"

    headers, body = receiver.requests[1]
    result = json.loads(body)["job"]["result"]
    for name in ("heatmap", "overlay"):
        url = result[f"{name}_url"]
        assert _expires_at(url) > sent_at, f"{name}_url had expired when the retry was sent"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == f"{name} bytes".encode()
    job_id = uuid.UUID(json.loads(body)["job"]["id"])
    assert verify(_secret(s3_ctx, job_id), body, headers["X-Liverscan-Signature"])
