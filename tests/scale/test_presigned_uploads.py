"""Direct-to-store uploads: a presigned PUT to S3 (moto's server over HTTP) or the API's PUT route
(local folder), then a job created from the stored object — and every way that can go wrong."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from flask.testing import FlaskClient
from sqlalchemy import update

from api.app import create_app
from api.domain import uploads
from api.domain.models import Job, PendingUpload, UploadStatus, utcnow
from api.domain.queue import INFERENCE_QUEUE
from api.domain.settings import Settings
from api.domain.storage import S3Storage, Storage, make_storage
from api.resources import EXTENSION_KEY
from tests.api.conftest import bearer, login, signup
from worker import sweep
from worker.context import WorkerContext

PNG = b"\x89PNG\r\n\x1a\n" + b"slice-bytes" * 100


@dataclass
class Api:
    """The app's test client, its settings and store, and a worker context on the same backends."""

    client: FlaskClient
    settings: Settings
    storage: Storage
    ctx: WorkerContext

    def account(self, organization: str = "Clinic") -> dict[str, str]:
        """A new organization's user; bearer headers."""
        user = signup(self.client, organization=organization)
        return bearer(login(self.client, user["email"])["access_token"])

    def open_upload(self, headers: dict[str, str]) -> dict[str, Any]:
        """POST /api/v1/uploads; the slot."""
        r = self.client.post(
            "/api/v1/uploads",
            headers=headers,
            json={"filename": "slice.png", "content_type": "image/png"},
        )
        assert r.status_code == 201, r.get_json()
        return dict(r.get_json())

    def put(self, slot: dict[str, Any], data: bytes, headers: dict[str, str]) -> int:
        """PUT the bytes where the slot says: the presigned URL, or the API route."""
        if slot["direct"]:
            return requests.put(
                slot["url"], data=data, headers=slot["headers"], timeout=30
            ).status_code
        path = slot["url"].removeprefix("http://localhost")
        r = self.client.put(path, data=data, headers={**headers, **slot["headers"]})
        return r.status_code

    def create_job(self, headers: dict[str, str], upload_id: str) -> Any:
        """POST /api/v1/jobs with upload_id (JSON)."""
        return self.client.post("/api/v1/jobs", headers=headers, json={"upload_id": upload_id})

    def download_input(self, headers: dict[str, str], job_id: str) -> bytes:
        """The job's input as a user downloads it: the API's bytes, or its redirect's (S3)."""
        r = self.client.get(f"/api/v1/jobs/{job_id}/artifacts/input", headers=headers)
        if r.status_code == 302:
            fetched = requests.get(r.headers["Location"], timeout=30)
            assert fetched.status_code == 200
            return fetched.content
        assert r.status_code == 200, r.get_json()
        return bytes(r.data)

    def upload_key(self, upload_id: str) -> str:
        """The store key a slot's bytes are PUT to."""
        with self.ctx.sessions() as session:
            row = session.get(PendingUpload, uuid.UUID(upload_id))
            assert row is not None
            return row.key


@pytest.fixture(params=["s3", "local"])
def api(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path, broker: redis.Redis
) -> Iterator[Api]:
    """The API on PostgreSQL and Redis, storing on S3 over HTTP (moto) or in a local folder."""
    values: dict[str, Any] = {
        "env": "test",
        "data_dir": tmp_path,
        "database_url": database_url,
        "broker_url": "redis://127.0.0.1:6379/5",
        "jwt_secret_key": "scale-secret-" + "u" * 40,
        "password_hash_time_cost": 1,
        "password_hash_memory_kib": 8192,
        "max_upload_mb": 1,
    }
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        values |= {
            "storage_backend": "s3",
            "s3_bucket": f"uploads-{uuid.uuid4().hex[:8]}",
            "s3_endpoint_url": endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
    else:
        values["storage_dir"] = tmp_path / "store"
    settings = Settings(**values)
    storage = make_storage(settings)
    if isinstance(storage, S3Storage):
        storage.ensure_bucket()
    ctx = WorkerContext.from_settings(settings)
    yield Api(create_app(settings).test_client(), settings, storage, ctx)
    ctx.engine.dispose()


def test_a_job_is_created_from_the_uploaded_object(api: Api) -> None:
    """Open, PUT, create: 202, the job's input is the stored object with its sha256; on S3 the URL
    is the store's own (bytes never pass through the API)."""
    headers = api.account()
    slot = api.open_upload(headers)
    assert slot["direct"] is (api.settings.storage_backend == "s3")
    if slot["direct"]:
        assert slot["url"].startswith(str(api.settings.s3_endpoint_url))
    assert api.put(slot, PNG, headers) in (200, 204)

    r = api.create_job(headers, slot["id"])
    assert r.status_code == 202, r.get_json()
    job = api.client.get(
        r.get_json()["status_url"].removeprefix("http://localhost"), headers=headers
    )
    assert job.get_json()["status"] == "queued"
    assert job.get_json()["input"]["sha256"] == hashlib.sha256(PNG).hexdigest()
    with api.ctx.sessions() as session:
        row = session.get(Job, uuid.UUID(r.get_json()["id"]))
        assert row is not None and api.storage.get(row.input_key) == PNG

    again = api.create_job(headers, slot["id"])
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "upload_already_used"


def test_unknown_upload_id_is_not_found(api: Api) -> None:
    """A made-up id (or not a UUID at all): 404 upload_not_found."""
    headers = api.account()
    for raw in (str(uuid.uuid4()), "not-a-uuid"):
        r = api.create_job(headers, raw)
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "upload_not_found"


def test_another_organizations_upload_is_not_found(api: Api) -> None:
    """Clinic B cannot create a job from clinic A's upload (nor PUT to it): upload_not_found."""
    owner, other = api.account("Clinic A"), api.account("Clinic B")
    slot = api.open_upload(owner)
    assert api.put(slot, PNG, owner) in (200, 204)
    r = api.create_job(other, slot["id"])
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "upload_not_found"
    put = api.client.put(f"/api/v1/uploads/{slot['id']}", data=PNG, headers=other)
    assert put.status_code == 404 and put.get_json()["error"]["code"] == "upload_not_found"


def test_an_upload_not_completed_makes_no_job(api: Api) -> None:
    """No bytes PUT yet: 409 upload_incomplete, and no job row."""
    headers = api.account()
    slot = api.open_upload(headers)
    r = api.create_job(headers, slot["id"])
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "upload_incomplete"
    with api.ctx.sessions() as session:
        row = session.get(PendingUpload, uuid.UUID(slot["id"]))
        assert row is not None and row.status is UploadStatus.PENDING and row.job_id is None


def test_an_upload_over_the_size_limit_makes_no_job_and_is_deleted(api: Api) -> None:
    """2 MiB against a 1 MiB limit: 413 payload_too_large at job creation (S3 accepted the PUT) or
    already at the API's PUT (local); the bytes are not kept."""
    headers = api.account()
    slot = api.open_upload(headers)
    big = PNG + b"\0" * (2 * 1024 * 1024)
    status = api.put(slot, big, headers)
    if slot["direct"]:
        assert status == 200
    else:
        assert status == 413
    r = api.create_job(headers, slot["id"])
    if slot["direct"]:
        assert r.status_code == 413 and r.get_json()["error"]["code"] == "payload_too_large"
    else:
        assert r.status_code == 409 and r.get_json()["error"]["code"] == "upload_incomplete"
    with api.ctx.sessions() as session:
        row = session.get(PendingUpload, uuid.UUID(slot["id"]))
        assert row is not None
        assert api.storage.size(row.key) is None


def test_an_upload_never_used_is_swept_and_then_expired(api: Api) -> None:
    """Bytes PUT but no job made before the deadline: the sweep expires the slot and deletes the
    bytes; creating the job afterwards is 410 upload_expired."""
    headers = api.account()
    slot = api.open_upload(headers)
    assert api.put(slot, PNG, headers) in (200, 204)
    upload_id = uuid.UUID(slot["id"])
    with api.ctx.sessions.begin() as session:
        session.execute(
            update(PendingUpload)
            .where(PendingUpload.id == upload_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        key = session.get(PendingUpload, upload_id).key  # type: ignore[union-attr]
    assert sweep.run(context=api.ctx)["uploads"] >= 1
    assert api.storage.size(key) is None
    r = api.create_job(headers, slot["id"])
    assert r.status_code == 410 and r.get_json()["error"]["code"] == "upload_expired"


def test_a_job_request_without_file_or_upload_id_is_missing_file(api: Api) -> None:
    """A JSON body that is not an object, or names no upload: 422 missing_file (never a 500)."""
    headers = api.account()
    for body in ([1, 2], {"client_ref": 7}):
        r = api.client.post("/api/v1/jobs", headers=headers, json=body)
        assert r.status_code == 422 and r.get_json()["error"]["code"] == "missing_file"
    r = api.client.post("/api/v1/uploads", headers=headers, json=["not", "an", "object"])
    assert r.status_code == 201  # filename and content type are optional


def test_a_content_type_that_is_not_a_mime_type_is_invalid_input(api: Api) -> None:
    """422 invalid_input naming the field; control characters in a filename are dropped."""
    headers = api.account()
    r = api.client.post("/api/v1/uploads", headers=headers, json={"content_type": "png\x00"})
    assert r.status_code == 422 and r.get_json()["error"]["details"]["field"] == "content_type"
    r = api.client.post("/api/v1/uploads", headers=headers, json={"filename": "a\x00b.png"})
    assert r.status_code == 201
    with api.ctx.sessions() as session:
        row = session.get(PendingUpload, uuid.UUID(r.get_json()["id"]))
        assert row is not None and row.filename == "ab.png"


def test_a_client_ref_with_nul_is_invalid_input(api: Api) -> None:
    """The JSON job route passes client_ref through: NUL is 422 invalid_input, not a 500."""
    headers = api.account()
    slot = api.open_upload(headers)
    assert api.put(slot, PNG, headers) in (200, 204)
    r = api.client.post(
        "/api/v1/jobs", headers=headers, json={"upload_id": slot["id"], "client_ref": "a\x00"}
    )
    assert r.status_code == 422 and r.get_json()["error"]["details"]["field"] == "client_ref"
    assert api.create_job(headers, slot["id"]).status_code == 202  # the upload is still usable


def test_a_retry_with_the_same_idempotency_key_replays_the_job(api: Api) -> None:
    """The same upload_id and Idempotency-Key again: 200 and the first call's job (as multipart
    replays do), nothing enqueued twice; another key or none: still 409 upload_already_used."""
    headers = api.account()
    slot = api.open_upload(headers)
    assert api.put(slot, PNG, headers) in (200, 204)
    keyed = {**headers, "Idempotency-Key": "presigned-0001"}
    body = {"upload_id": slot["id"]}

    first = api.client.post("/api/v1/jobs", headers=keyed, json=body)
    assert first.status_code == 202, first.get_json()
    again = api.client.post("/api/v1/jobs", headers=keyed, json=body)
    assert again.status_code == 200, again.get_json()
    assert again.get_json() == first.get_json()
    assert api.ctx.queue.depth(INFERENCE_QUEUE) == 1

    other = {**headers, "Idempotency-Key": "presigned-0002"}
    for retry_headers in (other, headers):
        r = api.client.post("/api/v1/jobs", headers=retry_headers, json=body)
        assert r.status_code == 409 and r.get_json()["error"]["code"] == "upload_already_used"
    listed = api.client.get("/api/v1/jobs", headers=headers).get_json()["items"]
    assert [job["id"] for job in listed] == [first.get_json()["id"]]


def test_concurrent_retries_with_one_idempotency_key_make_one_job(api: Api) -> None:
    """Four requests at once, one upload_id and one Idempotency-Key (a client retrying on a
    timeout while the first is still running): one job (202), the others replay it (200)."""
    headers = {**api.account(), "Idempotency-Key": "presigned-race"}
    slot = api.open_upload(headers)
    assert api.put(slot, PNG, headers) in (200, 204)
    barrier = threading.Barrier(4)
    answers: list[tuple[int, Any]] = []

    def one() -> None:
        client = api.client.application.test_client()
        barrier.wait(timeout=10)
        r = client.post("/api/v1/jobs", headers=headers, json={"upload_id": slot["id"]})
        answers.append((r.status_code, r.get_json()))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(status for status, _ in answers) == [200, 200, 200, 202], answers
    assert len({body["id"] for _, body in answers}) == 1
    assert api.ctx.queue.depth(INFERENCE_QUEUE) == 1


def test_bytes_put_after_the_job_was_created_do_not_change_its_input(api: Api) -> None:
    """The presigned URL outlives the job's creation: a second PUT to it (S3 accepts it; the local
    route refuses it) leaves the job's input, as a user downloads it, the bytes that were hashed.
    The slot's own key holds nothing afterwards, and the sweep deletes late bytes once it expires."""
    headers = api.account()
    slot = api.open_upload(headers)
    assert api.put(slot, PNG, headers) in (200, 204)
    r = api.create_job(headers, slot["id"])
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["id"]
    key = api.upload_key(slot["id"])
    assert api.storage.size(key) is None  # the job holds its own copy

    other = b"\x89PNG\r\n\x1a\n" + b"other-bytes" * 100
    status = api.put(slot, other, headers)
    assert status == (200 if slot["direct"] else 409)
    assert api.download_input(headers, job_id) == PNG
    job = api.client.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()
    assert job["input"]["sha256"] == hashlib.sha256(PNG).hexdigest()

    with api.ctx.sessions.begin() as session:
        session.execute(
            update(PendingUpload)
            .where(PendingUpload.id == uuid.UUID(slot["id"]))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    sweep.run(context=api.ctx)
    assert api.storage.size(key) is None
    assert api.download_input(headers, job_id) == PNG
    again = api.create_job(headers, slot["id"])
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "upload_already_used"


def _expired_ago(api: Api, upload_id: str, ago: timedelta) -> None:
    """Move a slot's deadline `ago` into the past (as the clock would)."""
    with api.ctx.sessions.begin() as session:
        session.execute(
            update(PendingUpload)
            .where(PendingUpload.id == uuid.UUID(upload_id))
            .values(expires_at=utcnow() - ago)
        )


@pytest.mark.parametrize("used", [False, True])
def test_bytes_that_land_after_the_sweep_closed_the_slot_are_deleted_after_the_grace(
    api: Api, used: bool
) -> None:
    """A presigned PUT that started before its URL ran out can finish after the sweep closed or
    expired the slot (or S3's clock runs behind the API's): the sweep deletes the slot's key once
    more when the grace has passed, and the slot still answers as it did."""
    headers = api.account()
    slot = api.open_upload(headers)
    assert api.put(slot, PNG, headers) in (200, 204)
    if used:
        assert api.create_job(headers, slot["id"]).status_code == 202
    key = api.upload_key(slot["id"])
    _expired_ago(api, slot["id"], timedelta(seconds=1))
    sweep.run(context=api.ctx)
    assert api.storage.size(key) is None

    api.storage.put(key, PNG, "image/png")  # the late PUT completes
    sweep.run(context=api.ctx)
    assert api.storage.size(key) == len(PNG)  # within the grace: a PUT may still be running

    _expired_ago(api, slot["id"], uploads.LATE_UPLOAD_GRACE + timedelta(seconds=1))
    sweep.run(context=api.ctx)
    assert api.storage.size(key) is None
    r = api.create_job(headers, slot["id"])
    expected = (409, "upload_already_used") if used else (410, "upload_expired")
    assert (r.status_code, r.get_json()["error"]["code"]) == expected


def test_the_sweep_keeps_an_upload_key_that_a_job_reads(api: Api) -> None:
    """Jobs created before inputs were copied read the upload's own key: expiring their slot must
    not delete their input."""
    headers = api.account()
    slot = api.open_upload(headers)
    assert api.put(slot, PNG, headers) in (200, 204)
    r = api.create_job(headers, slot["id"])
    assert r.status_code == 202, r.get_json()
    key = api.upload_key(slot["id"])
    api.storage.put(key, PNG, "image/png")
    with api.ctx.sessions.begin() as session:
        session.execute(
            update(Job).where(Job.id == uuid.UUID(r.get_json()["id"])).values(input_key=key)
        )
        session.execute(
            update(PendingUpload)
            .where(PendingUpload.id == uuid.UUID(slot["id"]))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    sweep.run(context=api.ctx)
    assert api.download_input(headers, r.get_json()["id"]) == PNG


@dataclass
class GrowingStore:
    """The real store, where the client PUTs a bigger file right after the size check answers."""

    inner: Storage
    bigger: bytes

    def size(self, key: str) -> int | None:
        """The size as stored now; then the object grows."""
        size = self.inner.size(key)
        self.inner.put(key, self.bigger, "image/png")
        return size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_an_upload_that_grows_after_the_size_check_is_too_large(api: Api) -> None:
    """The object grows past the limit between the size check and the read: 413
    payload_too_large all the same, no job, and the bytes are not kept."""
    headers = api.account()
    slot = api.open_upload(headers)
    assert api.put(slot, PNG, headers) in (200, 204)
    app = api.client.application
    real = app.extensions[EXTENSION_KEY].storage
    app.extensions[EXTENSION_KEY].storage = GrowingStore(real, PNG + b"\0" * (2 * 1024 * 1024))
    try:
        r = api.create_job(headers, slot["id"])
    finally:
        app.extensions[EXTENSION_KEY].storage = real
    assert r.status_code == 413 and r.get_json()["error"]["code"] == "payload_too_large"
    assert api.client.get("/api/v1/jobs", headers=headers).get_json()["items"] == []
    assert api.storage.size(api.upload_key(slot["id"])) is None
