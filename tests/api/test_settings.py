"""Settings: embedded defaults, and production refusing to start with missing or example secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api.domain.settings import ConfigError, Settings

ROOT = Path(__file__).resolve().parents[2]
STRONG = "s" * 48


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LIVERSCAN_* variable of the calling shell leaks into these tests."""
    import os

    for name in [n for n in os.environ if n.startswith("LIVERSCAN_")]:
        monkeypatch.delenv(name)


def test_embedded_defaults_need_no_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIVERSCAN_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.database_url == f"sqlite:///{tmp_path}/liverscan.db"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path}/broker.sqlite"
    assert settings.storage_backend == "local" and settings.storage_dir == tmp_path / "store"
    assert (
        settings.max_upload_mb == 50
        and settings.access_token_minutes == 15
        and settings.refresh_token_days == 30
    )
    assert settings.webhook_allow_private is False and settings.webhook_max_attempts == 8
    assert settings.cors_origins == []


def test_environment_variables_are_read_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVERSCAN_MAX_UPLOAD_MB", "7")
    monkeypatch.setenv("LIVERSCAN_WEBHOOK_ALLOW_PRIVATE", "true")
    settings = Settings()
    assert settings.max_upload_bytes == 7 * 1024 * 1024
    assert settings.webhook_allow_private is True


def test_production_refuses_the_example_jwt_secret() -> None:
    with pytest.raises(ConfigError, match="LIVERSCAN_JWT_SECRET_KEY"):
        Settings(env="production")
    with pytest.raises(ConfigError):
        Settings(env="production", jwt_secret_key="change-me")


def test_production_refuses_the_example_secrets_key() -> None:
    """Stored webhook secrets must not be encrypted under the key everyone has."""
    with pytest.raises(ConfigError, match="LIVERSCAN_SECRETS_KEY"):
        Settings(env="production", jwt_secret_key=STRONG)
    with pytest.raises(ConfigError, match="LIVERSCAN_SECRETS_KEY"):
        Settings(env="production", jwt_secret_key=STRONG, secrets_key="short")


def test_production_with_s3_needs_keys() -> None:
    with pytest.raises(ConfigError, match="LIVERSCAN_AWS_SECRET_ACCESS_KEY"):
        Settings(
            env="production", jwt_secret_key=STRONG, storage_backend="s3", aws_access_key_id="AKIA1"
        )
    with pytest.raises(ConfigError, match="LIVERSCAN_AWS_ACCESS_KEY_ID"):
        Settings(
            env="production",
            jwt_secret_key=STRONG,
            storage_backend="s3",
            aws_access_key_id="minioadmin",
            aws_secret_access_key="x" * 40,
        )
    ok = Settings(
        env="production",
        jwt_secret_key=STRONG,
        secrets_key="s" * 40,
        storage_backend="s3",
        aws_access_key_id="AKIA1",
        aws_secret_access_key="x" * 40,
    )
    assert ok.env == "production"


def test_every_setting_is_documented_in_env_example() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(LIVERSCAN_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    expected = {f"LIVERSCAN_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set()
    assert documented - expected == set()


def test_nothing_else_reads_the_environment() -> None:
    offenders = []
    for folder in ("api", "migrations"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            if re.search(r"os\.environ|os\.getenv|getenv\(", text):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
