"""API fixtures: migrated PostgreSQL and SQLite databases, one rolled-back transaction per test,
a local or S3 store, a real Redis queue, and the Flask test client."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from alembic import command
from alembic.config import Config
from flask import Flask
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.domain.db import make_engine
from api.domain.queue import CeleryQueue
from api.domain.settings import Settings
from api.domain.storage import LocalStorage, S3Storage, Storage
from api.resources import Resources

ROOT = Path(__file__).resolve().parents[2]
PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
REDIS_DB = 14  # a Redis database of the API tests' own (the worker tests use 13)
BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PASSWORD = "correct-horse-42"


def alembic_config(connection: Connection) -> Config:
    """An Alembic config that migrates through `connection`."""
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database behind `engine` to `revision` with Alembic."""
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), revision)


def create_pg_database(name: str) -> str:
    """Create an empty PostgreSQL database (dropping any leftover) and return its URL."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"


def drop_pg_database(name: str) -> None:
    """Drop a PostgreSQL database created by `create_pg_database`."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def base_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    """Settings for tests: cheap argon2, a Redis broker, loopback callbacks refused."""
    values: dict[str, Any] = {
        "env": "test",
        "data_dir": tmp_path,
        "database_url": database_url,
        "broker_url": BROKER_URL,
        "storage_dir": tmp_path / "store",
        "jwt_secret_key": "test-secret-" + "x" * 40,
        "password_hash_time_cost": 1,
        "password_hash_memory_kib": 8192,
        "max_upload_mb": 1,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A PostgreSQL database of this test session, migrated to head once."""
    name = f"liverscan_api_test_{os.getpid()}"
    url = create_pg_database(name)
    engine = create_engine(url)
    migrate(engine)
    engine.dispose()
    yield url
    drop_pg_database(name)


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A SQLite file of this test session, migrated to head once."""
    path = tmp_path_factory.mktemp("sqlite") / "liverscan.db"
    url = f"sqlite:///{path}"
    engine = make_engine(Settings(env="test", database_url=url, data_dir=path.parent))
    migrate(engine)
    engine.dispose()
    return url


@pytest.fixture(scope="session", params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each API test runs on PostgreSQL and on SQLite."""
    name = "pg_url" if request.param == "postgresql" else "sqlite_url"
    return str(request.getfixturevalue(name))


@pytest.fixture(scope="session")
def engine(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The engine of the session's database (SQLite with liverscan's pragmas and BEGIN handling)."""
    eng = make_engine(
        Settings(env="test", database_url=database_url, data_dir=tmp_path_factory.getbasetemp())
    )
    yield eng
    eng.dispose()


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    """The Redis database the API publishes to, empty at the start and end of each test."""
    client = redis.Redis.from_url(BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings of one test."""
    return base_settings(tmp_path, database_url)


@pytest.fixture
def storage(settings: Settings) -> Storage:
    """The local store of one test."""
    assert settings.storage_dir is not None
    return LocalStorage(settings.storage_dir)


def make_app(
    settings: Settings,
    session_factory: sessionmaker[Session],
    storage: Storage,
    queue: CeleryQueue | None = None,
    engine: Engine | None = None,
) -> Flask:
    """The app with injected resources (the test transaction, a given store and queue)."""
    resources = Resources(
        settings=settings,
        engine=engine,
        session_factory=session_factory,
        storage=storage,
        queue=queue or CeleryQueue(settings.broker_url),
    )
    return create_app(settings, resources=resources)


@pytest.fixture
def app(
    settings: Settings,
    session_factory: sessionmaker[Session],
    storage: Storage,
    broker: redis.Redis,
    engine: Engine,
) -> Flask:
    """The app on the test transaction, a local store and real Redis."""
    return make_app(settings, session_factory, storage, engine=engine)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """The Flask test client."""
    return app.test_client()


def signup(
    client: FlaskClient, email: str | None = None, organization: str = "Clinic"
) -> dict[str, Any]:
    """Sign up a fresh user (first of a new organization, so admin); returns the user JSON."""
    email = email or f"dr-{uuid.uuid4().hex[:10]}@clinic.test"
    r = client.post(
        "/api/v1/auth/signup",
        json={
            "email": email,
            "password": PASSWORD,
            "name": "Dr Test",
            "organization": organization,
        },
    )
    assert r.status_code == 201, r.get_json()
    return dict(r.get_json()["user"])


def login(client: FlaskClient, email: str, password: str = PASSWORD) -> dict[str, Any]:
    """Log in; returns the token JSON."""
    r = client.post("/api/v1/auth/login", json={"email": email, "password": password})
    assert r.status_code == 200, r.get_json()
    return dict(r.get_json())


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def user_headers(client: FlaskClient) -> dict[str, str]:
    """Authorization headers of a fresh user in a fresh organization."""
    user = signup(client)
    return bearer(login(client, user["email"])["access_token"])


@contextlib.contextmanager
def read_only_folder(folder: Path) -> Iterator[None]:
    """Make `folder` refuse new and removed entries (a read-only volume, a wrong owner) until the
    block ends: chmod for other users; for root, whom chmod does not stop, the immutable attribute
    (skipped where `chattr` cannot set it)."""
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], check=False).returncode:
        pytest.skip("root, and chattr cannot make the folder immutable here")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def png_bytes(size: int = 64, seed: int = 0) -> bytes:
    """A small grayscale PNG (different seeds give different bytes)."""
    img = Image.new("L", (size, size), color=seed % 256)
    img.putpixel((seed % size, 0), (seed * 7 + 1) % 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def submit(
    client: FlaskClient,
    headers: dict[str, str],
    data: bytes | None = None,
    *,
    filename: str = "slice.png",
    extra_headers: dict[str, str] | None = None,
    **fields: str,
) -> Any:
    """POST one file to /api/v1/jobs; returns the response."""
    form: dict[str, Any] = dict(fields)
    form["file"] = (io.BytesIO(png_bytes() if data is None else data), filename, "image/png")
    return client.post(
        "/api/v1/jobs",
        headers={**headers, **(extra_headers or {})},
        data=form,
        content_type="multipart/form-data",
    )


@pytest.fixture
def s3_storage(s3_endpoint: str) -> S3Storage:
    """An empty bucket on the moto S3 server, reached over HTTP."""
    store = S3Storage(
        f"api-{uuid.uuid4().hex[:12]}",
        endpoint_url=s3_endpoint,
        access_key_id="testing",
        secret_access_key="testing",
    )
    store.ensure_bucket()
    return store
