"""HTTP hardening in one place: rate limits, security headers, CORS, and the access policies that
hold for every route (operators never see images; a deleted job answers 410 to its own org)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from flask import Flask, Response, abort, g, request
from flask_jwt_extended import get_jwt, verify_jwt_in_request
from flask_jwt_extended.exceptions import JWTExtendedException
from flask_limiter import Limiter, RateLimitExceeded
from jwt.exceptions import PyJWTError
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.wsgi import host_is_trusted

from api.domain import retention
from api.domain.errors import Forbidden, LiverscanError
from api.domain.models import Role
from api.domain.settings import Settings
from api.errors import error_response
from api.resources import close_db, db

log = logging.getLogger(__name__)

LIMITER_KEY = "liverscan_limiter"

# The pages of the web UI govern themselves by this policy (tests/web/test_csp.py): no inline
# script or style anywhere. Responses that set their own (artifacts: a sandbox) keep theirs.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

# endpoint → (Settings attribute holding the limit, methods it applies to).
RATE_LIMITED: dict[str, tuple[str, tuple[str, ...]]] = {
    "auth.login": ("rate_limit_login", ("POST",)),
    "web.login": ("rate_limit_login", ("POST",)),
    "auth.signup": ("rate_limit_signup", ("POST",)),
    "web.signup": ("rate_limit_signup", ("POST",)),
    "jobs.submit_job": ("rate_limit_submit", ("POST",)),
    "batches.submit_batch": ("rate_limit_submit", ("POST",)),
    "web.upload": ("rate_limit_submit", ("POST",)),
}

# Blueprints whose every route touches scans or results: not for operators.
IMAGE_BLUEPRINTS = frozenset({"jobs", "batches", "reports"})
IMAGE_WEB_ENDPOINTS = frozenset({"web.upload", "web.jobs", "web.job", "web.job_scan"})


class BadHost(LiverscanError):
    """The request names a host that is not one of LIVERSCAN_PUBLIC_HOSTS."""

    code, http_status, message = "bad_host", 400, "This host name is not served here."


class JobDeleted(LiverscanError):
    """The job exists in the caller's organization but its data was deleted."""

    code, http_status, message = "job_deleted", 410, "This job's data was deleted."


def _token_claims() -> dict[str, Any] | None:
    """The claims of a valid token on this request, or None (views report the exact problem)."""
    if "_liverscan_claims" not in g:
        with _own_session():
            try:
                verify_jwt_in_request(optional=True)
                claims: dict[str, Any] | None = get_jwt() or None
            except (JWTExtendedException, PyJWTError, LiverscanError):
                claims = None
        g._liverscan_claims = claims
    return g._liverscan_claims  # type: ignore[no-any-return]


@contextmanager
def _own_session() -> Iterator[None]:
    """Close the request session afterwards if this check opened it: an open SQLite
    transaction (BEGIN IMMEDIATE) would block the web pages' own unit of work."""
    opened_here = "db_session" not in g
    try:
        yield
    finally:
        if opened_here:
            close_db()


def client_address() -> str:
    """The client's address as the rate limits and the login lockout see it: the connection's peer
    (`request.remote_addr`), or behind LIVERSCAN_TRUSTED_PROXY_HOPS proxies the address the
    outermost of them put in X-Forwarded-For (init_proxy). No other header changes it."""
    return request.remote_addr or "unknown"


def init_proxy(app: Flask, settings: Settings) -> None:
    """Behind `trusted_proxy_hops` reverse proxies, take the client address from X-Forwarded-For
    (that many entries from the right: the ones the proxies appended, never a client's own) and
    the scheme from the last value of X-Forwarded-Proto, the one the nearest proxy set (a
    TLS-terminating proxy: links such as a job's status_url must say https). Proxies overwrite
    X-Forwarded-Proto rather than append to it, so asking for one value per hop would leave links
    on http behind two proxies. X-Forwarded-Host and -Port are ignored: links take the request's
    own Host header, which only LIVERSCAN_PUBLIC_HOSTS restricts (init_hosts)."""
    hops = settings.trusted_proxy_hops
    if hops:
        app.wsgi_app = ProxyFix(  # type: ignore[method-assign]
            app.wsgi_app, x_for=hops, x_proto=1, x_host=0, x_port=0, x_prefix=0
        )


def init_hosts(app: Flask, settings: Settings) -> None:
    """With LIVERSCAN_PUBLIC_HOSTS set, refuse (400 bad_host) a request whose Host header names
    another host before any view builds a link on it (url_for(_external=True) takes the request's
    Host: a status_url or upload URL on a forger's name). The same matching as Flask's
    TRUSTED_HOSTS (port not compared, a leading dot admits subdomains), but the operations routes
    (/healthz, /readyz, /metrics: no links) answer probes and scrapers that use a pod's address."""
    names = settings.public_host_names
    if not names:
        return

    @app.before_request
    def _public_host_only() -> None:
        if request.blueprint == "ops":
            return
        if not host_is_trusted(request.host.lower(), names):
            raise BadHost(details={"host": request.host})


def client_key() -> str:
    """The rate-limit key of a client: its address."""
    return client_address()


def user_or_client_key() -> str:
    """The rate-limit key of a submit: the user of a valid token, else the client address."""
    claims = _token_claims()
    if claims and claims.get("sub"):
        return "user:" + str(claims["sub"])
    return client_key()


def _retry_after(limiter: Limiter) -> int:
    current = limiter.current_limit
    if current is None:
        return 60
    return max(1, int(current.reset_at - time.time()))


def init_rate_limits(app: Flask, settings: Settings) -> Limiter:
    """Attach flask-limiter (Redis or memory storage) and limit login, signup and submit."""
    limiter = Limiter(
        key_func=client_key,
        app=app,
        storage_uri=settings.rate_limit_storage,
        enabled=settings.rate_limits_on,
        headers_enabled=False,  # Retry-After is set on the 429 itself, not on every answer
        key_prefix="liverscan",
        strategy="fixed-window",
        swallow_errors=True,  # a Redis outage must not take login down with it
    )
    for endpoint, (attribute, methods) in RATE_LIMITED.items():
        view = app.view_functions.get(endpoint)
        if view is None:
            continue
        key_func = user_or_client_key if attribute == "rate_limit_submit" else client_key
        limited = limiter.limit(
            getattr(settings, attribute), key_func=key_func, methods=list(methods)
        )(view)
        app.view_functions[endpoint] = cast(Callable[..., Any], limited)

    @app.errorhandler(RateLimitExceeded)
    def _too_many(exc: RateLimitExceeded) -> tuple[Response, int]:
        retry_after = _retry_after(limiter)
        log.warning("rate limited %s on %s", client_address(), request.endpoint)
        if request.blueprints and request.blueprints[0] == "web":
            response = Response(
                f"Too many attempts. Try again in {retry_after} seconds.\n",
                status=429,
                mimetype="text/plain",
            )
            response.headers["Retry-After"] = str(retry_after)
            return response, 429
        response, status = error_response(
            "rate_limited",
            "Too many requests; slow down.",
            429,
            {"limit": str(exc.description), "retry_after_s": retry_after},
        )
        response.headers["Retry-After"] = str(retry_after)
        return response, status

    app.extensions[LIMITER_KEY] = limiter
    return limiter


def init_headers(app: Flask, settings: Settings) -> None:
    """Security headers on every response, and CORS only for configured origins."""
    allowed = set(settings.cors_origins)

    @app.after_request
    def _headers(response: Response) -> Response:
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("Content-Security-Policy", CSP)
        headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
        headers.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
        if settings.hsts_on:
            headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
        origin = request.headers.get("Origin")
        if origin and origin in allowed:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Idempotency-Key"
            headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE"
            headers.add("Vary", "Origin")
        return response


def _touches_images(endpoint: str) -> bool:
    return endpoint.split(".", 1)[0] in IMAGE_BLUEPRINTS or endpoint in IMAGE_WEB_ENDPOINTS


def init_policies(app: Flask) -> None:
    """Route-independent access rules checked before any view runs."""

    @app.before_request
    def _policies() -> None:
        endpoint = request.endpoint or ""
        if not _touches_images(endpoint):
            return
        claims = _token_claims()
        if claims is None:
            return  # the view answers 401 (API) or redirects to login (web)
        if claims.get("role") == Role.OPERATOR.value:
            if endpoint.startswith("web."):
                abort(403)
            raise Forbidden(
                "Operators see metrics and run the sweep; they never see scans or results.",
                details={"required": [Role.CLINICIAN.value, Role.ADMIN.value]},
            )
        raw_id = (request.view_args or {}).get("job_id")
        if raw_id is None or request.method == "DELETE":
            return
        try:
            job_id = uuid.UUID(str(raw_id))
        except ValueError:
            return
        with _own_session():
            mark = retention.get_deletion(db(), job_id)
        if mark is not None and str(mark.org_id) == claims.get("org"):
            raise JobDeleted(details={"id": str(job_id), "deleted_at": mark.deleted_at.isoformat()})


def init_security(app: Flask, settings: Settings) -> None:
    """Everything above, in the order the app factory needs (after the blueprints)."""
    init_proxy(app, settings)
    init_hosts(app, settings)
    init_headers(app, settings)
    init_rate_limits(app, settings)
    init_policies(app)
