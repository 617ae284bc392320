"""Authentication: JWT setup (headers for the API, HttpOnly cookies with CSRF for the web UI),
the auth blueprint, and the `current_user()` helper every view uses for org scoping."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Blueprint, Flask, Response, g, jsonify, request
from flask_jwt_extended import (
    JWTManager,
    create_access_token,
    create_refresh_token,
    decode_token,
    get_jwt,
    get_jwt_identity,
    jwt_required,
    verify_jwt_in_request,
)
from flask_jwt_extended.exceptions import JWTExtendedException
from jwt.exceptions import PyJWTError

from api.domain import accounts, audit
from api.domain.errors import Forbidden, InvalidCredentials, LiverscanError
from api.domain.models import Role, User
from api.errors import error_response
from api.requests import json_body, required_str
from api.resources import db, resources
from api.security import client_address

bp = Blueprint("auth", __name__, url_prefix="/api/v1/auth")


class Unauthenticated(LiverscanError):
    """No usable credentials (the user behind a valid token no longer exists)."""

    code, http_status, message = "unauthorized", 401, "Authentication required."


def configure_jwt(app: Flask) -> JWTManager:
    """Set up flask-jwt-extended with the envelope for every error it can raise."""
    settings = app.extensions["liverscan"].settings
    app.config.update(
        JWT_SECRET_KEY=settings.jwt_secret_key,
        JWT_ALGORITHM="HS256",
        JWT_DECODE_ALGORITHMS=["HS256"],  # pinned: no "none", no algorithm confusion
        JWT_TOKEN_LOCATION=["headers", "cookies"],
        JWT_ACCESS_TOKEN_EXPIRES=timedelta(minutes=settings.access_token_minutes),
        JWT_REFRESH_TOKEN_EXPIRES=timedelta(days=settings.refresh_token_days),
        JWT_COOKIE_SECURE=settings.jwt_cookie_secure,
        JWT_COOKIE_SAMESITE="Lax",
        JWT_COOKIE_CSRF_PROTECT=True,
        JWT_CSRF_CHECK_FORM=True,  # server-rendered forms send the CSRF token as a field
        JWT_SESSION_COOKIE=False,
    )
    jwt = JWTManager(app)

    @jwt.token_in_blocklist_loader
    def _is_revoked(_header: dict[str, Any], payload: dict[str, Any]) -> bool:
        return accounts.is_token_revoked(db(), payload["jti"])

    @jwt.unauthorized_loader
    def _missing(reason: str) -> tuple[Response, int]:
        if "CSRF" in reason:
            return error_response("csrf_failed", reason, 401)
        return error_response("missing_token", "Authentication required: " + reason, 401)

    @jwt.invalid_token_loader
    def _invalid(reason: str) -> tuple[Response, int]:
        return error_response("invalid_token", "The token is invalid: " + reason, 401)

    @jwt.expired_token_loader
    def _expired(_h: dict[str, Any], _p: dict[str, Any]) -> tuple[Response, int]:
        return error_response("token_expired", "The token has expired.", 401)

    @jwt.revoked_token_loader
    def _revoked(_h: dict[str, Any], _p: dict[str, Any]) -> tuple[Response, int]:
        return error_response("token_revoked", "The token has been revoked.", 401)

    @jwt.needs_fresh_token_loader
    def _not_fresh(_h: dict[str, Any], _p: dict[str, Any]) -> tuple[Response, int]:
        return error_response("fresh_token_required", "Please log in again.", 401)

    @jwt.user_lookup_error_loader
    def _no_user(_h: dict[str, Any], _p: dict[str, Any]) -> tuple[Response, int]:
        return error_response("unauthorized", "The account no longer exists.", 401)

    @jwt.user_lookup_loader
    def _lookup(_h: dict[str, Any], payload: dict[str, Any]) -> User | None:
        try:
            return accounts.get_user(db(), uuid.UUID(payload["sub"]))
        except (KeyError, ValueError):
            return None

    # Some PyJWT errors surface outside the loaders (e.g. a malformed cookie); keep the envelope.
    app.register_error_handler(
        PyJWTError, lambda e: error_response("invalid_token", "The token is invalid.", 401)
    )
    app.register_error_handler(
        JWTExtendedException,
        lambda e: error_response("invalid_token", str(e) or "The token is invalid.", 401),
    )
    return jwt


def current_user() -> User:
    """The authenticated user of this request (call after `jwt_required`)."""
    user = g.get("_liverscan_user")
    if user is None:
        from flask_jwt_extended import current_user as jwt_user

        user = jwt_user
        if user is None:
            raise Unauthenticated()
        g._liverscan_user = user
    return user  # type: ignore[no-any-return]


def optional_user() -> User | None:
    """The authenticated user if the request carries a valid token, else None (web pages)."""
    try:
        verify_jwt_in_request(optional=True)
    except (JWTExtendedException, PyJWTError):
        return None
    if get_jwt_identity() is None:
        return None
    return current_user()


def require_role(*roles: Role) -> User:
    """The current user if their role is one of `roles`, else Forbidden."""
    user = current_user()
    if user.role not in roles:
        raise Forbidden(details={"required": [r.value for r in roles]})
    return user


def issue_tokens(user: User) -> dict[str, Any]:
    """A fresh access/refresh token pair for this user, as returned by login."""
    claims = {"org": str(user.org_id), "role": user.role.value}
    settings = resources().settings
    return {
        "access_token": create_access_token(
            identity=str(user.id), additional_claims=claims, fresh=True
        ),
        "refresh_token": create_refresh_token(identity=str(user.id), additional_claims=claims),
        "token_type": "Bearer",
        "expires_in": settings.access_token_minutes * 60,
    }


def user_json(user: User) -> dict[str, Any]:
    """The public view of a user."""
    return {
        "id": str(user.id),
        "email": user.email,
        "name": user.name,
        "role": user.role.value,
        "organization": {"id": str(user.org_id), "name": user.organization.name},
        "created_at": user.created_at.isoformat(),
    }


def _revoke(payload: dict[str, Any]) -> None:
    accounts.revoke_token(
        db(),
        jti=payload["jti"],
        token_type=payload.get("type", "access"),
        user_id=uuid.UUID(payload["sub"]),
        expires_at=datetime.fromtimestamp(payload["exp"], UTC),
    )


@bp.post("/signup")
def signup() -> tuple[Response, int]:
    """Create an organization and its first (admin) user."""
    data = json_body()
    res = resources()
    user = accounts.signup(
        db(),
        accounts.make_hasher(res.settings),
        settings=res.settings,
        email=required_str(data, "email", max_length=320),
        password=required_str(data, "password", max_length=1000),
        name=required_str(data, "name", max_length=200),
        organization=required_str(data, "organization", max_length=200),
    )
    db().commit()
    return jsonify({"user": user_json(user)}), 201


@bp.post("/login")
def login() -> tuple[Response, int]:
    """Exchange email and password for an access and a refresh token."""
    data = json_body()
    email = required_str(data, "email", max_length=320)
    password = required_str(data, "password", max_length=1000)
    user = authenticate_counted(email, password)
    db().commit()
    return jsonify(issue_tokens(user)), 200


def authenticate_counted(email: str, password: str) -> User:
    """accounts.authenticate on the request's session from the client's address (the one the rate
    limits use), with every failure counted toward the lockout and audited. The API and the web
    login both sign in through here, so one lockout covers both doors. The success is left for
    the caller to commit."""
    session, settings, address = db(), resources().settings, client_address()
    try:
        return accounts.authenticate(
            session,
            accounts.make_hasher(settings),
            settings=settings,
            email=email,
            password=password,
            address=address,
        )
    except accounts.AccountLocked:
        session.rollback()
        audit.record(session, "login.locked", org_id=None, user_id=None, detail=_who(email))
        session.commit()
        raise
    except InvalidCredentials:
        # The failure must outlive the request's rollback, or the lockout would never trigger.
        session.rollback()
        counter = accounts.record_failed_login(session, settings, email, address)
        detail = {
            **_who(email),
            "failures": counter.failures,
            "familiar_address": isinstance(counter, accounts.LoginAddress),
        }
        audit.record(session, "login.failed", org_id=None, user_id=None, detail=detail)
        session.commit()
        raise


def _who(email: str) -> dict[str, Any]:
    return {"email": email.strip().lower()[:320], "ip": client_address()}


@bp.post("/refresh")
@jwt_required(refresh=True)
def refresh() -> tuple[Response, int]:
    """A new access token for a valid refresh token."""
    user = current_user()
    claims = {"org": str(user.org_id), "role": user.role.value}
    token = create_access_token(identity=str(user.id), additional_claims=claims, fresh=False)
    return jsonify(
        {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": resources().settings.access_token_minutes * 60,
        }
    ), 200


@bp.post("/logout")
@jwt_required(verify_type=False)
def logout() -> tuple[Response, int]:
    """Revoke the presented token, and the refresh token given in the body if any."""
    _revoke(get_jwt())
    data = json_body() if request.is_json else {}
    refresh_token = data.get("refresh_token")
    if isinstance(refresh_token, str) and refresh_token:
        try:
            payload = decode_token(refresh_token, allow_expired=True)
        except (JWTExtendedException, PyJWTError):
            payload = None
        # Only the caller's own tokens can be revoked this way.
        if payload is not None and payload.get("sub") == get_jwt_identity():
            _revoke(payload)
    db().commit()
    return jsonify({"revoked": True}), 200
