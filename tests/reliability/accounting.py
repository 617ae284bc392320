"""The reliability stack's handle and the books a fault scenario is judged by: every job submitted
reaches exactly one terminal state, its result is the one its webhook carried, its event reached
the receiver (deduplicated by delivery id) with a valid signature, and nothing is left behind."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from api.domain.models import TERMINAL_STATUSES, Job, WebhookDelivery
from api.domain.storage import S3Storage
from tests.e2e.e2e_support import Client
from tests.live_stack import Delivery, Receiver, RedisServer, TcpProxy, WorkerProcess

RESULTS_ENV = "RELIABILITY_RESULTS"  # set by `make reliability`
EVENTS = {"succeeded": "job.succeeded", "rejected": "job.rejected", "failed": "job.failed"}


@dataclass
class Stack:
    """Everything a fault test touches: processes, proxies, the receiver, direct DB and store."""

    base_url: str
    api: subprocess.Popen[bytes]
    worker: WorkerProcess
    pg: TcpProxy
    s3: TcpProxy
    hooks: TcpProxy
    redis: RedisServer
    receiver: Receiver
    db: Engine
    store: S3Storage
    logs: Path

    def heal(self, timeout_s: float = 240) -> None:
        """Bring every dependency back and wait until /readyz says database, broker and store."""
        for proxy in (self.pg, self.s3, self.hooks):
            proxy.up()
        if self.redis.process is None or self.redis.process.poll() is not None:
            self.redis.start()
        if not self.worker.running:
            self.worker.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if requests.get(self.base_url + "/readyz", timeout=10).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise AssertionError(f"the stack did not become ready; see {self.logs}")

    def jobs(self, ids: list[str]) -> dict[str, Job]:
        """The job rows now, read directly from PostgreSQL."""
        with Session(self.db) as session:
            rows = session.scalars(select(Job).where(Job.id.in_([uuid.UUID(i) for i in ids])))
            return {str(job.id): job for job in rows}

    def org_jobs(self, org_id: str) -> list[Job]:
        """Every job row of one organization."""
        with Session(self.db) as session:
            return list(session.scalars(select(Job).where(Job.org_id == uuid.UUID(org_id))))

    def deliveries(self, ids: list[str]) -> dict[str, list[WebhookDelivery]]:
        """The delivery log (every attempt) of the jobs' own events per job id, oldest first
        (a batch's `batch.completed` rows hang off the job that completed the batch)."""
        out: dict[str, list[WebhookDelivery]] = defaultdict(list)
        with Session(self.db) as session:
            rows = session.scalars(
                select(WebhookDelivery)
                .where(
                    WebhookDelivery.job_id.in_([uuid.UUID(i) for i in ids]),
                    WebhookDelivery.event.in_(list(EVENTS.values())),
                )
                .order_by(WebhookDelivery.attempt, WebhookDelivery.created_at)
            )
            for row in rows:
                out[str(row.job_id)].append(row)
        return out

    def store_keys(self, org_id: str) -> set[str]:
        """Every object key the store holds under an organization's prefix."""
        keys: set[str] = set()
        paginator = self.store.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.store.bucket, Prefix=f"{org_id}/"):
            keys.update(item["Key"] for item in page.get("Contents", []))
        return keys

    def wait_settled(self, ids: list[str], timeout_s: float) -> None:
        """Until every job is terminal and has a delivered webhook event, or `timeout_s` passed
        (the books then say what is missing)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            rows = self.jobs(ids)
            done = all(j.status in TERMINAL_STATUSES for j in rows.values()) and len(rows) == len(
                ids
            )
            if done:
                delivered = Receiver.unique(self.receiver.for_jobs(set(ids)))
                if {d.payload["job"]["id"] for d in delivered.values()} >= set(ids):
                    return
            time.sleep(0.5)


@dataclass
class ResultsFile:
    """Where each scenario appends its books as one JSON line (None: nowhere)."""

    path: Path | None

    def write(self, row: dict[str, Any]) -> None:
        """Append `row` as one JSON line."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def submit_raw(
    stack: Stack, client: Client, data: bytes, callback_url: str | None = None
) -> requests.Response:
    """POST one upload; the response as it is (202, or an error envelope)."""
    form = {"callback_url": callback_url} if callback_url else {}
    return requests.post(
        f"{stack.base_url}/api/v1/jobs",
        headers=client.headers,
        files={"file": ("slice.png", data, "image/png")},
        data=form,
        timeout=60,
    )


def submit_many(stack: Stack, client: Client, data: bytes, n: int) -> list[str]:
    """Submit `n` uploads with the stack's receiver as callback; each must be accepted (202)."""
    ids = []
    for _ in range(n):
        response = submit_raw(stack, client, data, callback_url=stack.receiver.url)
        assert response.status_code == 202, response.text
        ids.append(str(response.json()["id"]))
    return ids


def submit_batch(stack: Stack, client: Client, data: bytes, n: int) -> dict[str, Any]:
    """One batch of `n` copies of `data`, with per-job events and `batch.completed` sent to the
    stack's receiver; the 202 body (id, job_ids, status_url)."""
    files = [("file", (f"slice-{i}.png", data, "image/png")) for i in range(n)]
    response = requests.post(
        f"{stack.base_url}/api/v1/batches",
        headers=client.headers,
        files=files,
        data={"callback_url": stack.receiver.url, "job_events": "true"},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    return dict(response.json())


def batch_events(receiver: Receiver, batch_id: str) -> dict[str, Delivery]:
    """The `batch.completed` deliveries of one batch, deduplicated by delivery id."""
    posts = [
        d
        for d in list(receiver.received)
        if d.payload.get("event") == "batch.completed" and d.payload["batch"]["id"] == batch_id
    ]
    return Receiver.unique(posts)


@dataclass
class Books:
    """What a scenario did to its jobs, as `make reliability` tabulates it."""

    fault: str
    submitted: int
    terminal: int = 0
    lost: int = 0
    duplicated: int = 0
    webhooks_delivered: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    retried_deliveries: int = 0
    redelivered_posts: int = 0
    problems: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The JSON line for the results file."""
        return {
            "fault": self.fault,
            "jobs_submitted": self.submitted,
            "jobs_terminal": self.terminal,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "webhooks_delivered": self.webhooks_delivered,
            "statuses": self.statuses,
            "retried_deliveries": self.retried_deliveries,
            "redelivered_posts": self.redelivered_posts,
            **self.extra,
        }


def audit(stack: Stack, fault: str, ids: list[str], secret: str) -> Books:
    """Check every job of a scenario against the database, the delivery log and the receiver."""
    books = Books(fault=fault, submitted=len(ids))
    rows = stack.jobs(ids)
    log = stack.deliveries(ids)
    posts = stack.receiver.for_jobs(set(ids))
    by_job: dict[str, list[Any]] = defaultdict(list)
    for post in posts:
        by_job[post.payload["job"]["id"]].append(post)
    books.redelivered_posts = len(posts) - len(Receiver.unique(posts))
    statuses: dict[str, int] = defaultdict(int)
    for job_id in ids:
        job = rows.get(job_id)
        if job is None or job.status not in TERMINAL_STATUSES:
            books.lost += 1
            books.problems.append(f"{job_id}: {job.status.value if job else 'no row'}")
            continue
        books.terminal += 1
        statuses[job.status.value] += 1
        attempts = log.get(job_id, [])
        delivery_ids = {row.delivery_id for row in attempts}
        events = {row.event for row in attempts}
        unique = Receiver.unique(by_job.get(job_id, []))
        if len(delivery_ids) > 1 or len(unique) > 1 or len(events) > 1:
            books.duplicated += 1
            books.problems.append(f"{job_id}: {len(unique)} events {sorted(events)}")
        if len(attempts) > 1:
            books.retried_deliveries += 1
        if not unique:
            books.problems.append(f"{job_id}: no webhook received ({len(attempts)} attempts)")
            continue
        post = next(iter(unique.values()))
        if not Receiver.signed(post, secret):
            books.problems.append(f"{job_id}: bad signature")
            continue
        sent = post.payload
        if sent["event"] != EVENTS[job.status.value] or sent["job"]["status"] != job.status.value:
            books.problems.append(f"{job_id}: event {sent['event']} for a {job.status.value} job")
            continue
        # The result was written once: the event carries exactly what the row holds now.
        result = sent["job"]["result"] or {}
        if sent["job"]["finished_at"] != _iso(job.finished_at) or (
            job.label is not None
            and (result.get("label"), result.get("probability")) != (job.label, job.probability)
        ):
            books.problems.append(f"{job_id}: the event's result differs from the row's")
            continue
        books.webhooks_delivered += 1
    books.statuses = dict(statuses)
    return books


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None
