"""Webhook delivery: signed POSTs of job events, every attempt recorded, retried with backoff.

One event of one job is one `delivery_id` (sent as X-Liverscan-Delivery, stable across retries);
each attempt is its own `WebhookDelivery` row with its status code and latency. The SSRF guard is
re-checked at delivery time because DNS may have changed since submit, and the POST goes to the
address that was checked (no second lookup a rebinding name could answer differently). The
event's presigned artifact URLs are likewise made again for each attempt, so a retry after
backoff never carries links that expired while it waited.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import urllib3
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.domain import batches, secrets
from api.domain.db import session_scope
from api.domain.errors import CallbackUrlRefused
from api.domain.models import Job, JobStatus, Organization, WebhookDelivery, utcnow
from api.domain.queue import DELIVER_WEBHOOK, WEBHOOKS_QUEUE
from api.domain.serialize import artifact_key, job_json
from api.domain.settings import Settings
from api.domain.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    post_pinned,
    resolve_callback,
    sign,
)
from worker.context import WorkerContext, get_context

log = logging.getLogger(__name__)

EVENTS = {
    JobStatus.SUCCEEDED: "job.succeeded",
    JobStatus.REJECTED: "job.rejected",
    JobStatus.FAILED: "job.failed",
}
LINKED = ("heatmap", "overlay", "report")  # artifacts whose `<name>_url` is in a job's result
PENDING, SENDING, SUCCEEDED, FAILED, EXHAUSTED = (
    "pending",
    "sending",
    "succeeded",
    "failed",
    "exhausted",
)


def _artifact_links(job: Job, ctx: WorkerContext) -> Callable[[str], str | None]:
    """The link builder of a job's webhook JSON; S3 URLs are presigned when it is called."""

    def link(name: str) -> str | None:
        if name == "report":  # the same stable route as GET /api/v1/jobs/<id> gives
            # rendered on its first GET, so a job with an overlay has one
            has_report = job.report_key or job.overlay_key
            return f"/api/v1/jobs/{job.id}/report" if has_report else None
        key = artifact_key(job, name)
        if key is None:
            return None
        # S3: a presigned URL; local store: the authenticated API route (relative: a worker does
        # not know the public host name).
        presigned = ctx.storage.url_for(key, ctx.settings.presign_expires_s)
        return presigned or f"/api/v1/jobs/{job.id}/artifacts/{name}"

    return link


def job_payload(job: Job, ctx: WorkerContext) -> dict[str, Any]:
    """The job JSON of the HTTP contract, as sent in a webhook event (the API's serializer)."""
    return job_json(job, link=_artifact_links(job, ctx), status_url=f"/api/v1/jobs/{job.id}")


def with_fresh_links(payload: dict[str, Any], job: Job, ctx: WorkerContext) -> dict[str, Any]:
    """The stored event with its result's artifact URLs made again now: presigned URLs made when
    the event was scheduled expire (PRESIGN_EXPIRES_S) long before a late retry sends them."""
    result = (payload.get("job") or {}).get("result")
    if not result:  # batch events, rejected and failed jobs: no artifact links
        return payload
    link = _artifact_links(job, ctx)
    fresh = {f"{name}_url": link(name) for name in LINKED if f"{name}_url" in result}
    return {**payload, "job": {**payload["job"], "result": {**result, **fresh}}}


def schedule(session: Session, job: Job, ctx: WorkerContext) -> uuid.UUID | None:
    """Record the first attempt of this job's terminal event (once per event); returns its row id."""
    if not job.callback_url or job.status not in EVENTS:
        return None
    event = EVENTS[job.status]
    already = session.scalar(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.job_id == job.id, WebhookDelivery.event == event)
        .limit(1)
    )
    if already is not None:
        return None
    row = WebhookDelivery(
        job_id=job.id,
        event=event,
        delivery_id=uuid.uuid4(),
        attempt=1,
        status=PENDING,
        next_attempt_at=utcnow(),
        payload={"event": event, "job": job_payload(job, ctx)},
    )
    session.add(row)
    session.flush()
    return row.id


def enqueue(ctx: WorkerContext, row_id: uuid.UUID, countdown: float | None = None) -> None:
    """Hand an attempt to the webhooks queue; a lost enqueue is re-driven by the sweep."""
    try:
        ctx.queue.enqueue(DELIVER_WEBHOOK, str(row_id), queue=WEBHOOKS_QUEUE, countdown=countdown)
    except Exception:
        log.warning("webhook attempt %s not enqueued; the sweep will re-drive it", row_id)


def backoff_s(settings: Settings, attempt: int) -> float:
    """Delay before the attempt after `attempt`: base · 2^(attempt-1) (30 s … 32 min by default)."""
    return settings.webhook_backoff_base_s * 2 ** (attempt - 1)


def _error_name(exc: urllib3.exceptions.HTTPError) -> str:
    """The delivery log's name for a failed connection (the names requests used to give)."""
    errors = urllib3.exceptions
    if isinstance(exc, errors.SSLError):
        return "SSLError"
    if isinstance(exc, errors.NewConnectionError):  # a subclass of ConnectTimeoutError
        return "ConnectionError"
    if isinstance(exc, errors.ConnectTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, errors.ReadTimeoutError):
        return "ReadTimeout"
    return "ConnectionError"


def deliver(row_id: str | uuid.UUID, *, context: WorkerContext | None = None) -> str | None:
    """Make one attempt; record it; schedule the next attempt on failure. Returns the row status."""
    ctx = context or get_context()
    rid = uuid.UUID(str(row_id))
    with session_scope(ctx.sessions) as session:
        row = session.get(WebhookDelivery, rid, with_for_update=True, populate_existing=True)
        if row is None or row.status != PENDING:
            return row.status if row is not None else None  # already attempted: a duplicate message
        job = session.get(Job, row.job_id)
        assert job is not None  # foreign key
        org = session.get(Organization, job.org_id)
        assert org is not None
        url = batches.callback_url_for(session, row, job) or ""
        secret = secrets.unseal(ctx.settings, org.webhook_secret)
        # Links minted per attempt, and recorded as sent; the signature below covers this body.
        row.payload = payload = with_fresh_links(row.payload or {}, job, ctx)
        attempt, delivery_id, event = row.attempt, row.delivery_id, row.event
        row.status = SENDING
        row.next_attempt_at = utcnow()  # while sending: when the attempt started (for the sweep)

    body = json.dumps(payload, separators=(",", ":")).encode()
    status_code: int | None = None
    error: str | None = None
    refused = False
    start = time.perf_counter()
    try:
        # Resolved and checked once, then connected to that very address (DNS-rebinding safe).
        target = resolve_callback(url, ctx.settings.webhook_allow_private)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "liverscan-webhooks/1",
            EVENT_HEADER: event,
            DELIVERY_HEADER: str(delivery_id),
            SIGNATURE_HEADER: sign(secret, body, int(time.time())),
        }
        status_code = post_pinned(target, body, headers, ctx.settings.webhook_timeout_s)
    except CallbackUrlRefused as exc:
        refused, error = True, f"callback_url_refused: {exc.details.get('reason', exc.message)}"
    except urllib3.exceptions.HTTPError as exc:
        error = _error_name(exc)
    latency_ms = (time.perf_counter() - start) * 1000.0
    ok = status_code is not None and 200 <= status_code < 300

    next_id: uuid.UUID | None = None
    delay = 0.0
    with session_scope(ctx.sessions) as session:
        row = session.get(WebhookDelivery, rid, with_for_update=True, populate_existing=True)
        assert row is not None
        row.status_code, row.latency_ms, row.error = status_code, latency_ms, error
        if ok:
            row.status, row.delivered_at = SUCCEEDED, utcnow()
        elif refused or attempt >= ctx.settings.webhook_max_attempts:
            row.status = EXHAUSTED
        else:
            row.status = FAILED
            delay = backoff_s(ctx.settings, attempt)
            following = WebhookDelivery(
                job_id=row.job_id,
                event=event,
                delivery_id=delivery_id,
                attempt=attempt + 1,
                status=PENDING,
                next_attempt_at=utcnow() + timedelta(seconds=delay),
                payload=payload,
            )
            session.add(following)
            session.flush()
            next_id = following.id
        status = row.status
    log.info(
        "webhook %s attempt %d for job %s: %s (%s)",
        delivery_id,
        attempt,
        job.id,
        status,
        status_code or error,
    )
    if next_id is not None:
        enqueue(ctx, next_id, countdown=delay)
    return status
