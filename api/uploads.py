"""Direct-to-store uploads: `POST /api/v1/uploads` opens a slot with a presigned PUT URL (S3); the
local-folder store has no such URL, so `PUT /api/v1/uploads/<id>` takes the bytes instead. Then
`POST /api/v1/jobs` with `upload_id` creates the job from the stored object (api/jobs.py)."""

from __future__ import annotations

import uuid

from flask import Blueprint, Response, jsonify, request, url_for
from flask_jwt_extended import jwt_required

from api.auth import current_user
from api.domain import audit, uploads
from api.domain.errors import MissingFile, PayloadTooLarge, UploadNotFound
from api.domain.serialize import iso
from api.openapi import register_path
from api.resources import db, resources

bp = Blueprint("uploads", __name__, url_prefix="/api/v1/uploads")


def parse_upload_id(raw: str) -> uuid.UUID:
    """An upload id from the URL or a form; anything that is not a UUID is not found."""
    try:
        return uuid.UUID(str(raw))
    except ValueError as exc:
        raise UploadNotFound(details={"upload_id": str(raw)[:64]}) from exc


@bp.post("")
@jwt_required()
def create_upload() -> tuple[Response, int]:
    """Open a direct-to-store upload slot: where to PUT the file, and until when."""
    user = current_user()
    res = resources()
    body = request.get_json(silent=True)
    body = body if isinstance(body, dict) else {}
    session = db()
    row, presigned = uploads.create(
        session,
        settings=res.settings,
        storage=res.storage,
        org_id=user.org_id,
        user_id=user.id,
        filename=str(body.get("filename") or "") or None,
        content_type=str(body.get("content_type") or "") or None,
    )
    audit.record(session, "upload.create", org_id=user.org_id, user_id=user.id, job_id=None)
    session.commit()
    direct = presigned is not None
    return jsonify(
        {
            "id": str(row.id),
            "method": "PUT",
            "url": presigned or url_for("uploads.put_bytes", upload_id=row.id, _external=True),
            "headers": {"Content-Type": row.content_type},
            "direct": direct,  # false: the URL is the API's, send the bearer token too
            "max_bytes": res.settings.max_upload_bytes,
            "expires_at": iso(row.expires_at),
        }
    ), 201


@bp.put("/<upload_id>")
@jwt_required()
def put_bytes(upload_id: str) -> tuple[str, int]:
    """Store the request body as the upload's bytes (the local-folder store's presigned PUT)."""
    user = current_user()
    res = resources()
    row = uploads.get_pending(db(), parse_upload_id(upload_id), org_id=user.org_id)
    limit = res.settings.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(details={"max_bytes": limit})
    data = request.get_data(cache=False)
    if len(data) > limit:
        raise PayloadTooLarge(details={"max_bytes": limit})
    if not data:
        raise MissingFile()
    res.storage.put(row.key, data, row.content_type or uploads.DEFAULT_CONTENT_TYPE)
    return "", 204


_ERR = {"$ref": "#/components/responses/Error"}
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"cookie": []}]
_UPLOAD_ID = {"name": "upload_id", "in": "path", "required": True, "schema": {"type": "string"}}

register_path(
    "/api/v1/uploads",
    {
        "post": {
            "summary": "Open a direct-to-store upload: a presigned PUT URL (S3) or the API's PUT "
            "route (local store); then POST /api/v1/jobs with upload_id",
            "security": _SECURITY,
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "filename": {"type": "string", "maxLength": 255},
                                "content_type": {"type": "string", "maxLength": 127},
                            },
                        }
                    }
                },
            },
            "responses": {
                "201": {
                    "description": "Upload slot",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "string", "format": "uuid"},
                                    "method": {"type": "string", "enum": ["PUT"]},
                                    "url": {"type": "string", "format": "uri"},
                                    "headers": {"type": "object"},
                                    "direct": {"type": "boolean"},
                                    "max_bytes": {"type": "integer"},
                                    "expires_at": {"type": "string", "format": "date-time"},
                                },
                            }
                        }
                    },
                },
                "401": _ERR,
                "422": _ERR,
            },
        }
    },
)
register_path(
    "/api/v1/uploads/{upload_id}",
    {
        "put": {
            "summary": "The file's bytes, for the local-folder store (S3: PUT to the presigned URL)",
            "parameters": [_UPLOAD_ID],
            "security": _SECURITY,
            "requestBody": {"required": True, "content": {"application/octet-stream": {}}},
            "responses": {
                "204": {"description": "Stored"},
                "401": _ERR,
                "404": _ERR,
                "410": _ERR,
                "409": _ERR,
                "413": _ERR,
                "422": _ERR,
            },
        }
    },
)
