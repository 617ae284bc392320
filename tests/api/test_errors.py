"""Bad input: every answer is the one error envelope with the exact code."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.domain.models import Job
from api.domain.settings import Settings
from tests.api.conftest import submit


def _error(r: object) -> dict[str, object]:
    body = r.get_json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    return dict(body["error"])


def _stored_files(settings: Settings) -> list[Path]:
    assert settings.storage_dir is not None
    return [p for p in Path(settings.storage_dir).rglob("*") if p.is_file()]


def test_unknown_route_is_404(client: FlaskClient) -> None:
    r = client.get("/api/v1/nothing-here")
    assert r.status_code == 404
    assert _error(r)["code"] == "not_found"


def test_wrong_method_is_405_with_allow_header(client: FlaskClient) -> None:
    r = client.delete("/api/v1/jobs")
    assert r.status_code == 405
    assert _error(r)["code"] == "method_not_allowed"
    assert "POST" in r.headers["Allow"]


@pytest.mark.parametrize("body", ["{not json", '{"email": ', "\xff\xfe"])
def test_malformed_json_is_400(client: FlaskClient, body: str) -> None:
    r = client.post("/api/v1/auth/login", data=body, content_type="application/json")
    assert r.status_code == 400
    assert _error(r)["code"] == "malformed_json"


def test_json_that_is_not_an_object_is_422(client: FlaskClient) -> None:
    r = client.post("/api/v1/auth/login", json=["a", "b"])
    assert r.status_code == 422
    assert _error(r)["code"] == "invalid_input"


def test_missing_file_is_422(client: FlaskClient, user_headers: dict[str, str]) -> None:
    r = client.post(
        "/api/v1/jobs",
        headers=user_headers,
        data={"client_ref": "x"},
        content_type="multipart/form-data",
    )
    assert r.status_code == 422
    assert _error(r)["code"] == "missing_file"


def test_empty_file_is_422_missing_file(client: FlaskClient, user_headers: dict[str, str]) -> None:
    r = submit(client, user_headers, b"")
    assert r.status_code == 422
    assert _error(r)["code"] == "missing_file"


def test_oversize_upload_is_413_and_leaves_nothing(
    client: FlaskClient, user_headers: dict[str, str], settings: Settings, session: Session
) -> None:
    # 1 MB limit in tests; just over it (inside the multipart slack) and far over it.
    for size in (settings.max_upload_bytes + 10, settings.max_upload_bytes * 3):
        r = submit(client, user_headers, b"\x89PNG" + b"\0" * size)
        assert r.status_code == 413, size
        assert _error(r)["code"] == "payload_too_large"
    assert session.scalars(select(Job)).all() == []
    assert _stored_files(settings) == []


def test_errors_never_leak_stack_traces(client: FlaskClient) -> None:
    r = client.get("/api/v1/jobs/../../etc/passwd")
    assert r.status_code == 404
    assert "Traceback" not in r.get_data(as_text=True)
