"""Browser sessions: the JWT in HttpOnly cookies, checked per request, CSRF on every post.

The access token is short-lived; on a page view (GET) an expired one is renewed silently from
the refresh cookie, which itself ends the browser session after `backend.WEB_SESSION`. Logout
revokes both tokens, so neither cookie works again even if it was copied.
"""

from __future__ import annotations

import functools
import hmac
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from flask import (
    Response,
    abort,
    after_this_request,
    current_app,
    g,
    make_response,
    redirect,
    request,
    url_for,
)
from flask_jwt_extended import (
    decode_token,
    get_jwt,
    get_jwt_identity,
    set_access_cookies,
    unset_jwt_cookies,
    verify_jwt_in_request,
)
from flask_jwt_extended.exceptions import CSRFError, JWTExtendedException, RevokedTokenError
from jwt import ExpiredSignatureError, InvalidTokenError

from api.domain.models import User
from api.web import backend

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class WebUser:
    """The signed-in person as the pages need them."""

    id: uuid.UUID
    email: str
    name: str
    org_id: uuid.UUID
    org_name: str


def _web_user(user: User) -> WebUser:
    return WebUser(
        id=user.id,
        email=user.email,
        name=user.name,
        org_id=user.org_id,
        org_name=user.organization.name,
    )


def _renew() -> WebUser | None:
    """Renew an expired access cookie from the refresh cookie (page views only)."""
    refresh = request.cookies.get(
        current_app.config.get("JWT_REFRESH_COOKIE_NAME", "refresh_token_cookie")
    )
    if request.method != "GET" or not refresh:
        return None
    with backend.unit_of_work() as session:
        renewed = backend.renew_access(session, refresh)
        if renewed is None:
            return None
        user, token = renewed
        found = _web_user(user)
    g.jwt_csrf = decode_token(token).get("csrf", "")
    g.jwt_claims = decode_token(token)

    @after_this_request
    def _set(resp: Response) -> Response:
        set_access_cookies(resp, token)
        return resp

    return found


def _resolve() -> WebUser | str | None:
    """The session's user, or a problem code ('expired', 'revoked', 'csrf', 'login_required')."""
    problem: str | None = None
    try:
        # On posts this also checks the CSRF double submit (header, or the form field:
        # JWT_CSRF_CHECK_FORM is on); `login_required` checks it again explicitly.
        verify_jwt_in_request(locations=["cookies"], optional=True)
    except ExpiredSignatureError:
        problem = "expired"
    except RevokedTokenError:
        return "revoked"
    except CSRFError:
        return "csrf"
    except (JWTExtendedException, InvalidTokenError) as exc:
        log.info("web session refused: %s", type(exc).__name__)
        problem = "login_required"
    else:
        identity = get_jwt_identity()
        if identity is not None:
            with backend.unit_of_work() as session:
                user = backend.load_user(session, identity)
                if user is None:
                    return "login_required"
                g.jwt_csrf = get_jwt().get("csrf", "")
                g.jwt_claims = get_jwt()
                return _web_user(user)
    renewed = _renew()
    if renewed is not None:
        return renewed
    return problem


def current_user() -> WebUser | None:
    """The signed-in user of this request, or None (resolved once per request)."""
    if "web_user" not in g:
        found = _resolve()
        g.web_user = found if isinstance(found, WebUser) else None
        g.web_session_problem = found if isinstance(found, str) else None
    return cast(WebUser | None, g.web_user)


def session_claims() -> dict[str, Any]:
    """The claims of the access token this request is signed in with."""
    return cast(dict[str, Any], g.get("jwt_claims") or {})


def csrf_ok() -> bool:
    """Whether this post carries the session's CSRF value (form field or header)."""
    expected = str(g.get("jwt_csrf", ""))
    header = current_app.config.get("JWT_ACCESS_CSRF_HEADER_NAME", "X-CSRF-TOKEN")
    sent = request.form.get("csrf_token") or request.headers.get(header, "")
    return bool(expected) and bool(sent) and hmac.compare_digest(expected, sent)


def login_required(view: F) -> F:
    """Send anonymous or expired sessions to the login page; refuse posts without the CSRF token."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user = current_user()
        problem = g.get("web_session_problem")
        if user is None and problem == "csrf":
            abort(403, description="csrf_failed")
        if user is None:
            nxt = request.full_path.rstrip("?") if request.method == "GET" else None
            resp = make_response(
                redirect(url_for("web.login", m=problem or "login_required", next=nxt))
            )
            if problem in ("expired", "revoked"):
                unset_jwt_cookies(resp)
            return resp
        if request.method in UNSAFE and not csrf_ok():
            abort(403, description="csrf_failed")
        return view(*args, **kwargs)

    return cast(F, wrapper)
