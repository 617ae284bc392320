"""Webhook signatures and callback-URL checks (delivery itself lives in the worker)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from urllib.parse import urlsplit

from api.domain.errors import CallbackUrlRefused

SIGNATURE_HEADER = "X-Liverscan-Signature"
EVENT_HEADER = "X-Liverscan-Event"
DELIVERY_HEADER = "X-Liverscan-Delivery"
DEFAULT_TOLERANCE_S = 300


def new_secret() -> str:
    """A fresh organization webhook secret."""
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    """The `X-Liverscan-Signature` value: `t=<unix s>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    t = int(time.time()) if t is None else int(t)
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: int | None = None,
) -> bool:
    """Whether `header` is a valid, fresh signature of `body` under `secret`."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        t = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        return False
    now = int(time.time()) if now is None else now
    if abs(now - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1]
    return hmac.compare_digest(expected, given)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def check_callback_url(url: str, allow_private: bool) -> str:
    """Return `url` if it is an http(s) URL resolving only to public addresses, else CallbackUrlRefused."""
    if len(url) > 2048:
        raise CallbackUrlRefused("The callback URL is too long.", details={"reason": "too_long"})
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise CallbackUrlRefused(
            "The callback URL must be an http or https URL.", details={"reason": "scheme"}
        )
    if parts.username or parts.password:
        raise CallbackUrlRefused(
            "The callback URL must not carry credentials.", details={"reason": "credentials"}
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise CallbackUrlRefused(
            "The callback host does not resolve.", details={"reason": "unresolvable"}
        ) from exc
    addresses = sorted({str(info[4][0]) for info in infos})
    if not allow_private:
        blocked = [a for a in addresses if not _is_public(a)]
        if blocked:
            raise CallbackUrlRefused(
                "The callback URL resolves to a private, loopback or link-local address.",
                details={"reason": "private_address", "addresses": blocked},
            )
    return url
