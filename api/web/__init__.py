"""Server-rendered web pages (Flask blueprint `bp`): templates, plain CSS and a little JavaScript."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, Response
from werkzeug.exceptions import HTTPException

bp = Blueprint(
    "web",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/web-static",
)


@bp.app_template_filter("when")
def _when(value: Any) -> str:
    """ISO 8601 timestamp → 'YYYY-MM-DD HH:MM:SS UTC'; a dash when missing."""
    if not value:
        return "—"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    return f"{value:%Y-%m-%d %H:%M:%S} UTC"


@bp.app_template_filter("seconds")
def _seconds(value: float | None) -> str:
    """A duration in seconds for people: '850 ms', '4.2 s', '3 min 10 s'."""
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    return f"{int(value // 60)} min {int(value % 60)} s"


@bp.app_template_filter("reason")
def _reason(code: str | None) -> str:
    from api.web.reasons import reason_sentence

    return reason_sentence(code)


@bp.app_template_filter("error_sentence")
def _error_sentence(code: str | None) -> str:
    from api.web.reasons import error_sentence

    return error_sentence(code)


@bp.app_template_filter("status_words")
def _status_words(status: str) -> str:
    from api.web.reasons import STATUS_WORDS

    return STATUS_WORDS.get(status, status)


@bp.app_template_filter("columns")
def _columns(rows: list[Any]) -> list[str]:
    """The union of the keys of a list of dicts, in first-seen order (a table's columns)."""
    cols: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            cols.update(dict.fromkeys(row))
    return list(cols)


def _error_page(exc: HTTPException) -> Response:
    from api.web.views import page

    code = exc.code or 500
    if code == 404:
        title, message = (
            "Not found",
            "There is nothing here, or it belongs to another organization.",
        )
    elif code == 403 and exc.description == "csrf_failed":
        title = "Form expired or forged"
        message = "The form was sent without a valid security token, so nothing was changed. Reload the page and try again."
    else:
        title, message = exc.name, "The request could not be completed."
    return page("web/error.html", status=code, title=title, message=message)


bp.register_error_handler(404, _error_page)
bp.register_error_handler(403, _error_page)

from api.web import views  # noqa: E402,F401  (routes register on import)
