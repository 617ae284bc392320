"""Webhook signatures and callback-URL checks (delivery itself lives in the worker)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3

from api.domain.errors import CallbackUrlRefused

SIGNATURE_HEADER = "X-Liverscan-Signature"
EVENT_HEADER = "X-Liverscan-Event"
DELIVERY_HEADER = "X-Liverscan-Delivery"
DEFAULT_TOLERANCE_S = 300
CA_BUNDLE = certifi.where()  # the CA certificates requests uses too


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


@dataclass(frozen=True)
class CallbackTarget:
    """A callback URL resolved once and checked: where to connect, and what to call the host."""

    scheme: str  # "http" | "https"
    host: str  # the URL's host name: Host header, TLS SNI and certificate check
    port: int
    path: str  # path and query, as sent in the request line
    address: str  # the checked IP address the connection goes to (never looked up again)

    @property
    def host_header(self) -> str:
        """The Host header: the URL's host (bracketed if IPv6) and its port unless the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def resolve_callback(url: str, allow_private: bool) -> CallbackTarget:
    """Resolve a callback URL once; CallbackUrlRefused unless it is http(s), carries no
    credentials, and every address it resolves to is public (or `allow_private`)."""
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
    ordered = list(dict.fromkeys(str(info[4][0]) for info in infos))  # resolver order, no dupes
    if not ordered:
        raise CallbackUrlRefused(
            "The callback host does not resolve.", details={"reason": "unresolvable"}
        )
    if not allow_private:
        blocked = sorted(a for a in ordered if not _is_public(a))
        if blocked:
            raise CallbackUrlRefused(
                "The callback URL resolves to a private, loopback or link-local address.",
                details={"reason": "private_address", "addresses": blocked},
            )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return CallbackTarget(parts.scheme, parts.hostname, port, path, ordered[0])


def check_callback_url(url: str, allow_private: bool) -> str:
    """Return `url` if it is an http(s) URL resolving only to public addresses, else CallbackUrlRefused."""
    resolve_callback(url, allow_private)
    return url


def post_pinned(
    target: CallbackTarget, body: bytes, headers: dict[str, str], timeout_s: float
) -> int:
    """POST `body` to the target's checked address and return the status code. No second DNS
    lookup, so a name that rebinds to an internal address after the check cannot redirect the
    request; the URL's host still goes in Host and, over TLS, in SNI and the certificate check.
    Redirects are not followed. Raises urllib3's HTTPError on connection problems and timeouts."""
    options: dict[str, Any] = {
        "timeout": urllib3.Timeout(connect=timeout_s, read=timeout_s),
        "retries": False,
        "maxsize": 1,
    }
    pool: urllib3.HTTPConnectionPool
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            target.address,
            target.port,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=CA_BUNDLE,
            **options,
        )
    else:
        pool = urllib3.HTTPConnectionPool(target.address, target.port, **options)
    with pool:
        response = pool.urlopen(
            "POST",
            target.path,
            body=body,
            headers={**headers, "Host": target.host_header},
            redirect=False,
            assert_same_host=False,
        )
        return int(response.status)
