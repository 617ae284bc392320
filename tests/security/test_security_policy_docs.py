"""The answers that access policies give before any view runs — 410 for a deleted job, 423 for a
locked-out login, 429 for a rate limit — are in /api/v1/openapi.json on the operations that give
them, with Retry-After where the answer carries it. Each is provoked for real, then looked up."""

from __future__ import annotations

import io
import re
import uuid
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.api.conftest import PASSWORD, bearer, login, png_bytes, signup, submit
from tests.security.conftest import AppFactory


def _operation(app: Flask, spec: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    """The document's operation for a concrete request path (matched through the URL map)."""
    rule, _ = app.url_map.bind("localhost").match(path, method, return_rule=True)
    template = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
    return dict(spec["paths"][template][method.lower()])


def _documented(
    app: Flask, client: FlaskClient, path: str, method: str, answer: TestResponse
) -> None:
    spec = client.get("/api/v1/openapi.json").get_json()
    responses = _operation(app, spec, path, method)["responses"]
    status = str(answer.status_code)
    assert status in responses, (method, path, status, sorted(responses))
    ref = responses[status]["$ref"].rsplit("/", 1)[1]
    declared = spec["components"]["responses"][ref]
    assert declared["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    if "Retry-After" in answer.headers:
        assert "Retry-After" in declared["headers"]


def test_deleted_job_410_is_documented_on_every_route_that_names_the_job(
    make_security_app: AppFactory,
) -> None:
    app = make_security_app()
    client = app.test_client()
    headers = bearer(login(client, signup(client)["email"])["access_token"])
    job_id = submit(client, headers).get_json()["id"]
    assert client.delete(f"/api/v1/jobs/{job_id}", headers=headers).status_code == 200
    paths = [
        f"/api/v1/jobs/{job_id}",
        f"/api/v1/jobs/{job_id}/artifacts/input",
        f"/api/v1/jobs/{job_id}/report",
        f"/api/v1/jobs/{job_id}/fhir",
        f"/api/v1/jobs/{job_id}/dicom/sr",
    ]
    for path in paths:
        answer = client.get(path, headers=headers)
        assert (answer.status_code, answer.get_json()["error"]["code"]) == (410, "job_deleted")
        _documented(app, client, path, "GET", answer)
    spec = client.get("/api/v1/openapi.json").get_json()
    assert "410" not in spec["paths"]["/api/v1/jobs/{job_id}"]["delete"]["responses"]


def test_lockout_423_is_documented_on_login(make_security_app: AppFactory) -> None:
    app = make_security_app(login_max_failures=1)
    client = app.test_client()
    email = signup(client)["email"]
    wrong = {"email": email, "password": "wrong-password-1"}
    assert client.post("/api/v1/auth/login", json=wrong).status_code == 401
    answer = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (423, "account_locked")
    _documented(app, client, "/api/v1/auth/login", "POST", answer)


def test_rate_limit_429_is_documented_on_login_signup_and_both_submits(
    make_security_app: AppFactory,
) -> None:
    app = make_security_app(
        rate_limit_enabled=True,
        rate_limit_storage_url="memory://",
        rate_limit_login="1/minute",
        rate_limit_signup="1/minute",
        rate_limit_submit="1/minute",
    )
    client = app.test_client()
    email = signup(client)["email"]
    headers = bearer(login(client, email)["access_token"])
    assert submit(client, headers).status_code == 202

    def batch(seed: int) -> TestResponse:
        files = {"file": [(io.BytesIO(png_bytes(seed=seed)), "a.png", "image/png")]}
        return client.post(
            "/api/v1/batches", headers=headers, data=files, content_type="multipart/form-data"
        )

    assert batch(1).status_code == 202  # batches count on their own
    body = {"email": "x@clinic.test", "password": PASSWORD, "name": "X", "organization": "O"}
    answers = {
        "/api/v1/auth/signup": client.post("/api/v1/auth/signup", json=body),
        "/api/v1/auth/login": client.post(
            "/api/v1/auth/login", json={"email": email, "password": PASSWORD}
        ),
        "/api/v1/jobs": submit(client, headers, client_ref="2"),
        "/api/v1/batches": batch(2),
    }
    for path, answer in answers.items():
        assert (answer.status_code, answer.get_json()["error"]["code"]) == (429, "rate_limited")
        _documented(app, client, path, "POST", answer)


def test_metrics_401_without_the_scrape_token_is_documented(make_security_app: AppFactory) -> None:
    app = make_security_app(metrics_token="scrape-" + "t" * 32)
    client = app.test_client()
    answer = client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert (answer.status_code, answer.get_json()["error"]["code"]) == (401, "unauthorized")
    _documented(app, client, "/metrics", "GET", answer)


def test_bad_host_400_is_documented_on_every_operation_but_the_probes(
    make_security_app: AppFactory,
) -> None:
    """With LIVERSCAN_PUBLIC_HOSTS set, every operation answers a request naming another host
    400 bad_host before its view runs; /healthz, /readyz and /metrics answer any name."""
    app = make_security_app(public_hosts="localhost")  # the test client's own name
    client = app.test_client()
    spec = client.get("/api/v1/openapi.json").get_json()
    probes = {"/healthz", "/readyz", "/metrics"}
    for template, operations in spec["paths"].items():
        path = re.sub(r"\{\w+\}", str(uuid.uuid4()), template)
        for method in operations:
            answer = client.open(path, method=method.upper(), headers={"Host": "evil.example"})
            if template in probes:
                assert answer.status_code != 400, (method, path)
                assert "400" not in operations[method]["responses"], (method, template)
                continue
            assert (answer.status_code, answer.get_json()["error"]["code"]) == (
                400,
                "bad_host",
            ), (method, path)
            _documented(app, client, path, method.upper(), answer)
