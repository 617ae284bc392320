"""One error envelope for everything: `{"error": {"code", "message", "details"}}`."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from api.domain.errors import LiverscanError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_input",
    410: "gone",
    423: "locked",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}


def error_response(
    code: str, message: str, status: int, details: dict[str, Any] | None = None
) -> tuple[Response, int]:
    """The envelope as a Flask response."""
    return jsonify({"error": {"code": code, "message": message, "details": details or {}}}), status


def _handle_liverscan(exc: LiverscanError) -> tuple[Response, int]:
    if exc.http_status >= 500:
        log.warning("%s: %s %s", exc.code, exc.message, exc.details)
    response, status = error_response(exc.code, exc.message, exc.http_status, exc.details)
    retry_after = exc.details.get("retry_after_s")
    if isinstance(retry_after, int):  # rate limits and lockouts say when to come back
        response.headers["Retry-After"] = str(retry_after)
    return response, status


def _handle_http(exc: HTTPException) -> tuple[Response, int] | Response:
    status = exc.code or 500
    code = _HTTP_CODES.get(status, "http_error")
    message = exc.description or exc.name
    if status == 413:
        message = "The upload exceeds the size limit."
    response, status = error_response(code, message, status)
    valid_methods = getattr(exc, "valid_methods", None)
    if status == 405 and valid_methods:
        response.headers["Allow"] = ", ".join(valid_methods)
    return response, status


def _handle_db(exc: DBAPIError) -> tuple[Response, int]:
    if isinstance(exc, OperationalError) or exc.connection_invalidated:
        log.warning("database unavailable: %s", exc)
        return error_response("database_unavailable", "The database is unavailable.", 503)
    log.exception("database error")
    return error_response("internal_error", "Internal error.", 500)


def _handle_unexpected(exc: Exception) -> tuple[Response, int]:
    log.exception("unhandled error")
    return error_response("internal_error", "Internal error.", 500)


def register_error_handlers(app: Flask) -> None:
    """Route every error source to the envelope."""
    app.register_error_handler(LiverscanError, _handle_liverscan)
    app.register_error_handler(HTTPException, _handle_http)
    app.register_error_handler(DBAPIError, _handle_db)
    app.register_error_handler(Exception, _handle_unexpected)
