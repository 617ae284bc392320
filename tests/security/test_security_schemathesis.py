"""schemathesis against /api/v1/openapi.json on a live server (loopback): cases generated from the
document for every operation, sent with a fresh valid token; no answer may be a 5xx, a status
code the document does not list for the operation, or a body its schema rejects. The number
of cases tried is logged and attached to the test report (`record_property`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from flask_jwt_extended import create_access_token
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from werkzeug.serving import make_server

from api.app import create_app
from api.domain.models import User
from tests.api.conftest import base_settings, bearer, login, signup
from tests.conftest import free_port
from tests.security.conftest import REDIS_URL

log = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

# No 5xx, every status code documented for its operation, every JSON body valid against the
# operation's schema (the error envelope included).
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 25  # ~20 operations: a few hundred cases, well under a minute here


@pytest.fixture
def live_url(
    tmp_path: Path, security_pg_url: str, redis_db: redis.Redis
) -> Iterator[tuple[str, Any]]:
    """The real app (its own engine on the security database, Redis, a local store) on loopback."""
    app = create_app(
        base_settings(tmp_path, security_pg_url, broker_url=REDIS_URL, rate_limit_enabled=False)
    )
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", app
    finally:
        server.shutdown()
        thread.join(timeout=10)
        engine = app.extensions["liverscan"].engine
        if engine is not None:
            engine.dispose()


def test_no_generated_request_gets_a_server_error(
    live_url: tuple[str, Any], record_property: Any
) -> None:
    base_url, app = live_url
    client = app.test_client()
    email = signup(client, organization="Fuzz clinic")["email"]
    login(client, email)
    with app.app_context():
        from api.resources import db

        user = db().query(User).filter_by(email=email).one()
        identity, claims = str(user.id), {"org": str(user.org_id), "role": user.role.value}

    def token() -> dict[str, str]:
        # A fresh token per case: a generated POST /auth/logout must not starve the rest.
        with app.app_context():
            return bearer(create_access_token(identity, additional_claims=claims, fresh=True))

    schema = schemathesis.openapi.from_url(f"{base_url}/api/v1/openapi.json")
    tried: dict[str, int] = {}
    server_errors: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            label = case.operation.label
            tried[label] = tried.get(label, 0) + 1
            try:
                case.call_and_validate(
                    base_url=base_url, headers=token(), checks=CHECKS, timeout=30
                )
            except FailureGroup as exc:
                server_errors.append(f"{label}: {str(exc)[:300]}")

        run()

    total = sum(tried.values())
    record_property("schemathesis_cases", total)
    log.info("schemathesis: %d cases over %d operations", total, len(tried))
    assert len(tried) >= 15, sorted(tried)
    assert total >= 5 * len(tried)
    assert not server_errors, "\n".join(server_errors[:10])
