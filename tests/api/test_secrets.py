"""Stored secrets: sealed under the current key, opened by current and previous keys, rotated."""

from __future__ import annotations

import pytest

from api.domain import secrets
from api.domain.errors import SecretUnreadable
from api.domain.settings import Settings

OLD, NEW = "old-key-" + "o" * 32, "new-key-" + "n" * 32


def _settings(key: str, previous: str = "") -> Settings:
    return Settings(env="test", secrets_key=key, secrets_key_previous=previous)


def test_a_sealed_secret_opens_only_with_its_key() -> None:
    sealed = secrets.seal(_settings(OLD), "whsec_abc")
    assert sealed.startswith(secrets.PREFIX) and "whsec_abc" not in sealed
    assert secrets.unseal(_settings(OLD), sealed) == "whsec_abc"
    assert secrets.seal(_settings(OLD), "whsec_abc") != sealed  # a fresh IV each time
    with pytest.raises(SecretUnreadable) as err:
        secrets.unseal(_settings(NEW), sealed)
    assert err.value.code == "secret_unreadable"


def test_previous_keys_still_open_after_rotation() -> None:
    sealed = secrets.seal(_settings(OLD), "whsec_abc")
    assert (
        secrets.unseal(_settings(NEW, previous=f"unused-{'u' * 32}, {OLD}"), sealed) == "whsec_abc"
    )


def test_plaintext_from_before_encryption_passes_through() -> None:
    assert secrets.unseal(_settings(NEW), "whsec_legacy") == "whsec_legacy"


def test_a_tampered_token_is_unreadable_not_garbage() -> None:
    sealed = secrets.seal(_settings(OLD), "whsec_abc")
    flipped = sealed[:-6] + ("A" if sealed[-6] != "A" else "B") + sealed[-5:]
    with pytest.raises(SecretUnreadable):
        secrets.unseal(_settings(OLD), flipped)
