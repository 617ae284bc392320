"""The web pages' only doorway into the app: resources, account and job services, serialisation."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flask_jwt_extended import create_access_token, create_refresh_token, decode_token
from sqlalchemy.orm import Session

from api import schemas
from api.domain import accounts, intake
from api.domain.errors import LiverscanError
from api.domain.models import Job, User
from api.domain.settings import Settings
from api.domain.storage import job_key
from api.resources import db, resources
from api.web.model_card import DEFAULT_MODELS_DIR

log = logging.getLogger(__name__)

PAGE_SIZE = 25
WEB_SESSION = timedelta(hours=12)
PASSWORD_HINT = "At least 10 characters, with letters and digits."
PREVIEW_NAMES = ("slice.png", "preview.png", "input.png")


def settings() -> Settings:
    """The app's settings."""
    return resources().settings


@contextmanager
def unit_of_work() -> Iterator[Session]:
    """The request's session: commits on success, rolls back on error (the page owns the transaction).

    One session per request: the JWT loaders already read through it, and a second connection
    would wait behind the first one's SQLite write lock (BEGIN IMMEDIATE) until it times out.
    """
    session = db()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise


def _hasher() -> Any:
    return accounts.make_hasher(settings())


def signup(session: Session, *, email: str, password: str, name: str, organization: str) -> User:
    """Create an organization and its first (admin) user."""
    return accounts.signup(
        session,
        _hasher(),
        settings=settings(),
        email=email,
        password=password,
        name=name,
        organization=organization,
    )


def authenticate(session: Session, *, email: str, password: str) -> User:
    """The user with these credentials, else InvalidCredentials (AccountLocked while locked out).

    Failures count toward the same lockout as the API login's (`api.auth.authenticate_counted`
    commits them on the request's session, which is `session`), so the web form is no side door
    for guessing passwords."""
    from api import auth as api_auth  # the API's login, so both doors share one lockout

    return api_auth.authenticate_counted(email, password)


def load_user(session: Session, identity: Any) -> User | None:
    """The user a JWT identity names, or None."""
    try:
        return accounts.get_user(session, uuid.UUID(str(identity)))
    except ValueError:
        return None


def issue_tokens(session: Session, user: User) -> tuple[str, str]:
    """An access token (as the JSON API issues) and a refresh token capped at one web session."""
    from api import auth as api_auth  # the API's token issuing, so both accept each other

    pair = api_auth.issue_tokens(user)
    claims = {"org": str(user.org_id), "role": user.role.value}
    # A browser session ends after WEB_SESSION_HOURS however active it is (a clinical shift).
    refresh = create_refresh_token(
        identity=str(user.id), additional_claims=claims, expires_delta=WEB_SESSION
    )
    return str(pair["access_token"]), refresh


def renew_access(session: Session, refresh_token: str) -> tuple[User, str] | None:
    """A new access token from a valid, unrevoked refresh cookie; None when it cannot be renewed."""
    try:
        claims = decode_token(refresh_token)
    except Exception:  # expired, tampered or from another key: the session is over
        return None
    if claims.get("type") != "refresh" or accounts.is_token_revoked(session, str(claims["jti"])):
        return None
    user = load_user(session, claims.get("sub"))
    if user is None:
        return None
    extra = {"org": str(user.org_id), "role": user.role.value}
    return user, create_access_token(identity=str(user.id), additional_claims=extra, fresh=False)


def revoke(session: Session, claims: dict[str, Any] | None, refresh_token: str | None) -> None:
    """Revoke the session's access token and its refresh token (whichever are given)."""
    todo = [claims] if claims else []
    if refresh_token:
        try:
            todo.append(decode_token(refresh_token))
        except Exception:  # an expired or foreign refresh cookie needs no revocation
            log.info("refresh cookie not revocable (already invalid)")
    for c in todo:
        accounts.revoke_token(
            session,
            jti=str(c["jti"]),
            token_type=str(c.get("type", "access")),
            user_id=uuid.UUID(str(c["sub"])) if c.get("sub") else None,
            expires_at=datetime.fromtimestamp(int(c["exp"]), UTC),
        )


def job_json(job: Job) -> dict[str, Any]:
    """The job as the JSON API shows it (same fields, same artifact URLs)."""
    res = resources()
    return schemas.job_read(job, res.storage, expires_s=res.settings.presign_expires_s)


def api_jobs_url() -> str:
    """Where the upload script posts files."""
    return "/api/v1/jobs"


def api_job_url(job_id: str) -> str:
    """Where the job page's script polls."""
    return f"/api/v1/jobs/{job_id}"


def submit(*, data: bytes, filename: str, content_type: str | None) -> dict[str, Any]:
    """Submit one file as a job for the signed-in user's organization (the no-JavaScript path)."""
    from api.web.auth import current_user

    user = current_user()
    assert user is not None
    res = resources()
    session = res.session_factory()
    try:
        sub = intake.submit(
            session,
            settings=res.settings,
            storage=res.storage,
            queue=res.queue,
            org_id=user.org_id,
            user_id=user.id,
            upload=intake.Upload(data=data, filename=filename, content_type=content_type),
        )
        return {"id": str(sub.job.id), "status": sub.job.status.value}
    finally:
        session.close()


def upload_error_text(exc: LiverscanError, filename: str, max_mb: int) -> str:
    """A sentence for the file field explaining why an upload was refused."""
    if exc.code == "payload_too_large":
        return f"File too large: {filename} is over the {max_mb} MB limit."
    if exc.code == "missing_file":
        return f"{filename} is empty."
    return f"{filename}: {exc.message}"


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def has_scan_preview(job: Job) -> bool:
    """Whether the browser can be shown the scan (PNG/JPEG upload, or a stored preview)."""
    if job.input_format in ("png", "jpeg"):
        return True
    hint = f"{job.input_content_type or ''} {job.input_filename or ''}".lower()
    if job.input_format is None and any(t in hint for t in ("png", "jpeg", "jpg")):
        return True
    return job.input_format is not None and any(
        resources().storage.exists(job_key(job.org_id, job.id, n)) for n in PREVIEW_NAMES
    )


def scan_preview(job: Job) -> tuple[bytes, str] | None:
    """The scan's bytes and image type, by magic bytes only (never the client's content type)."""
    storage = resources().storage
    for name in PREVIEW_NAMES:
        key = job_key(job.org_id, job.id, name)
        if storage.exists(key):
            data = storage.get(key)
            break
    else:
        data = storage.get(job.input_key)
    for magic, mimetype in _MAGIC:
        if data.startswith(magic):
            return data, mimetype
    return None


def models_dir() -> Path:
    """The configured model folder, else the folder of shipped models."""
    path = settings().model_path
    return Path(path) if path is not None else DEFAULT_MODELS_DIR
