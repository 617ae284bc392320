"""Submit ordering: bytes before the row, the row before the message; failures leave nothing behind."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.domain import intake
from api.domain.db import make_engine
from api.domain.errors import DatabaseUnavailable
from api.domain.models import Job, Organization
from api.domain.queue import CeleryQueue
from api.domain.settings import Settings
from api.domain.storage import LocalStorage
from tests.api.conftest import BROKER_URL, png_bytes


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_database_down_after_storing_deletes_the_bytes(tmp_path: Path, broker: redis.Redis) -> None:
    settings = Settings(
        env="test",
        data_dir=tmp_path,
        database_url="postgresql+psycopg2://postgres@127.0.0.1:1/x",
        broker_url=BROKER_URL,
    )
    storage = LocalStorage(tmp_path / "store")
    with sessionmaker(bind=make_engine(settings))() as session:
        with pytest.raises(DatabaseUnavailable) as info:
            intake.submit(
                session, settings=settings, storage=storage, queue=CeleryQueue(BROKER_URL),
                org_id=uuid.uuid4(), user_id=None, upload=intake.Upload(png_bytes(), "a.png", "image/png"),
            )  # fmt: skip
    assert info.value.code == "database_unavailable"
    assert _files(tmp_path / "store") == []
    assert broker.llen("inference") == 0


def test_enqueue_failure_after_commit_keeps_the_queued_row_for_the_sweep(
    session: Session, settings: Settings, tmp_path: Path
) -> None:
    org = Organization(name="Clinic", webhook_secret="whsec_x")
    session.add(org)
    session.commit()

    class BrokerDiesAfterPing(CeleryQueue):
        def ping(self) -> None:  # the broker answered the pre-check, then went away
            return None

    storage = LocalStorage(tmp_path / "store")
    result = intake.submit(
        session, settings=settings, storage=storage, queue=BrokerDiesAfterPing("redis://127.0.0.1:1/0"),
        org_id=org.id, user_id=None, upload=intake.Upload(png_bytes(), "a.png", "image/png"),
    )  # fmt: skip
    assert result.created and not result.enqueued
    row = session.scalars(select(Job)).one()
    assert row.status.value == "queued"
    assert storage.get(row.input_key) == png_bytes()
