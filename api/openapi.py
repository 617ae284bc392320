"""The OpenAPI 3.1 document of the HTTP API, hand-written, and a dependency-free docs page."""

from __future__ import annotations

import copy
from html import escape
from typing import Any

from flask import Blueprint, Response, jsonify

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")

_ERR = {"$ref": "#/components/responses/Error"}
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"cookie": []}]


def _op(
    summary: str, responses: dict[str, Any], *, auth: bool = True, **extra: Any
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses, **extra}
    if auth:
        op["security"] = _AUTH
    return op


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_JOB = {"$ref": "#/components/schemas/Job"}
_STR = {"type": "string"}
_NULL_STR = {"type": ["string", "null"]}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "liverscan",
        "version": "1",
        "description": "Asynchronous liver CT/MR tumor screening. Decision support, never a diagnosis.",
    },
    "paths": {
        "/api/v1/auth/signup": {
            "post": _op(
                "Create an organization and its first (admin) user",
                {
                    "201": _json(
                        {
                            "type": "object",
                            "properties": {"user": {"$ref": "#/components/schemas/User"}},
                        }
                    ),
                    "409": _ERR,
                    "422": _ERR,
                    "400": _ERR,
                },
                auth=False,
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["email", "password", "name", "organization"],
                        "properties": {
                            "email": _STR,
                            "password": {"type": "string", "minLength": 10},
                            "name": _STR,
                            "organization": _STR,
                        },
                    }
                ),
            )
        },
        "/api/v1/auth/login": {
            "post": _op(
                "Exchange email and password for tokens",
                {
                    "200": _json({"$ref": "#/components/schemas/Tokens"}),
                    "401": _ERR,
                    "400": _ERR,
                    "422": _ERR,
                },
                auth=False,
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["email", "password"],
                        "properties": {"email": _STR, "password": _STR},
                    }
                ),
            )
        },
        "/api/v1/auth/refresh": {
            "post": _op(
                "A new access token (send the refresh token as Bearer)",
                {"200": _json({"$ref": "#/components/schemas/Tokens"}), "401": _ERR},
            )
        },
        "/api/v1/auth/logout": {
            "post": _op(
                "Revoke the presented token (and `refresh_token` from the body)",
                {"200": _json({"type": "object"}), "401": _ERR},
            )
        },
        "/api/v1/jobs": {
            "post": _op(
                "Submit one image (PNG, JPEG, DICOM) for screening",
                {
                    "202": _json({"$ref": "#/components/schemas/JobCreated"}, "Accepted"),
                    "200": _json({"$ref": "#/components/schemas/JobCreated"}, "Idempotent replay"),
                    "401": _ERR,
                    "404": _ERR,
                    "409": _ERR,
                    "410": _ERR,
                    "413": _ERR,
                    "422": _ERR,
                    "503": _ERR,
                },
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "maxLength": 255},
                    }
                ],
                requestBody={
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "description": "`file`, or `upload_id` of a completed "
                                "POST /api/v1/uploads (404 upload_not_found, 409 "
                                "upload_incomplete / upload_already_used, 410 upload_expired, "
                                "413 payload_too_large)",
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "upload_id": {"type": "string", "format": "uuid"},
                                    "callback_url": {"type": "string", "format": "uri"},
                                    "client_ref": {"type": "string", "maxLength": 200},
                                },
                            }
                        },
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["upload_id"],
                                "properties": {
                                    "upload_id": {"type": "string", "format": "uuid"},
                                    "callback_url": {"type": "string", "format": "uri"},
                                    "client_ref": {"type": "string", "maxLength": 200},
                                },
                            }
                        },
                    },
                },
            ),
            "get": _op(
                "List the organization's jobs, newest first",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "items": {"type": "array", "items": _JOB},
                                "next_cursor": _NULL_STR,
                            },
                        }
                    ),
                    "400": _ERR,
                    "401": _ERR,
                    "422": _ERR,
                },
                parameters=[
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {
                            "type": "string",
                            "enum": ["queued", "processing", "succeeded", "rejected", "failed"],
                        },
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                    },
                    {"name": "cursor", "in": "query", "schema": _STR},
                ],
            ),
        },
        "/api/v1/jobs/{job_id}": {
            "get": _op(
                "One job", {"200": _json(_JOB), "401": _ERR, "404": _ERR}, parameters=[_JOB_ID]
            )
        },
        "/api/v1/jobs/{job_id}/artifacts/{name}": {
            "get": _op(
                "An artifact of a job (local store; S3 answers with a redirect to a presigned URL)",
                {
                    "200": {
                        "description": "The bytes",
                        "content": {
                            "image/png": {},
                            "application/pdf": {},
                            "application/octet-stream": {},
                        },
                    },
                    "302": {"description": "Presigned URL"},
                    "401": _ERR,
                    "404": _ERR,
                },
                parameters=[
                    _JOB_ID,
                    {
                        "name": "name",
                        "in": "path",
                        "required": True,
                        "schema": {
                            "type": "string",
                            "enum": ["heatmap", "overlay", "report", "input"],
                        },
                    },
                ],
            )
        },
        "/api/v1/org/webhook-secret": {
            "get": _op(
                "The webhook signing secret (admin)",
                {
                    "200": _json({"type": "object", "properties": {"webhook_secret": _STR}}),
                    "401": _ERR,
                    "403": _ERR,
                },
            ),
            "post": _op(
                "Rotate the webhook signing secret (admin)",
                {
                    "200": _json({"type": "object", "properties": {"webhook_secret": _STR}}),
                    "401": _ERR,
                    "403": _ERR,
                },
            ),
        },
        "/api/v1/org/users": {
            "post": _op(
                "Add a user to the caller's organization (admin)",
                {
                    "201": _json(
                        {
                            "type": "object",
                            "properties": {"user": {"$ref": "#/components/schemas/User"}},
                        }
                    ),
                    "401": _ERR,
                    "403": _ERR,
                    "409": _ERR,
                    "422": _ERR,
                },
                requestBody=_body(
                    {
                        "type": "object",
                        "required": ["email", "password", "name"],
                        "properties": {
                            "email": _STR,
                            "password": {"type": "string", "minLength": 10},
                            "name": _STR,
                            "role": {
                                "enum": ["clinician", "admin", "operator"],
                                "default": "clinician",
                            },
                        },
                    }
                ),
            )
        },
        "/healthz": {"get": _op("Liveness", {"200": _json({"type": "object"})}, auth=False)},
        "/readyz": {
            "get": _op(
                "Readiness of database, broker and store",
                {"200": _json({"type": "object"}), "503": _ERR},
                auth=False,
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics (with LIVERSCAN_METRICS_TOKEN set: Authorization: Bearer "
                "<that token>, else 401 unauthorized)",
                {
                    "200": {"description": "text exposition", "content": {"text/plain": {}}},
                    "401": _ERR,
                },
                auth=False,
            )
        },
        "/api/v1/openapi.json": {
            "get": _op("This document", {"200": _json({"type": "object"})}, auth=False)
        },
        "/api/v1/docs": {
            "get": _op(
                "Human-readable list of operations",
                {"200": {"description": "HTML", "content": {"text/html": {}}}},
                auth=False,
            )
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "cookie": {"type": "apiKey", "in": "cookie", "name": "access_token_cookie"},
        },
        "responses": {"Error": _json({"$ref": "#/components/schemas/Error"}, "Error envelope")},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message", "details"],
                        "properties": {
                            "code": _STR,
                            "message": _STR,
                            "details": {"type": "object"},
                        },
                    }
                },
            },
            "Tokens": {
                "type": "object",
                "properties": {
                    "access_token": _STR,
                    "refresh_token": _STR,
                    "token_type": {"const": "Bearer"},
                    "expires_in": {"type": "integer"},
                },
            },
            "User": {
                "type": "object",
                "properties": {
                    "id": _STR,
                    "email": _STR,
                    "name": _STR,
                    "role": {"enum": ["clinician", "admin", "operator"]},
                    "organization": {"type": "object"},
                    "created_at": _STR,
                },
            },
            "JobCreated": {
                "type": "object",
                "properties": {
                    "id": _STR,
                    "status": {"const": "queued"},
                    "status_url": _STR,
                    "created_at": _STR,
                },
            },
            "Job": {
                "type": "object",
                "properties": {
                    "id": _STR,
                    "status": {"enum": ["queued", "processing", "succeeded", "rejected", "failed"]},
                    "created_at": _STR,
                    "started_at": _NULL_STR,
                    "finished_at": _NULL_STR,
                    "client_ref": _NULL_STR,
                    "input": {
                        "type": "object",
                        "properties": {
                            "filename": _NULL_STR,
                            "sha256": _STR,
                            "content_type": _NULL_STR,
                            "format": {"enum": ["png", "jpeg", "dicom", None]},
                            "width": {"type": ["integer", "null"]},
                            "height": {"type": ["integer", "null"]},
                            "modality": {"enum": ["CT", "MR", None]},
                        },
                    },
                    "validation": {
                        "type": ["object", "null"],
                        "properties": {
                            "passed": {"type": "boolean"},
                            "reason_code": _NULL_STR,
                            "checks": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "name": _STR,
                                        "passed": {"type": "boolean"},
                                        "detail": _STR,
                                    },
                                },
                            },
                        },
                    },
                    "result": {
                        "type": ["object", "null"],
                        "properties": {
                            "label": {"enum": ["tumor", "normal"]},
                            "probability": {"type": "number"},
                            "threshold": {"type": "number"},
                            "model": {"type": "object"},
                            "heatmap_url": _NULL_STR,
                            "overlay_url": _NULL_STR,
                            "report_url": _NULL_STR,
                        },
                    },
                    "error": {
                        "type": ["object", "null"],
                        "properties": {"code": _STR, "message": _STR},
                    },
                },
            },
        },
    },
}


# Answers that the policies in api/security.py give before any view runs, so no view declares
# them: a deleted job answers 410 to its own organization on every route that names it (except
# DELETE, which stays idempotent); the rate-limited operations answer 429 with Retry-After; the
# API login answers 423 with Retry-After while an email is locked out; with LIVERSCAN_PUBLIC_HOSTS
# set, every operation but the probes' answers 400 bad_host to a request naming another host.
RATE_LIMITED_OPERATIONS = frozenset(
    {
        ("/api/v1/auth/login", "post"),
        ("/api/v1/auth/signup", "post"),
        ("/api/v1/jobs", "post"),
        ("/api/v1/batches", "post"),
    }
)
LOCKOUT_OPERATIONS = frozenset({("/api/v1/auth/login", "post")})
ANY_HOST_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # api.security.init_hosts
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer", "minimum": 1}}
}
POLICY_RESPONSES: dict[str, Any] = {
    "BadHost": {
        **_json(
            {"$ref": "#/components/schemas/Error"},
            "The request names a host not in LIVERSCAN_PUBLIC_HOSTS (bad_host)",
        ),
    },
    "Gone": {
        **_json({"$ref": "#/components/schemas/Error"}, "The job's data was deleted (job_deleted)"),
    },
    "Locked": {
        **_json({"$ref": "#/components/schemas/Error"}, "Too many failed logins (account_locked)"),
        "headers": _RETRY_AFTER,
    },
    "RateLimited": {
        **_json({"$ref": "#/components/schemas/Error"}, "Too many requests (rate_limited)"),
        "headers": _RETRY_AFTER,
    },
}


def document() -> dict[str, Any]:
    """The document with the policy answers (400, 410, 423, 429) added to the operations that give
    them."""
    spec = copy.deepcopy(SPEC)
    spec["components"]["responses"].update(POLICY_RESPONSES)
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if path not in ANY_HOST_PATHS:
                responses.setdefault("400", {"$ref": "#/components/responses/BadHost"})
            if "{job_id}" in path and method != "delete":
                responses.setdefault("410", {"$ref": "#/components/responses/Gone"})
            if (path, method) in LOCKOUT_OPERATIONS:
                responses.setdefault("423", {"$ref": "#/components/responses/Locked"})
            if (path, method) in RATE_LIMITED_OPERATIONS:
                responses.setdefault("429", {"$ref": "#/components/responses/RateLimited"})
    return spec


def register_path(path: str, operations: dict[str, Any]) -> None:
    """Let another blueprint (batches, reports) add its operations to the document."""
    SPEC["paths"].setdefault(path, {}).update(operations)


@bp.get("/openapi.json")
def openapi_json() -> tuple[Response, int]:
    """The OpenAPI 3.1 document."""
    return jsonify(document()), 200


@bp.get("/docs")
def docs() -> Response:
    """A plain HTML list of every operation (no CDN, no JavaScript)."""
    rows = []
    for path, ops in sorted(document()["paths"].items()):
        for method, op in ops.items():
            codes = ", ".join(sorted(op.get("responses", {})))
            rows.append(
                f"<tr><td><code>{escape(method.upper())}</code></td><td><code>{escape(path)}</code></td>"
                f"<td>{escape(op.get('summary', ''))}</td><td>{escape(codes)}</td></tr>"
            )
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>liverscan API</title>"
        "<style>body{font-family:sans-serif;margin:2rem}td,th{padding:.3rem .6rem;border-bottom:1px solid #ddd}</style>"
        "</head><body><h1>liverscan API v1</h1><p>Decision support, never a diagnosis. "
        'Machine-readable: <a href="openapi.json">openapi.json</a>. Errors: '
        '<code>{"error": {"code", "message", "details"}}</code>.</p>'
        "<table><tr><th>method</th><th>path</th><th>what</th><th>responses</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
    return Response(html, mimetype="text/html")
