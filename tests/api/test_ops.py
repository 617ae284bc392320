"""Health, readiness, metrics and the API description; dependencies down refuse cleanly."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from flask.testing import FlaskClient
from flask_jwt_extended import create_access_token
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.domain import jobs
from api.domain.db import make_engine
from api.domain.models import Job
from api.domain.queue import CeleryQueue
from api.domain.retention import PendingDeletion
from api.domain.settings import Settings
from api.domain.storage import LocalStorage, Storage, job_key
from tests.api.conftest import bearer, make_app, signup, submit

DEAD_BROKER = "redis://127.0.0.1:1/0"
OWN_BLUEPRINTS = ("auth.", "jobs.", "org.", "ops.", "openapi.")
DEAD_DATABASE = "postgresql+psycopg2://postgres@127.0.0.1:1/nowhere"
METRICS_TOKEN = "scrape-token-" + "m" * 32


def test_healthz(client: FlaskClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ok"}


def test_readyz_when_everything_answers(client: FlaskClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.get_json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}


def test_readyz_names_a_dead_broker(
    settings: Settings, session_factory: sessionmaker[Session], storage: Storage, engine: object
) -> None:
    app = make_app(settings, session_factory, storage, CeleryQueue(DEAD_BROKER), engine=engine)  # type: ignore[arg-type]
    r = app.test_client().get("/readyz")
    assert r.status_code == 503
    error = r.get_json()["error"]
    assert error["code"] == "not_ready"
    assert error["details"]["checks"]["broker"] == "broker_unavailable"
    assert error["details"]["checks"]["database"] == "ok"
    assert "broker" in error["message"]


def test_readyz_names_a_dead_database(tmp_path: Path, storage: Storage) -> None:
    settings = Settings(
        env="test",
        data_dir=tmp_path,
        database_url=DEAD_DATABASE,
        broker_url="redis://127.0.0.1:6379/14",
    )
    engine = make_engine(settings)
    app = make_app(settings, sessionmaker(bind=engine), storage, engine=engine)
    r = app.test_client().get("/readyz")
    assert r.status_code == 503
    checks = r.get_json()["error"]["details"]["checks"]
    assert checks == {"database": "database_unavailable", "broker": "ok", "storage": "ok"}


def test_submit_with_broker_down_is_503_and_writes_nothing(
    settings: Settings, session_factory: sessionmaker[Session], session: Session, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path / "store-broker-down")
    app = make_app(settings, session_factory, storage, CeleryQueue(DEAD_BROKER))
    client = app.test_client()
    user = signup(client)
    with app.app_context():
        token = create_access_token(identity=user["id"])
    r = submit(client, bearer(token))
    assert r.status_code == 503
    assert r.get_json()["error"]["code"] == "broker_unavailable"
    assert session.scalars(select(Job)).all() == []
    assert [p for p in (tmp_path / "store-broker-down").rglob("*") if p.is_file()] == []


def test_submit_with_database_down_is_503_and_writes_nothing(tmp_path: Path) -> None:
    settings = Settings(
        env="test",
        data_dir=tmp_path,
        database_url=DEAD_DATABASE,
        broker_url="redis://127.0.0.1:6379/14",
        jwt_secret_key="k" * 40,
    )
    engine = make_engine(settings)
    storage = LocalStorage(tmp_path / "store-db-down")
    app = make_app(settings, sessionmaker(bind=engine), storage, engine=engine)
    with app.app_context():
        token = create_access_token(identity="00000000-0000-0000-0000-000000000001")
    r = submit(app.test_client(), bearer(token))
    assert r.status_code == 503
    assert r.get_json()["error"]["code"] == "database_unavailable"
    assert [p for p in (tmp_path / "store-db-down").rglob("*") if p.is_file()] == []


def test_metrics_count_jobs_by_status_and_queue_depth(
    client: FlaskClient, user_headers: dict[str, str], session: Session, broker: redis.Redis
) -> None:
    ids = [
        submit(client, user_headers, data).get_json()["id"] for data in (b"\x89PNG-a", b"\x89PNG-b")
    ]
    job_id = uuid.UUID(ids[0])
    jobs.mark_processing(session, job_id)
    jobs.mark_succeeded(
        session, job_id, label="normal", probability=0.1, threshold=0.5,
        model_name="liverscan-b0", model_version="v3", model_sha256="cd" * 32,
        timings={"validate_s": 0.05, "predict_s": 0.2},
    )  # fmt: skip
    session.commit()
    text = client.get("/metrics").get_data(as_text=True)
    assert 'liverscan_jobs{status="queued"} 1.0' in text
    assert 'liverscan_jobs{status="succeeded"} 1.0' in text
    assert 'liverscan_queue_depth{queue="inference"} 2.0' in text
    assert (
        'liverscan_model_info{name="liverscan-b0",sha256="' + "cd" * 32 + '",version="v3"} 1.0'
        in text
    )
    assert 'liverscan_stage_duration_seconds{quantile="0.5",stage="predict"} 0.2' in text


def test_metrics_count_the_store_deletions_still_owed(
    client: FlaskClient, session: Session
) -> None:
    """Keys whose deletion the store refused are counted at scrape time on the API's /metrics,
    which Prometheus scrapes in every deployment (the worker's port may be off)."""
    gauge = "liverscan_store_deletions_pending "
    assert gauge + "0.0" in client.get("/metrics").get_data(as_text=True)
    org_id, job_id = uuid.uuid4(), uuid.uuid4()
    for name in ("input", "heatmap.png"):
        session.add(PendingDeletion(key=job_key(org_id, job_id, name), error="storage_unavailable"))
    session.commit()

    r = client.get("/metrics")
    assert r.status_code == 200
    assert gauge + "2.0" in r.get_data(as_text=True)


@pytest.fixture
def guarded(
    settings: Settings,
    session_factory: sessionmaker[Session],
    storage: Storage,
    broker: redis.Redis,
    engine: object,
) -> FlaskClient:
    """A client of an app whose /metrics needs LIVERSCAN_METRICS_TOKEN."""
    guarded_settings = settings.model_copy(update={"metrics_token": METRICS_TOKEN})
    return make_app(guarded_settings, session_factory, storage, engine=engine).test_client()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer wrong-" + METRICS_TOKEN,
        "Bearer " + METRICS_TOKEN[:-1],
        "Basic " + METRICS_TOKEN,
        METRICS_TOKEN,
    ],
)
def test_metrics_with_a_token_set_refuse_a_missing_or_wrong_one(
    guarded: FlaskClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    r = guarded.get("/metrics", headers=headers)
    assert r.status_code == 401
    assert r.get_json()["error"]["code"] == "unauthorized"
    assert "liverscan_jobs" not in r.get_data(as_text=True)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_metrics_with_a_token_set_answer_the_scraper_that_sends_it(
    guarded: FlaskClient, scheme: str
) -> None:
    r = guarded.get("/metrics", headers={"Authorization": f"{scheme} {METRICS_TOKEN}"})
    assert r.status_code == 200
    assert 'liverscan_jobs{status="queued"}' in r.get_data(as_text=True)


def test_metrics_without_a_token_set_are_open_to_any_caller(client: FlaskClient) -> None:
    """The default (LIVERSCAN_METRICS_TOKEN empty): restrict /metrics at the ingress instead."""
    for headers in ({}, {"Authorization": "Bearer anything"}):
        r = client.get("/metrics", headers=headers)
        assert r.status_code == 200
        assert 'liverscan_jobs{status="queued"}' in r.get_data(as_text=True)


def test_openapi_document_covers_every_api_route(client: FlaskClient) -> None:
    spec = client.get("/api/v1/openapi.json").get_json()
    assert spec["openapi"].startswith("3.1")
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    app = client.application
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith(OWN_BLUEPRINTS):
            continue  # other blueprints add themselves with api.openapi.register_path
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:  # type: ignore[operator]
            assert (path, method.lower()) in documented, (path, method)


def test_docs_page_lists_operations_without_external_assets(client: FlaskClient) -> None:
    r = client.get("/api/v1/docs")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert "/api/v1/jobs" in html and "POST" in html
    assert "http://" not in html and "https://" not in html


def test_cors_is_closed_by_default_and_opens_only_to_listed_origins(
    client: FlaskClient,
    settings: Settings,
    session_factory: sessionmaker[Session],
    storage: Storage,
) -> None:
    r = client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in r.headers
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    open_settings = settings.model_copy(update={"cors_origins": ["https://pacs.example.org"]})
    app = make_app(open_settings, session_factory, storage)
    allowed = app.test_client().get("/healthz", headers={"Origin": "https://pacs.example.org"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://pacs.example.org"
    other = app.test_client().get("/healthz", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
