"""Helpers of the worker tests (plain functions; the fixtures live in conftest.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

import redis

from api.domain import jobs, secrets
from api.domain.models import Job, Organization
from api.domain.storage import StoredObject, job_key
from worker.context import WorkerContext


def queued_tasks(client: redis.Redis, queue: str) -> list[tuple[str, list[str]]]:
    """(task name, args) of the Celery messages waiting in a Redis queue, oldest first."""
    out = []
    for raw in reversed(client.lrange(queue, 0, -1)):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], body[0]))
    return out


def make_org(ctx: WorkerContext) -> uuid.UUID:
    """A new organization with a webhook secret of its own; its id."""
    with ctx.sessions.begin() as session:
        org = Organization(
            name=f"clinic-{uuid.uuid4().hex[:6]}",
            webhook_secret=secrets.seal(ctx.settings, "whsec_test_" + uuid.uuid4().hex),
        )
        session.add(org)
        session.flush()
        return org.id


def make_job(
    ctx: WorkerContext,
    data: bytes | None,
    *,
    org_id: uuid.UUID | None = None,
    callback_url: str | None = None,
) -> uuid.UUID:
    """A queued job (no message enqueued) of `org_id` (default: a new organization) whose upload is `data` (None: bytes never stored)."""
    org = org_id if org_id is not None else make_org(ctx)
    job_id = uuid.uuid4()
    key = job_key(org, job_id, "input")
    if data is not None:
        upload = ctx.storage.put(key, data, "image/png")
    else:
        upload = StoredObject(
            key=key, size=0, sha256=hashlib.sha256(b"").hexdigest(), content_type="image/png"
        )
    with ctx.sessions.begin() as session:
        jobs.create_job(
            session,
            org_id=org,
            upload=upload,
            job_id=job_id,
            filename="slice.png",
            callback_url=callback_url,
        )
    return job_id


def load_job(ctx: WorkerContext, job_id: uuid.UUID) -> Job:
    """The job row as it is now in the database."""
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job
