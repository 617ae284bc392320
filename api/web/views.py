"""Server-rendered pages: routing, form parsing, one service call, a template."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Response,
    abort,
    current_app,
    g,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_jwt_extended import set_access_cookies, set_refresh_cookies, unset_jwt_cookies

from api.domain import jobs as job_service
from api.domain.accounts import AccountLocked
from api.domain.errors import (
    EmailTaken,
    InvalidCredentials,
    InvalidInput,
    JobNotFound,
    LiverscanError,
    WeakPassword,
)
from api.domain.models import TERMINAL_STATUSES, JobStatus
from api.web import backend, csrf
from api.web.auth import csrf_ok, current_user, login_required, session_claims
from api.web.charts import bar_svg, reliability_svg, roc_svg
from api.web.model_card import load_card
from api.web.stats import live_figures

from . import bp

log = logging.getLogger(__name__)

NOTICES: dict[str, tuple[str, str]] = {
    "logged_out": ("info", "You have been logged out."),
    "expired": ("error", "Your session has expired. Please log in again."),
    "login_required": ("info", "Please log in to continue."),
    "welcome": ("info", "Your account is ready. Log in to start."),
    "revoked": ("error", "This session was ended. Please log in again."),
}


@dataclass(frozen=True)
class CamLayer:
    """The image over the scan on the job page, with its opacity slider's name and start value."""

    url: str
    name: str
    opacity: int
    alt: str


@dataclass(frozen=True)
class Notice:
    """A one-line message shown at the top of a page."""

    kind: str
    text: str


def _notice() -> Notice | None:
    code = request.args.get("m", "")
    if code in NOTICES:
        kind, text = NOTICES[code]
        return Notice(kind, text)
    return None


def page(template: str, status: int = 200, **context: Any) -> Response:
    """Render a page with the common context (user, CSRF token, notice)."""
    user = current_user()
    context.setdefault("notice", _notice())
    context.setdefault("current_user", user)
    context.setdefault("csrf_token", g.get("jwt_csrf", ""))
    context.setdefault("form_csrf", csrf.form_token())
    return make_response(render_template(template, **context), status)


def _redirect(location: str) -> Response:
    """A 302 as a Flask response (so cookies can be set on it)."""
    return make_response(redirect(location))


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths are followed after login (no open redirect)."""
    if not target:
        return url_for("web.jobs")
    parts = urlsplit(target)
    # Browsers read "/\host" as "//host": backslashes and control characters are refused too.
    unsafe = "\\" in target or any(ord(c) < 32 for c in target)
    if (
        parts.scheme
        or parts.netloc
        or unsafe
        or not target.startswith("/")
        or target.startswith("//")
    ):
        return url_for("web.jobs")
    return target


@bp.get("/")
def home() -> Response:
    """The home page: what liverscan does and does not do."""
    return page("web/home.html", active="home")


@bp.route("/signup", methods=["GET", "POST"])
def signup() -> Response:
    """Create an organization's account (the first user becomes its admin)."""
    form: dict[str, str] = {}
    errors: dict[str, str] = {}
    status = 200
    if request.method == "POST":
        csrf.check_form()
        form = {k: request.form.get(k, "").strip() for k in ("name", "email", "organization")}
        password = request.form.get("password", "")
        for key, label in (
            ("name", "Your name"),
            ("email", "Email"),
            ("organization", "Organization"),
        ):
            if not form[key]:
                errors[key] = f"{label} is required."
        if form["email"] and "@" not in form["email"]:
            errors["email"] = "Enter a valid email address, like name@clinic.org."
        if not password:
            errors["password"] = "Choose a password."
        if not errors:
            try:
                with backend.unit_of_work() as session:
                    backend.signup(
                        session,
                        email=form["email"],
                        password=password,
                        name=form["name"],
                        organization=form["organization"],
                    )
            except EmailTaken:
                errors["email"] = "An account with this email already exists. Log in instead."
            except WeakPassword as exc:
                errors["password"] = exc.message
            except InvalidInput as exc:
                field = str(exc.details.get("field", "form")) if exc.details else "form"
                errors[
                    field if field in ("name", "email", "organization", "password") else "form"
                ] = exc.message
            else:
                log.info("web signup for a new user")
                return _redirect(url_for("web.login", m="welcome", email=form["email"]))
        status = 409 if "already exists" in errors.get("email", "") else 422
    return page(
        "web/signup.html",
        status=status,
        form=form,
        errors=errors,
        active="signup",
        password_hint=backend.PASSWORD_HINT,
    )


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response:
    """Sign in with email and password; the session lives in HttpOnly cookies."""
    form = {"email": request.args.get("email", "")}
    errors: dict[str, str] = {}
    next_url = request.values.get("next", "")
    if request.method == "POST":
        csrf.check_form()
        form = {"email": request.form.get("email", "").strip()}
        password = request.form.get("password", "")
        if not form["email"]:
            errors["email"] = "Enter your email."
        if not password:
            errors["password"] = "Enter your password."
        if not errors:
            try:
                with backend.unit_of_work() as session:
                    user = backend.authenticate(session, email=form["email"], password=password)
                    access, refresh = backend.issue_tokens(session, user)
            except AccountLocked as exc:
                minutes = max(1, round(int(exc.details.get("retry_after_s", 60)) / 60))
                errors["password"] = f"Too many failed sign-ins. Try again in {minutes} minute" + (
                    "s." if minutes > 1 else "."
                )
                response = page(
                    "web/login.html",
                    status=423,
                    form=form,
                    errors=errors,
                    next_url=next_url,
                    active="login",
                )
                response.headers["Retry-After"] = str(exc.details.get("retry_after_s", 60))
                return response
            except InvalidCredentials:
                errors["password"] = "Email or password is wrong."
            else:
                resp = _redirect(_safe_next(next_url))
                set_access_cookies(resp, access)
                set_refresh_cookies(resp, refresh)
                return resp
        return page(
            "web/login.html",
            status=401
            if "password" in errors and len(errors) == 1 and request.form.get("password")
            else 422,
            form=form,
            errors=errors,
            next_url=next_url,
            active="login",
        )
    return page("web/login.html", form=form, errors=errors, next_url=next_url, active="login")


@bp.post("/logout")
def logout() -> Response:
    """End the session: revoke the tokens and clear the cookies."""
    user = current_user()
    if g.get("web_session_problem") == "csrf" or (user is not None and not csrf_ok()):
        abort(403, description="csrf_failed")
    # With an expired access token there is no CSRF value to check; revoking the refresh
    # token and clearing cookies is all a forged logout could do, which is harmless.
    refresh = request.cookies.get(current_app.config["JWT_REFRESH_COOKIE_NAME"])
    with backend.unit_of_work() as session:
        backend.revoke(session, session_claims() if user is not None else None, refresh)
    resp = _redirect(url_for("web.home", m="logged_out"))
    unset_jwt_cookies(resp)
    return resp


@bp.route("/upload", methods=["GET", "POST"])
@login_required
def upload() -> Response:
    """Pick or drop files; the page's script sends each to the job API with progress."""
    settings = backend.settings()
    errors: dict[str, str] = {}
    created: list[dict[str, str]] = []
    status = 200
    if request.method == "POST":
        # Without JavaScript the form posts here: the same checks and service as the API.
        files = [f for f in request.files.getlist("file") if f and f.filename]
        if not files:
            errors["file"] = "Choose at least one file."
            status = 422
        for f in files:
            data = f.read()
            try:
                job = backend.submit(
                    data=data, filename=f.filename or "upload", content_type=f.mimetype
                )
            except LiverscanError as exc:
                errors["file"] = backend.upload_error_text(
                    exc, f.filename or "", settings.max_upload_mb
                )
                status = exc.http_status
                break
            created.append({"id": str(job["id"]), "filename": f.filename or ""})
        if created and not errors:
            status = 202
    return page(
        "web/upload.html",
        status=status,
        errors=errors,
        created=created,
        active="upload",
        max_upload_mb=settings.max_upload_mb,
        max_upload_bytes=settings.max_upload_bytes,
        api_jobs_url=backend.api_jobs_url(),
        csrf_cookie_name=current_app.config.get("JWT_ACCESS_CSRF_COOKIE_NAME", "csrf_access_token"),
        csrf_header_name=current_app.config.get("JWT_ACCESS_CSRF_HEADER_NAME", "X-CSRF-TOKEN"),
    )


@bp.get("/jobs")
@login_required
def jobs() -> Response:
    """The organization's jobs, newest first, filtered by status, one page at a time."""
    user = current_user()
    assert user is not None
    raw_status = request.args.get("status", "") or None
    cursor = request.args.get("cursor") or None
    status = None
    if raw_status:
        try:
            status = JobStatus(raw_status)
        except ValueError:
            raw_status, status = None, None
    try:
        with backend.unit_of_work() as session:
            rows, next_cursor = job_service.list_for_org(
                session, user.org_id, status=status, limit=backend.PAGE_SIZE, cursor=cursor
            )
            items = [backend.job_json(j) for j in rows]
    except LiverscanError as exc:
        if exc.code != "bad_request":
            raise
        return _redirect(url_for("web.jobs", status=raw_status))
    return page(
        "web/jobs.html",
        items=items,
        next_cursor=next_cursor,
        cursor=cursor,
        status_filter=raw_status,
        statuses=[s.value for s in JobStatus],
        active="jobs",
    )


def _parse_id(job_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        abort(404)


@bp.get("/jobs/<job_id>")
@login_required
def job(job_id: str) -> Response:
    """One job: scan, Grad-CAM overlay, result, every validation check, timestamps."""
    user = current_user()
    assert user is not None
    jid = _parse_id(job_id)
    try:
        with backend.unit_of_work() as session:
            row = job_service.get_or_raise(session, jid, org_id=user.org_id)
            data = backend.job_json(row)
            terminal = row.status in TERMINAL_STATUSES
            scan = backend.has_scan_preview(row)
    except JobNotFound:
        abort(404)
    scan_url = url_for("web.job_scan", job_id=str(jid)) if scan else None
    result = data.get("result") or {}
    layer: CamLayer | None = None
    base_url = scan_url
    if scan_url and result.get("overlay_url"):
        # The stored overlay already weights the heatmap per pixel; fading it in over the
        # plain scan is the clearest "how much heatmap" control.
        layer = CamLayer(
            result["overlay_url"],
            "Grad-CAM overlay",
            100,
            "The slice with the Grad-CAM heatmap blended in",
        )
    elif result.get("overlay_url"):
        base_url = result["overlay_url"]  # DICOM: the browser cannot show the upload itself
        if result.get("heatmap_url"):
            layer = CamLayer(result["heatmap_url"], "Raw heatmap", 0, "The Grad-CAM heatmap alone")
    return page(
        "web/job.html",
        job=data,
        terminal=terminal,
        scan_url=scan_url,
        base_url=base_url,
        layer=layer,
        api_job_url=backend.api_job_url(str(jid)),
        active="jobs",
    )


@bp.get("/jobs/<job_id>/scan")
@login_required
def job_scan(job_id: str) -> Response:
    """The scan as a browser-viewable image (the upload when PNG/JPEG, else a stored preview)."""
    user = current_user()
    assert user is not None
    jid = _parse_id(job_id)
    try:
        with backend.unit_of_work() as session:
            row = job_service.get_or_raise(session, jid, org_id=user.org_id)
            found = backend.scan_preview(row)
    except JobNotFound:
        abort(404)
    if found is None:
        abort(404)
    data, mimetype = found
    resp = make_response(data)
    resp.headers["Content-Type"] = mimetype
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    resp.headers["Cache-Control"] = "private, max-age=300"
    return resp


@bp.get("/performance")
@login_required
def performance() -> Response:
    """The shipped model card's test-set figures and the organization's live figures."""
    user = current_user()
    assert user is not None
    card = load_card(backend.models_dir())
    roc = reliability = None
    if card is not None and card.roc is not None:
        roc = roc_svg(*card.roc)
    if card is not None and card.reliability is not None:
        reliability = reliability_svg(*card.reliability)
    with backend.unit_of_work() as session:
        live = live_figures(session, user.org_id)
    jobs_svg = bar_svg(
        [d for d, _ in live.per_day],
        [n for _, n in live.per_day],
        f"Jobs per day (last {live.days} days)",
    )
    return page(
        "web/performance.html",
        card=card,
        roc_svg=roc,
        reliability_svg=reliability,
        live=live,
        jobs_svg=jobs_svg,
        active="performance",
    )


@bp.get("/performance/plots/<name>.svg")
@login_required
def performance_plot(name: str) -> Response:
    """A plot ml_core's evaluation wrote beside the model card (served as an image, never inlined)."""
    card = load_card(backend.models_dir())
    if card is None or name not in card.plots:
        abort(404)
    resp = make_response(card.plots[name].read_bytes())
    resp.headers["Content-Type"] = "image/svg+xml"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'unsafe-inline'; sandbox"
    )
    resp.headers["Cache-Control"] = "private, max-age=300"
    return resp
