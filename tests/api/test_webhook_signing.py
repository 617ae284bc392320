"""Webhook signatures a receiver can verify, and the callback-URL guard."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from api.domain.errors import CallbackUrlRefused
from api.domain.webhooks import check_callback_url, sign, verify


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"event":"job.succeeded","job":{}}'
    header = sign("whsec_abc", body, t=1_700_000_000)
    expected = hmac.new(b"whsec_abc", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={expected}"
    assert verify("whsec_abc", body, header, now=1_700_000_010)


def test_tampered_stale_or_garbled_signatures_fail() -> None:
    body = b"{}"
    header = sign("s", body, t=1_700_000_000)
    assert not verify("s", b"{ }", header, now=1_700_000_000)
    assert not verify("other", body, header, now=1_700_000_000)
    assert not verify("s", body, header, now=1_700_000_000 + 3600)
    assert not verify("s", body, "v1=abc", now=1_700_000_000)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/h", "private_address"),
        ("http://[::1]/h", "private_address"),
        ("http://192.168.1.10/h", "private_address"),
        ("http://[::ffff:10.0.0.1]/h", "private_address"),
        ("http://0.0.0.0/h", "private_address"),
        ("file:///etc/passwd", "scheme"),
        ("https://user:pw@93.184.216.34/h", "credentials"),
        ("https://no-such-host.invalid/h", "unresolvable"),
    ],
)
def test_callback_guard_refuses(url: str, reason: str) -> None:
    with pytest.raises(CallbackUrlRefused) as info:
        check_callback_url(url, allow_private=False)
    assert info.value.code == "callback_url_refused"
    assert info.value.details["reason"] == reason


def test_private_callbacks_allowed_when_configured() -> None:
    assert (
        check_callback_url("http://127.0.0.1:8080/h", allow_private=True)
        == "http://127.0.0.1:8080/h"
    )
    assert (
        check_callback_url("https://93.184.216.34/h", allow_private=False)
        == "https://93.184.216.34/h"
    )
