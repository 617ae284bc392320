"""CSRF protection for the forms used before a session exists (sign-up, login).

Signed double submit: a random nonce in an HttpOnly, SameSite=Lax cookie, and in the form an
HMAC of that nonce under the app's JWT secret. A cross-site form cannot read the cookie or
forge the HMAC. Forms sent with a session are checked against the JWT's own CSRF value
(flask-jwt-extended double submit), see `api.web.auth`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from flask import Response, abort, after_this_request, current_app, g, request

COOKIE = "ls_form_csrf"
FIELD = "csrf_token"


def _sign(nonce: str) -> str:
    key = str(
        current_app.config.get("JWT_SECRET_KEY") or current_app.config.get("SECRET_KEY") or ""
    )
    return hmac.new(key.encode(), b"web-form-csrf:" + nonce.encode(), hashlib.sha256).hexdigest()


def form_token() -> str:
    """The token to put in a pre-session form's hidden field (sets the cookie if missing)."""
    if "form_csrf" in g:
        return str(g.form_csrf)
    nonce = request.cookies.get(COOKIE, "")
    if len(nonce) < 32:
        nonce = secrets.token_urlsafe(32)
        secure = bool(current_app.config.get("JWT_COOKIE_SECURE", False))

        @after_this_request
        def _set(resp: Response) -> Response:
            resp.set_cookie(COOKIE, nonce, httponly=True, samesite="Lax", secure=secure, path="/")
            return resp

    g.form_csrf = _sign(nonce)
    return str(g.form_csrf)


def check_form() -> None:
    """Refuse (403) a pre-session form post whose token does not match its cookie."""
    nonce = request.cookies.get(COOKIE, "")
    sent = request.form.get(FIELD, "")
    if len(nonce) < 32 or not sent or not hmac.compare_digest(_sign(nonce), sent):
        abort(403, description="csrf_failed")
