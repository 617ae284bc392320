"""Submitting, polling and listing jobs: what a clinic's system sees."""

from __future__ import annotations

import hashlib
import json
import uuid

import redis
import requests
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.domain import jobs
from api.domain.models import AuditEvent, Job, JobStatus, PendingUpload
from api.domain.settings import Settings
from api.domain.storage import S3Storage, Storage
from tests.api.conftest import bearer, login, make_app, png_bytes, signup, submit


def _job_row(session: Session, job_id: str) -> Job:
    job = session.get(Job, uuid.UUID(job_id), populate_existing=True)
    assert job is not None
    return job


def test_submit_stores_bytes_commits_row_and_enqueues_id(
    client: FlaskClient,
    user_headers: dict[str, str],
    session: Session,
    storage: Storage,
    broker: redis.Redis,
) -> None:
    data = png_bytes(seed=3)
    r = submit(client, user_headers, data, client_ref="PACS-17")
    assert r.status_code == 202
    body = r.get_json()
    assert body["status"] == "queued"
    assert body["status_url"].endswith(f"/api/v1/jobs/{body['id']}")
    assert r.headers["Location"] == body["status_url"]

    job = _job_row(session, body["id"])
    assert job.status is JobStatus.QUEUED
    assert job.input_sha256 == hashlib.sha256(data).hexdigest()
    assert storage.get(job.input_key) == data
    assert job.input_key == f"{job.org_id}/{job.id}/input"

    messages = broker.lrange("inference", 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == "liverscan.process_job"
    assert message["headers"]["argsrepr"] == repr((body["id"],))


def test_poll_returns_the_contract_job_json(
    client: FlaskClient, user_headers: dict[str, str]
) -> None:
    data = png_bytes(seed=4)
    job_id = submit(client, user_headers, data, filename="liver.png", client_ref="r-1").get_json()[
        "id"
    ]
    r = client.get(f"/api/v1/jobs/{job_id}", headers=user_headers)
    assert r.status_code == 200
    job = r.get_json()
    assert {
        "id",
        "status",
        "created_at",
        "started_at",
        "finished_at",
        "client_ref",
        "input",
        "validation",
        "result",
        "error",
    } <= set(job)
    assert job["status"] == "queued"
    assert job["client_ref"] == "r-1"
    assert job["input"]["filename"] == "liver.png"
    assert job["input"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert job["result"] is None and job["error"] is None
    assert job["created_at"].endswith("Z")


def test_succeeded_job_shows_result_and_fetchable_overlay(
    client: FlaskClient, user_headers: dict[str, str], session: Session, storage: Storage
) -> None:
    job_id = submit(client, user_headers).get_json()["id"]
    job = _job_row(session, job_id)
    overlay = png_bytes(size=32, seed=9)
    storage.put(f"{job.org_id}/{job.id}/overlay.png", overlay, "image/png")
    storage.put(f"{job.org_id}/{job.id}/heatmap.png", overlay, "image/png")
    jobs.mark_processing(session, job.id)
    jobs.mark_succeeded(
        session,
        job.id,
        label="tumor",
        probability=0.93,
        threshold=0.5,
        model_name="effnet-lite0",
        model_version="2026.11.1",
        model_sha256="ab" * 32,
        heatmap_key=f"{job.org_id}/{job.id}/heatmap.png",
        overlay_key=f"{job.org_id}/{job.id}/overlay.png",
        validation={
            "passed": True,
            "reason_code": None,
            "checks": [{"name": "decodable", "passed": True, "detail": "png"}],
        },
        input_meta={"format": "png", "width": 32, "height": 32, "modality": None},
    )
    session.commit()

    body = client.get(f"/api/v1/jobs/{job_id}", headers=user_headers).get_json()
    assert body["status"] == "succeeded"
    assert body["result"]["label"] == "tumor"
    assert body["result"]["probability"] == 0.93
    assert body["result"]["model"] == {
        "name": "effnet-lite0",
        "version": "2026.11.1",
        "sha256": "ab" * 32,
    }
    # The PDF is rendered on its first GET, so a result with an overlay always links it.
    assert body["result"]["report_url"].endswith(f"/api/v1/jobs/{job_id}/report")
    assert body["validation"]["passed"] is True
    assert body["validation"]["checks"][0]["name"] == "decodable"
    assert body["input"]["format"] == "png" and body["input"]["width"] == 32

    r = client.get(body["result"]["overlay_url"], headers=user_headers)
    assert r.status_code == 200
    assert r.mimetype == "image/png"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.data == overlay


def test_rejected_and_failed_jobs_explain_why(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    rejected = submit(client, user_headers, png_bytes(seed=5)).get_json()["id"]
    failed = submit(client, user_headers, png_bytes(seed=6)).get_json()["id"]
    jobs.mark_processing(session, uuid.UUID(rejected))
    jobs.mark_rejected(
        session,
        uuid.UUID(rejected),
        reason_code="not_liver",
        validation={
            "passed": False,
            "reason_code": "not_liver",
            "checks": [{"name": "content_gate", "passed": False, "detail": "p=0.02"}],
        },
    )
    jobs.mark_processing(session, uuid.UUID(failed))
    jobs.mark_failed(
        session, uuid.UUID(failed), error_code="model_load_error", error_message="no model"
    )
    session.commit()

    body = client.get(f"/api/v1/jobs/{rejected}", headers=user_headers).get_json()
    assert body["status"] == "rejected"
    assert body["validation"]["passed"] is False
    assert body["validation"]["reason_code"] == "not_liver"
    assert body["result"] is None
    body = client.get(f"/api/v1/jobs/{failed}", headers=user_headers).get_json()
    assert body["status"] == "failed"
    assert body["error"] == {"code": "model_load_error", "message": "no model"}


def test_list_paginates_newest_first_and_filters_by_status(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    ids = [submit(client, user_headers, png_bytes(seed=i)).get_json()["id"] for i in range(5)]
    jobs.mark_processing(session, uuid.UUID(ids[1]))
    jobs.mark_failed(session, uuid.UUID(ids[1]), error_code="x", error_message="y")
    session.commit()

    seen: list[str] = []
    cursor = None
    while True:
        query = "/api/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(query, headers=user_headers).get_json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))

    failed = client.get("/api/v1/jobs?status=failed", headers=user_headers).get_json()
    assert [item["id"] for item in failed["items"]] == [ids[1]]
    assert failed["next_cursor"] is None


def test_list_with_bad_status_or_limit_is_422(
    client: FlaskClient, user_headers: dict[str, str]
) -> None:
    r = client.get("/api/v1/jobs?status=done", headers=user_headers)
    assert r.status_code == 422
    assert r.get_json()["error"]["code"] == "invalid_input"
    r = client.get("/api/v1/jobs?limit=0", headers=user_headers)
    assert r.status_code == 422
    r = client.get("/api/v1/jobs?cursor=%%%", headers=user_headers)
    assert r.status_code == 400
    assert r.get_json()["error"]["code"] == "bad_request"


def test_another_organizations_job_is_404_everywhere(
    client: FlaskClient, session: Session, storage: Storage
) -> None:
    alice = bearer(login(client, signup(client, organization="Clinic A")["email"])["access_token"])
    bob = bearer(login(client, signup(client, organization="Clinic B")["email"])["access_token"])
    job_id = submit(client, alice).get_json()["id"]
    job = _job_row(session, job_id)
    storage.put(f"{job.org_id}/{job.id}/overlay.png", b"\x89PNG", "image/png")

    for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/jobs/{job_id}/artifacts/input"):
        r = client.get(path, headers=bob)
        assert r.status_code == 404
        assert r.get_json()["error"]["code"] == "job_not_found"
    assert client.get("/api/v1/jobs", headers=bob).get_json()["items"] == []
    assert client.get(f"/api/v1/jobs/{job_id}", headers=alice).status_code == 200
    # The same Idempotency-Key in another organization is a different job.
    a = submit(client, alice, png_bytes(seed=1), extra_headers={"Idempotency-Key": "k"}).get_json()[
        "id"
    ]
    b = submit(client, bob, png_bytes(seed=2), extra_headers={"Idempotency-Key": "k"})
    assert b.status_code == 202
    assert b.get_json()["id"] != a


def _completed_upload(client: FlaskClient, headers: dict[str, str], data: bytes) -> str:
    """A direct upload (local store: the API's PUT route) holding `data`; its id."""
    slot = client.post("/api/v1/uploads", headers=headers, json={"content_type": "image/png"})
    assert slot.status_code == 201
    upload_id = str(slot.get_json()["id"])
    put = client.put(f"/api/v1/uploads/{upload_id}", headers=headers, data=data)
    assert put.status_code == 204
    return upload_id


def test_another_organizations_upload_cannot_be_replayed_with_its_idempotency_key(
    client: FlaskClient, session: Session
) -> None:
    """Clinic B sending clinic A's upload_id with A's Idempotency-Key gets upload_not_found, not
    A's job; the same key on B's own upload makes B's own job."""
    alice = bearer(login(client, signup(client, organization="Clinic A")["email"])["access_token"])
    bob = bearer(login(client, signup(client, organization="Clinic B")["email"])["access_token"])
    key = {"Idempotency-Key": "scan-0001"}
    upload_a = _completed_upload(client, alice, png_bytes(seed=11))
    made = client.post("/api/v1/jobs", headers={**alice, **key}, json={"upload_id": upload_a})
    assert made.status_code == 202

    stolen = client.post("/api/v1/jobs", headers={**bob, **key}, json={"upload_id": upload_a})
    assert stolen.status_code == 404
    assert stolen.get_json()["error"] == {
        "code": "upload_not_found",
        "message": "No such upload.",
        "details": {"upload_id": upload_a},
    }
    upload_b = _completed_upload(client, bob, png_bytes(seed=11))
    own = client.post("/api/v1/jobs", headers={**bob, **key}, json={"upload_id": upload_b})
    assert own.status_code == 202 and own.get_json()["id"] != made.get_json()["id"]
    listed = client.get("/api/v1/jobs", headers=bob).get_json()["items"]
    assert [item["id"] for item in listed] == [own.get_json()["id"]]
    job_a = _job_row(session, made.get_json()["id"])
    assert session.get(PendingUpload, uuid.UUID(upload_a)).job_id == job_a.id  # A's, untouched


def test_another_organizations_list_cursor_shows_only_the_callers_jobs(
    client: FlaskClient,
) -> None:
    """A next_cursor of clinic A's list, used by clinic B (with and without a status filter),
    pages through B's jobs only."""
    alice = bearer(login(client, signup(client, organization="Clinic A")["email"])["access_token"])
    bob = bearer(login(client, signup(client, organization="Clinic B")["email"])["access_token"])
    bob_job = submit(client, bob, png_bytes(seed=20)).get_json()["id"]
    for seed in (21, 22, 23):
        submit(client, alice, png_bytes(seed=seed))
    first = client.get("/api/v1/jobs?limit=1", headers=alice).get_json()
    assert first["next_cursor"] is not None
    for query in ("", "&status=queued"):
        page = client.get(
            f"/api/v1/jobs?limit=50&cursor={first['next_cursor']}{query}", headers=bob
        )
        assert page.status_code == 200
        assert [item["id"] for item in page.get_json()["items"]] == [bob_job]


def test_unknown_job_id_is_404(client: FlaskClient, user_headers: dict[str, str]) -> None:
    for job_id in (str(uuid.uuid4()), "not-a-uuid"):
        r = client.get(f"/api/v1/jobs/{job_id}", headers=user_headers)
        assert r.status_code == 404
        assert r.get_json()["error"]["code"] == "job_not_found"


def test_missing_artifact_is_404(client: FlaskClient, user_headers: dict[str, str]) -> None:
    job_id = submit(client, user_headers).get_json()["id"]
    for name in ("overlay", "passwd"):
        r = client.get(f"/api/v1/jobs/{job_id}/artifacts/{name}", headers=user_headers)
        assert r.status_code == 404
        assert r.get_json()["error"]["code"] == "artifact_not_found"


def test_idempotency_key_replays_same_job_and_conflicts_on_other_bytes(
    client: FlaskClient, user_headers: dict[str, str], session: Session, broker: redis.Redis
) -> None:
    key = {"Idempotency-Key": "upload-0001"}
    first = submit(client, user_headers, png_bytes(seed=7), extra_headers=key)
    again = submit(client, user_headers, png_bytes(seed=7), extra_headers=key)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.get_json()["id"] == first.get_json()["id"]
    other = submit(client, user_headers, png_bytes(seed=8), extra_headers=key)
    assert other.status_code == 409
    assert other.get_json()["error"]["code"] == "idempotency_conflict"
    assert len(session.scalars(select(Job)).all()) == 1
    assert broker.llen("inference") == 1  # the replay enqueued nothing


def test_submit_and_view_are_audited(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    job_id = submit(client, user_headers).get_json()["id"]
    client.get(f"/api/v1/jobs/{job_id}", headers=user_headers)
    actions = session.scalars(
        select(AuditEvent.action)
        .where(AuditEvent.job_id == uuid.UUID(job_id))
        .order_by(AuditEvent.at)
    ).all()
    assert list(actions) == ["job.submit", "job.view"]


def test_callback_url_to_loopback_or_private_is_refused(
    client: FlaskClient, user_headers: dict[str, str], session: Session, storage: Storage
) -> None:
    for url in (
        "http://127.0.0.1:9000/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest",
        "ftp://93.184.216.34/x",
    ):
        r = submit(client, user_headers, callback_url=url)
        assert r.status_code == 422, url
        assert r.get_json()["error"]["code"] == "callback_url_refused"
    assert session.scalars(select(Job)).all() == []


def test_callback_url_to_public_address_is_kept(
    client: FlaskClient, user_headers: dict[str, str], session: Session
) -> None:
    r = submit(client, user_headers, callback_url="https://93.184.216.34/hooks/liverscan")
    assert r.status_code == 202
    assert (
        _job_row(session, r.get_json()["id"]).callback_url
        == "https://93.184.216.34/hooks/liverscan"
    )


def test_on_s3_the_job_json_carries_presigned_urls(
    settings: Settings,
    session_factory: sessionmaker[Session],
    session: Session,
    s3_storage: S3Storage,
    broker: redis.Redis,
) -> None:
    app = make_app(settings, session_factory, s3_storage)
    client = app.test_client()
    headers = bearer(login(client, signup(client)["email"])["access_token"])
    data = png_bytes(seed=11)
    job_id = submit(client, headers, data).get_json()["id"]
    job = _job_row(session, job_id)
    assert s3_storage.get(job.input_key) == data
    overlay_key = f"{job.org_id}/{job.id}/overlay.png"
    s3_storage.put(overlay_key, b"\x89PNG-overlay", "image/png")
    jobs.mark_processing(session, job.id)
    jobs.mark_succeeded(
        session, job.id, label="normal", probability=0.2, threshold=0.5, model_name="m",
        model_version="1", model_sha256="0" * 64, overlay_key=overlay_key,
    )  # fmt: skip
    session.commit()
    result = client.get(f"/api/v1/jobs/{job_id}", headers=headers).get_json()["result"]
    assert "X-Amz-Signature=" in result["overlay_url"]
    assert requests.get(result["overlay_url"], timeout=10).content == b"\x89PNG-overlay"
    assert result["heatmap_url"] is None
    r = client.get(f"/api/v1/jobs/{job_id}/artifacts/overlay", headers=headers)
    assert r.status_code == 302
    assert "X-Amz-Signature=" in r.headers["Location"]
