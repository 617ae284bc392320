"""Secrets kept in the database (organization webhook signing secrets), encrypted at rest.

A copy of the database (a backup, a replica, a leaked dump) must not let anyone sign webhooks
that a clinic's system would accept as liverscan's. Stored values are ``enc:v1:`` + a Fernet
token (AES-128-CBC + HMAC-SHA256) under a key derived from ``LIVERSCAN_SECRETS_KEY``; keys in
``LIVERSCAN_SECRETS_KEY_PREVIOUS`` still decrypt, so the key can be rotated: set the new key,
move the old one to PREVIOUS, and the sweep re-seals every row under the new key
(``reseal_webhook_secrets``). A value without the prefix is a secret stored in plaintext by a
version before this one (or by an old process during a rolling upgrade): it is still read, and
the sweep seals it.
"""

from __future__ import annotations

import base64
import logging
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.domain.errors import SecretUnreadable
from api.domain.models import Organization
from api.domain.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "enc:v1:"


def _fernet(key: str) -> Fernet:
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"liverscan stored secrets v1"
    ).derive(key.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


@lru_cache(maxsize=8)
def _box(current: str, previous: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([_fernet(k) for k in (current, *previous)])


def box_for(settings: Settings) -> MultiFernet:
    """The keys of these settings: the current one encrypts, every one decrypts."""
    return _box(settings.secrets_key, settings.secrets_keys_previous)


def seal(settings: Settings, plaintext: str) -> str:
    """The stored form of ``plaintext`` under the current key."""
    return PREFIX + box_for(settings).encrypt(plaintext.encode()).decode()


def unseal(settings: Settings, stored: str) -> str:
    """The plaintext of a stored value (legacy plaintext passes through); SecretUnreadable if no key fits."""
    if not stored.startswith(PREFIX):
        return stored
    try:
        return box_for(settings).decrypt(stored[len(PREFIX) :].encode()).decode()
    except InvalidToken as exc:
        raise SecretUnreadable() from exc


def reseal_webhook_secrets(session: Session, settings: Settings) -> int:
    """Seal plaintext secrets and re-seal those under a previous key; returns how many changed.

    With no previous key configured no row can be under one: only plaintext rows are read, and
    sealed ones are neither decrypted (every sweep) nor reported again when no key opens them.
    """
    current = _box(settings.secrets_key, ())
    changed = 0
    rows = select(Organization)
    if not settings.secrets_keys_previous:
        rows = rows.where(~Organization.webhook_secret.startswith(PREFIX, autoescape=True))
    for org in session.scalars(rows):
        stored = org.webhook_secret
        if stored.startswith(PREFIX):
            try:
                current.decrypt(stored[len(PREFIX) :].encode())
                continue  # already under the current key
            except InvalidToken:
                pass
        try:
            org.webhook_secret = seal(settings, unseal(settings, stored))
        except SecretUnreadable:
            log.error("webhook secret of organization %s fits no configured key", org.id)
            continue
        changed += 1
    return changed
