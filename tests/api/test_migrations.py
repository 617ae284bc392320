"""Alembic is the only source of the schema: one head, no drift from the models, reversible."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect

from api.domain.db import make_engine
from api.domain.models import Base
from api.domain.settings import Settings
from tests.api.conftest import ROOT, alembic_config, create_pg_database, drop_pg_database, migrate


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine on a brand-new, empty database."""
    if request.param == "sqlite":
        engine = make_engine(
            Settings(env="test", data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/m.db")
        )
        yield engine
        engine.dispose()
        return
    name = f"liverscan_migrations_{os.getpid()}"
    engine = create_engine(create_pg_database(name))
    yield engine
    engine.dispose()
    drop_pg_database(name)


def test_there_is_exactly_one_head() -> None:
    from alembic.config import Config

    script = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini")))
    assert len(script.get_heads()) == 1


def test_upgrade_head_matches_the_models(empty_engine: Engine) -> None:
    migrate(empty_engine)
    with empty_engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []
    tables = set(inspect(empty_engine).get_table_names())
    assert set(Base.metadata.tables) <= tables


def test_downgrade_base_removes_everything(empty_engine: Engine) -> None:
    migrate(empty_engine)
    with empty_engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert set(inspect(empty_engine).get_table_names()) <= {"alembic_version"}
    migrate(empty_engine)  # and back up again
    assert set(Base.metadata.tables) <= set(inspect(empty_engine).get_table_names())


def test_stale_login_throttles_are_found_by_an_index(empty_engine: Engine) -> None:
    """The sweep deletes login_throttles by last_failure_at (one row per email ever tried): head
    indexes that column, and downgrading to 0007 drops only that index."""

    def indexed() -> list[list[str | None]]:
        return [ix["column_names"] for ix in inspect(empty_engine).get_indexes("login_throttles")]

    migrate(empty_engine)
    assert ["last_failure_at"] in indexed()
    with empty_engine.begin() as conn:
        command.downgrade(alembic_config(conn), "0007_pending_deletions")
    assert ["last_failure_at"] not in indexed()
    assert "login_throttles" in inspect(empty_engine).get_table_names()


def test_alembic_command_line_reads_the_liverscan_settings(tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")}
    env["LIVERSCAN_DATA_DIR"] = str(tmp_path)  # the embedded default: <data_dir>/liverscan.db
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    engine = create_engine(f"sqlite:///{tmp_path}/liverscan.db")
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()
