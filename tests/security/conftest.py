"""Security fixtures: a PostgreSQL database of this package's own, one rolled-back transaction per
test, a real Redis (database 12) for the queue and the rate-limit counters, and a world of two
organizations with every role and one submitted job."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from flask_jwt_extended import create_access_token
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from api.domain import accounts
from api.domain.db import make_engine
from api.domain.models import Role, User, utcnow
from api.domain.settings import Settings
from api.domain.storage import LocalStorage, Storage
from tests.api.conftest import (
    PASSWORD,
    base_settings,
    bearer,
    create_pg_database,
    drop_pg_database,
    login,
    make_app,
    migrate,
    signup,
    submit,
)

REDIS_DB = 12  # the security tests' own Redis database (api 14, worker 13)
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


@pytest.fixture(scope="session")
def security_pg_url() -> Iterator[str]:
    """A PostgreSQL database of this package, migrated to head once."""
    name = f"liverscan_security_test_{os.getpid()}"
    url = create_pg_database(name)
    engine = create_engine(url)
    migrate(engine)
    engine.dispose()
    yield url
    drop_pg_database(name)


@pytest.fixture(scope="session")
def security_engine(
    security_pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    """The engine of that database."""
    eng = make_engine(
        Settings(env="test", database_url=security_pg_url, data_dir=tmp_path_factory.getbasetemp())
    )
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def engine(security_engine: Engine) -> Engine:
    """The engine the shared per-test transaction fixtures (tests/conftest.py) run on."""
    return security_engine


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    """Redis database 12 (queue and rate-limit counters), empty at the start and end of a test."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def security_settings(tmp_path: Path, security_pg_url: str) -> Settings:
    """Test settings with rate limits off (the tests that need them build their own app)."""
    return base_settings(tmp_path, security_pg_url, broker_url=REDIS_URL, rate_limit_enabled=False)


AppFactory = Callable[..., Flask]


@pytest.fixture
def make_security_app(
    tmp_path: Path,
    security_pg_url: str,
    session_factory: sessionmaker[Session],
    redis_db: redis.Redis,
    security_engine: Engine,
) -> AppFactory:
    """Build an app on the test transaction with settings overrides and an optional store."""

    def build(storage: Storage | None = None, **overrides: Any) -> Flask:
        values: dict[str, Any] = {"broker_url": REDIS_URL, "rate_limit_enabled": False}
        values.update(overrides)
        settings = base_settings(tmp_path, security_pg_url, **values)
        assert settings.storage_dir is not None
        store = storage or LocalStorage(settings.storage_dir)
        return make_app(settings, session_factory, store, engine=security_engine)

    return build


@pytest.fixture
def app(make_security_app: AppFactory) -> Flask:
    """The app with rate limits off, a local store and real Redis."""
    return make_security_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """The Flask test client."""
    return app.test_client()


@dataclass
class World:
    """Two organizations, every role of org A, one admin of org B, and one job of org A."""

    app: Flask
    users: dict[str, User]
    job_id: str
    job_b_id: str

    def token(self, principal: str) -> str | None:
        """A fresh access token for a principal of the matrix (None for anonymous)."""
        if principal == "anonymous":
            return None
        with self.app.app_context():
            if principal == "expired":
                user = self.users["clinician_a"]
                return create_access_token(
                    identity=str(user.id),
                    additional_claims={"org": str(user.org_id), "role": user.role.value},
                    expires_delta=timedelta(seconds=-60),
                )
            user = self.users["clinician_a" if principal == "revoked" else principal]
            return create_access_token(
                identity=str(user.id),
                additional_claims={"org": str(user.org_id), "role": user.role.value},
                fresh=True,
            )

    def headers(self, principal: str) -> dict[str, str]:
        """Authorization headers for a principal (none for anonymous)."""
        token = self.token(principal)
        if token is None:
            return {}
        if principal == "revoked":
            self._revoke(token)
        return bearer(token)

    def _revoke(self, token: str) -> None:
        from flask_jwt_extended import decode_token

        from api.resources import db

        with self.app.app_context():
            payload = decode_token(token)
            accounts.revoke_token(
                db(),
                jti=payload["jti"],
                token_type="access",
                user_id=uuid.UUID(payload["sub"]),
                expires_at=utcnow() + timedelta(days=1),
            )
            db().commit()


def form_token(client: FlaskClient, path: str) -> str:
    """The CSRF token of a pre-session web form (GET the page; the client keeps its cookie)."""
    found = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).get_data(as_text=True))
    assert found is not None, path
    return found.group(1)


def add_member(client: FlaskClient, admin_headers: dict[str, str], role: Role) -> dict[str, Any]:
    """Add a member with a role to the admin's organization through the API."""
    r = client.post(
        "/api/v1/org/users",
        headers=admin_headers,
        json={
            "email": f"{role.value}-{uuid.uuid4().hex[:8]}@clinic.test",
            "password": PASSWORD,
            "name": role.value.title(),
            "role": role.value,
        },
    )
    assert r.status_code == 201, r.get_json()
    return dict(r.get_json()["user"])


def build_world(app: Flask, client: FlaskClient, session: Session) -> World:
    """Sign up orgs A and B, add org A's clinician and operator, submit one job in each org."""
    admin_a = signup(client, organization="Clinic A")
    admin_a_headers = bearer(login(client, admin_a["email"])["access_token"])
    clinician = add_member(client, admin_a_headers, Role.CLINICIAN)
    operator = add_member(client, admin_a_headers, Role.OPERATOR)
    admin_b = signup(client, organization="Clinic B")
    clinician_headers = bearer(login(client, clinician["email"])["access_token"])
    r = submit(client, clinician_headers)
    assert r.status_code == 202, r.get_json()
    job_id = r.get_json()["id"]
    r = submit(client, bearer(login(client, admin_b["email"])["access_token"]))
    assert r.status_code == 202, r.get_json()
    users = {
        name: session.get(User, uuid.UUID(u["id"]))
        for name, u in (
            ("admin_a", admin_a),
            ("clinician_a", clinician),
            ("operator_a", operator),
            ("user_b", admin_b),
        )
    }
    assert all(users.values())
    return World(app=app, users=users, job_id=job_id, job_b_id=r.get_json()["id"])  # type: ignore[arg-type]


@pytest.fixture
def world(app: Flask, client: FlaskClient, session: Session) -> World:
    """The two-organization world on the default app."""
    return build_world(app, client, session)


@pytest.fixture
def user_headers_a(client: FlaskClient) -> dict[str, str]:
    """Authorization headers of the admin of a fresh organization."""
    return bearer(login(client, signup(client)["email"])["access_token"])
