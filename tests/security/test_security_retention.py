"""Data retention: an org admin deletes a job's bytes from the store (local folder and S3 over
HTTP), the row stays marked; the sweep applies the configured retention period."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from flask import Flask
from prometheus_client import REGISTRY
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from api.domain.models import AuditEvent, Job, JobStatus, Role, utcnow
from api.domain.queue import CeleryQueue
from api.domain.retention import JobDeletion, PendingDeletion
from api.domain.storage import (
    DICOM_OVERLAY_NAME,
    DICOM_SR_NAME,
    REPORT_PDF_NAME,
    LocalStorage,
    S3Storage,
    Storage,
    job_key,
)
from tests.api.conftest import bearer, login, png_bytes, read_only_folder, signup, submit
from tests.live_stack import TcpProxy, port_in
from tests.security.conftest import REDIS_URL, AppFactory, add_member

if TYPE_CHECKING:
    from worker.context import WorkerContext


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    """The local folder and an S3 bucket on the moto server."""
    if request.param == "local":
        yield LocalStorage(tmp_path / "store")
        return
    s3 = S3Storage(
        f"sec-{uuid.uuid4().hex[:12]}",
        endpoint_url=request.getfixturevalue("s3_endpoint"),
        access_key_id="testing",
        secret_access_key="testing",
    )
    s3.ensure_bucket()
    yield s3


@pytest.fixture
def s3_behind_proxy(s3_endpoint: str) -> Iterator[tuple[S3Storage, TcpProxy]]:
    """An S3 bucket on the moto server, reached through a proxy the test can take down (an
    outage of the store: connections refused and reset), and the proxy."""
    proxy = TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]), port_in(18300, 18349))
    proxy.up()
    s3 = S3Storage(
        f"sec-{uuid.uuid4().hex[:12]}",
        endpoint_url=f"http://127.0.0.1:{proxy.port}",
        access_key_id="testing",
        secret_access_key="testing",
    )
    s3.ensure_bucket()
    try:
        yield s3, proxy
    finally:
        proxy.down()


def _finish(session: Session, store: Storage, job_id: str, *, days_ago: float) -> Job:
    """Make a job succeeded `days_ago` days ago, with a heatmap in the store."""
    job = session.get(Job, uuid.UUID(job_id))
    assert job is not None
    heatmap = f"{job.org_id}/{job.id}/heatmap.png"
    store.put(heatmap, b"\x89PNG fake heatmap", "image/png")
    job.status = JobStatus.SUCCEEDED
    job.heatmap_key = heatmap
    job.finished_at = utcnow() - timedelta(days=days_ago)
    session.commit()
    return job


def test_admin_deletes_a_job_and_its_bytes_leave_the_store(
    make_security_app: AppFactory, store: Storage, session: Session
) -> None:
    client = make_security_app(storage=store).test_client()
    admin = signup(client, organization="Clinic A")
    admin_h = bearer(login(client, admin["email"])["access_token"])
    job_id = submit(client, admin_h).get_json()["id"]
    job = _finish(session, store, job_id, days_ago=0)
    keys = [job.input_key, job.heatmap_key]
    assert all(store.exists(k) for k in keys if k)

    clinician = add_member(client, admin_h, Role.CLINICIAN)
    clinician_h = bearer(login(client, clinician["email"])["access_token"])
    r = client.delete(f"/api/v1/jobs/{job_id}", headers=clinician_h)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    other = signup(client, organization="Clinic B")
    r = client.delete(
        f"/api/v1/jobs/{job_id}", headers=bearer(login(client, other["email"])["access_token"])
    )
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "job_not_found"
    assert all(store.exists(k) for k in keys if k)

    r = client.delete(f"/api/v1/jobs/{job_id}", headers=admin_h)
    assert r.status_code == 200
    assert r.get_json()["deleted"] is True and r.get_json()["reason"] == "admin"
    assert not any(store.exists(k) for k in keys if k)

    # The row stays, marked; reading it or its artifacts says the data is gone.
    r = client.get(f"/api/v1/jobs/{job_id}", headers=admin_h)
    assert r.status_code == 410 and r.get_json()["error"]["code"] == "job_deleted"
    r = client.get(f"/api/v1/jobs/{job_id}/artifacts/input", headers=admin_h)
    assert r.status_code == 410
    mark = session.get(JobDeletion, uuid.UUID(job_id))
    assert mark is not None and mark.reason == "admin"
    assert mark.objects_deleted == 2
    audit = session.scalars(select(AuditEvent).where(AuditEvent.job_id == uuid.UUID(job_id))).all()
    assert "job.delete" in {e.action for e in audit}
    # Deleting again is harmless.
    assert client.delete(f"/api/v1/jobs/{job_id}", headers=admin_h).status_code == 200


def test_deleting_a_dicom_job_also_removes_its_dicom_outputs(
    make_security_app: AppFactory, store: Storage, session: Session
) -> None:
    """The Secondary Capture and SR derived from a DICOM upload carry its pixels: they go too."""
    client = make_security_app(storage=store).test_client()
    admin = signup(client, organization="Clinic A")
    admin_h = bearer(login(client, admin["email"])["access_token"])
    job_id = submit(client, admin_h).get_json()["id"]
    job = _finish(session, store, job_id, days_ago=0)
    derived = [job_key(job.org_id, job.id, n) for n in (DICOM_OVERLAY_NAME, DICOM_SR_NAME)]
    for key in derived:
        store.put(key, b"DICM derived output", "application/dicom")

    assert client.delete(f"/api/v1/jobs/{job_id}", headers=admin_h).status_code == 200
    assert not any(store.exists(k) for k in derived)
    mark = session.get(JobDeletion, uuid.UUID(job_id))
    assert mark is not None and mark.objects_deleted == 4


def _sweep_context(
    app: Flask, store: Storage, sessions: sessionmaker[Session], engine: Engine
) -> WorkerContext:
    """The worker context of a sweep run against the app's settings, store and test transaction."""
    from worker.context import WorkerContext

    return WorkerContext(
        settings=app.extensions["liverscan"].settings,
        engine=engine,
        sessions=sessions,
        storage=store,
        queue=CeleryQueue(REDIS_URL),
    )


def test_sweep_purges_jobs_past_the_retention_period_only(
    make_security_app: AppFactory,
    store: Storage,
    session: Session,
    session_factory: sessionmaker[Session],
    security_engine: Engine,
) -> None:
    from worker import sweep

    app = make_security_app(storage=store, retention_days=30)
    client = app.test_client()
    admin = signup(client)
    headers = bearer(login(client, admin["email"])["access_token"])
    old = _finish(session, store, submit(client, headers).get_json()["id"], days_ago=31)
    recent_id = submit(client, headers, data=None, client_ref="recent").get_json()["id"]
    recent = _finish(session, store, recent_id, days_ago=29)
    old_keys = [old.input_key, old.heatmap_key]
    recent_keys = [recent.input_key, recent.heatmap_key]

    sweep.run(context=_sweep_context(app, store, session_factory, security_engine))

    assert not any(store.exists(k) for k in old_keys if k)
    assert all(store.exists(k) for k in recent_keys if k)
    mark = session.get(JobDeletion, old.id)
    assert mark is not None and mark.reason == "retention"
    assert session.get(JobDeletion, recent.id) is None
    r = client.get(f"/api/v1/jobs/{old.id}", headers=headers)
    assert r.status_code == 410
    assert client.get(f"/api/v1/jobs/{recent.id}", headers=headers).status_code == 200


def test_retention_never_takes_the_upload_of_a_job_that_has_not_finished(
    make_security_app: AppFactory,
    store: Storage,
    session: Session,
    session_factory: sessionmaker[Session],
    security_engine: Engine,
) -> None:
    """Jobs submitted 40 days ago and still queued or processing (stuck, or in a long backlog)
    are past any retention period by age, but they have a result to come: the sweep re-drives
    them and keeps their uploads."""
    from worker import sweep

    app = make_security_app(storage=store, retention_days=30)
    client = app.test_client()
    headers = bearer(login(client, signup(client)["email"])["access_token"])
    long_ago = utcnow() - timedelta(days=40)
    unfinished = []
    for status in (JobStatus.QUEUED, JobStatus.PROCESSING):
        job = session.get(Job, uuid.UUID(submit(client, headers).get_json()["id"]))
        assert job is not None
        job.status, job.created_at, job.updated_at = status, long_ago, long_ago
        job.started_at = long_ago if status is JobStatus.PROCESSING else None
        unfinished.append(job)
    session.commit()

    sweep.run(context=_sweep_context(app, store, session_factory, security_engine))

    for job in unfinished:
        assert store.exists(job.input_key)
        assert session.get(JobDeletion, job.id) is None
        r = client.get(f"/api/v1/jobs/{job.id}", headers=headers)
        assert r.status_code == 200 and r.get_json()["status"] == "queued"  # re-driven


def test_the_job_list_leaves_deleted_jobs_out(
    make_security_app: AppFactory, session: Session
) -> None:
    """The list must not show what GET /jobs/<id> answers 410 for: a deleted job's result."""
    app = make_security_app()
    client = app.test_client()
    headers = bearer(login(client, signup(client)["email"])["access_token"])
    store = app.extensions["liverscan"].storage
    kept, gone = (submit(client, headers, client_ref=ref).get_json()["id"] for ref in "ab")
    for job_id, probability in ((kept, 0.25), (gone, 0.875)):
        job = _finish(session, store, job_id, days_ago=0)
        job.label, job.probability, job.threshold = "normal", probability, 0.5
    session.commit()
    assert client.delete(f"/api/v1/jobs/{gone}", headers=headers).status_code == 200

    for query in ("", "?status=succeeded", "?limit=1"):
        r = client.get(f"/api/v1/jobs{query}", headers=headers)
        assert r.status_code == 200
        assert [item["id"] for item in r.get_json()["items"]] == [kept], query
        assert r.get_json()["next_cursor"] is None
        assert b"0.875" not in r.data
    assert client.get(f"/api/v1/jobs/{kept}", headers=headers).status_code == 200


def test_a_batch_leaves_its_deleted_jobs_out_of_its_job_list_and_csv(
    make_security_app: AppFactory, session: Session
) -> None:
    app = make_security_app()
    client = app.test_client()
    headers = bearer(login(client, signup(client)["email"])["access_token"])
    files = [(io.BytesIO(png_bytes(seed=i)), f"slice-{i}.png", "image/png") for i in range(2)]
    r = client.post(
        "/api/v1/batches",
        headers=headers,
        data={"file": files},
        content_type="multipart/form-data",
    )
    assert r.status_code == 202, r.get_json()
    kept, gone = r.get_json()["job_ids"]
    store = app.extensions["liverscan"].storage
    for job_id in (kept, gone):
        job = _finish(session, store, job_id, days_ago=0)
        job.label, job.probability, job.threshold = "normal", 0.875, 0.5
    session.commit()
    assert client.delete(f"/api/v1/jobs/{gone}", headers=headers).status_code == 200

    batch = client.get(r.get_json()["status_url"], headers=headers).get_json()
    assert [job["id"] for job in batch["jobs"]] == [kept]
    csv_text = client.get(r.get_json()["results_url"], headers=headers).get_data(as_text=True)
    assert kept in csv_text and gone not in csv_text and "slice-1.png" not in csv_text


def test_retention_is_off_by_default(tmp_path: Path) -> None:
    from api.domain.settings import Settings

    assert Settings(env="test", data_dir=tmp_path).retention_days == 0


def _pending_metric() -> float | None:
    """The owed deletions as the sweep of this (worker) process last counted them."""
    return REGISTRY.get_sample_value("liverscan_sweep_deletions_pending")


def test_a_job_deleted_while_the_store_is_down_loses_its_bytes_when_the_store_is_back(
    make_security_app: AppFactory,
    s3_behind_proxy: tuple[S3Storage, TcpProxy],
    session: Session,
    session_factory: sessionmaker[Session],
    security_engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The admin's DELETE during a store outage is answered (the job reads as deleted at once);
    the objects it could not delete are owed, counted by the sweep, and deleted by the first
    sweep after the store is back."""
    from worker import sweep

    store, proxy = s3_behind_proxy
    app = make_security_app(storage=store)
    client = app.test_client()
    headers = bearer(login(client, signup(client)["email"])["access_token"])
    job_id = submit(client, headers).get_json()["id"]
    job = _finish(session, store, job_id, days_ago=0)
    unrecorded_pdf = job_key(job.org_id, job.id, REPORT_PDF_NAME)  # a render cut short
    store.put(unrecorded_pdf, b"%PDF report", "application/pdf")
    keys = [job.input_key, job.heatmap_key, unrecorded_pdf]
    ctx = _sweep_context(app, store, session_factory, security_engine)

    with proxy.outage():
        r = client.delete(f"/api/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.get_json()
        assert r.get_json()["deleted"] is True
        assert client.get(f"/api/v1/jobs/{job_id}", headers=headers).status_code == 410
        with caplog.at_level("WARNING", logger="worker.sweep"):
            sweep.run(context=ctx)  # still down: nothing is dropped
        assert "store objects still to delete" in caplog.text
        owed = _pending_metric()
        assert owed is not None and owed >= 3
    assert all(store.exists(k) for k in keys if k)  # the outage kept them

    assert sweep.run(context=ctx)["deletions_pending"] == 0
    assert not any(store.exists(k) for k in keys if k)
    assert _pending_metric() == 0
    mark = session.get(JobDeletion, uuid.UUID(job_id))
    assert mark is not None and mark.reason == "admin"


def test_a_job_deleted_while_its_local_folder_is_read_only_is_deleted_once_it_is_writable(
    make_security_app: AppFactory,
    session: Session,
    session_factory: sessionmaker[Session],
    security_engine: Engine,
) -> None:
    """The local folder store fails like S3 does: the admin's DELETE while the job's folder refuses
    writes is answered (not a 500), the keys it could not delete are owed, and the first sweep
    after the folder is writable again deletes them."""
    from worker import sweep

    app = make_security_app()
    store = app.extensions["liverscan"].storage
    assert isinstance(store, LocalStorage)
    client = app.test_client()
    headers = bearer(login(client, signup(client)["email"])["access_token"])
    job_id = submit(client, headers).get_json()["id"]
    job = _finish(session, store, job_id, days_ago=0)
    keys = [k for k in (job.input_key, job.heatmap_key) if k]

    with read_only_folder(store.root / str(job.org_id) / job_id):
        r = client.delete(f"/api/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.get_json()
        assert r.get_json()["deleted"] is True
        assert client.get(f"/api/v1/jobs/{job_id}", headers=headers).status_code == 410
        owed = session.scalars(select(PendingDeletion.key).where(PendingDeletion.key.in_(keys)))
        assert sorted(owed) == sorted(keys)
        assert all(store.exists(k) for k in keys)

    ctx = _sweep_context(app, store, session_factory, security_engine)
    assert sweep.run(context=ctx)["deletions_pending"] == 0
    assert not any(store.exists(k) for k in keys)


def test_retention_during_a_store_outage_deletes_the_bytes_once_the_store_is_back(
    make_security_app: AppFactory,
    s3_behind_proxy: tuple[S3Storage, TcpProxy],
    session: Session,
    session_factory: sessionmaker[Session],
    security_engine: Engine,
) -> None:
    """A job past the retention period is no longer served even while the store is down, and its
    bytes leave the store with the first sweep after the outage."""
    from worker import sweep

    store, proxy = s3_behind_proxy
    app = make_security_app(storage=store, retention_days=30)
    client = app.test_client()
    headers = bearer(login(client, signup(client)["email"])["access_token"])
    old = _finish(session, store, submit(client, headers).get_json()["id"], days_ago=31)
    keys = [old.input_key, old.heatmap_key]
    ctx = _sweep_context(app, store, session_factory, security_engine)

    with proxy.outage():
        sweep.run(context=ctx)
        assert client.get(f"/api/v1/jobs/{old.id}", headers=headers).status_code == 410
    assert all(store.exists(k) for k in keys if k)

    sweep.run(context=ctx)
    assert not any(store.exists(k) for k in keys if k)
    mark = session.get(JobDeletion, old.id)
    assert mark is not None and mark.reason == "retention"
