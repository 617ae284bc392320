"""The jobs blueprint: submit, poll, list, and artifacts of the local store."""

from __future__ import annotations

import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, redirect, request
from flask.typing import ResponseReturnValue
from flask_jwt_extended import jwt_required

from api import openapi
from api.auth import current_user, require_role
from api.domain import audit, intake, jobs, retention
from api.domain.errors import (
    ArtifactNotFound,
    InvalidInput,
    JobNotFound,
    MissingFile,
    ObjectNotFound,
)
from api.domain.models import JobStatus, Role
from api.domain.serialize import ARTIFACTS, artifact_key
from api.resources import db, resources
from api.schemas import job_created, job_read
from api.uploads import parse_upload_id

bp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs")

_ARTIFACT_TYPES = {"heatmap": "image/png", "overlay": "image/png"}


def parse_job_id(raw: str) -> uuid.UUID:
    """A job id from the URL; anything that is not a UUID is simply not found."""
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise JobNotFound(details={"id": raw[:64]}) from exc


def read_upload() -> intake.Upload:
    """The multipart `file` field as an Upload (missing_file if absent or empty)."""
    file = request.files.get("file")
    if file is None:
        raise MissingFile()
    data = file.read()
    if not data:
        raise MissingFile()
    return intake.Upload(data=data, filename=file.filename, content_type=file.mimetype or None)


@bp.post("")
@jwt_required()
def submit_job() -> tuple[Response, int]:
    """Accept one image for screening (202), or replay an idempotent submit (200).

    The image is the multipart `file`, or a completed direct-to-store upload named by `upload_id`
    (form field or JSON body; see api/uploads.py).
    """
    user = current_user()
    res = resources()
    fields: Any = request.form
    if not (request.form or request.files):
        body = request.get_json(silent=True)
        fields = body if isinstance(body, dict) else {}
    raw_upload_id = fields.get("upload_id")
    upload_id = None
    if raw_upload_id and "file" not in request.files:
        upload_id = parse_upload_id(raw_upload_id)
        upload = intake.Upload(data=b"", filename=None, content_type=None)
    else:
        upload = read_upload()
    submission = intake.submit(
        db(),
        settings=res.settings,
        storage=res.storage,
        queue=res.queue,
        org_id=user.org_id,
        user_id=user.id,
        upload=upload,
        callback_url=(str(fields.get("callback_url") or "")).strip() or None,
        client_ref=str(fields.get("client_ref") or "") or None,
        idempotency_key=request.headers.get("Idempotency-Key") or None,
        upload_id=upload_id,
    )
    body = job_created(submission.job)
    response = jsonify(body)
    response.headers["Location"] = body["status_url"]
    return response, (202 if submission.created else 200)


@bp.get("")
@jwt_required()
def list_jobs() -> tuple[Response, int]:
    """One page of the caller's organization's jobs, newest first."""
    user = current_user()
    raw_status = request.args.get("status")
    status = None
    if raw_status:
        try:
            status = JobStatus(raw_status)
        except ValueError as exc:
            raise InvalidInput(
                "Unknown status.",
                details={"field": "status", "allowed": [s.value for s in JobStatus]},
            ) from exc
    try:
        limit = int(request.args.get("limit", "50"))
    except ValueError as exc:
        raise InvalidInput("limit must be an integer.", details={"field": "limit"}) from exc
    if not 1 <= limit <= jobs.MAX_PAGE:
        raise InvalidInput(f"limit must be 1-{jobs.MAX_PAGE}.", details={"field": "limit"})
    items, next_cursor = jobs.list_for_org(
        db(), user.org_id, status=status, limit=limit, cursor=request.args.get("cursor") or None
    )
    res = resources()
    return jsonify(
        {
            "items": [
                job_read(j, res.storage, expires_s=res.settings.presign_expires_s) for j in items
            ],
            "next_cursor": next_cursor,
        }
    ), 200


@bp.get("/<job_id>")
@jwt_required()
def get_job(job_id: str) -> tuple[Response, int]:
    """One job of the caller's organization (another organization's job is a 404)."""
    user = current_user()
    session = db()
    job = jobs.get_or_raise(session, parse_job_id(job_id), org_id=user.org_id)
    audit.record(session, "job.view", org_id=user.org_id, user_id=user.id, job_id=job.id)
    session.commit()
    res = resources()
    return jsonify(job_read(job, res.storage, expires_s=res.settings.presign_expires_s)), 200


@bp.delete("/<job_id>")
@jwt_required()
def delete_job(job_id: str) -> tuple[Response, int]:
    """Delete a job's upload and artifacts from the store and mark it (org admins; idempotent)."""
    user = require_role(Role.ADMIN)
    session = db()
    mark = retention.delete_job(
        session, resources().storage, parse_job_id(job_id), org_id=user.org_id, user_id=user.id
    )
    session.commit()
    return jsonify(
        {
            "id": str(mark.job_id),
            "deleted": True,
            "deleted_at": mark.deleted_at.isoformat().replace("+00:00", "Z"),
            "reason": mark.reason,
        }
    ), 200


openapi.register_path(
    "/api/v1/jobs/{job_id}",
    {
        "delete": {
            "summary": "Delete a job's upload and artifacts from the store (org admin)",
            "security": [{"bearer": []}, {"cookie": []}],
            "parameters": [
                {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "responses": {
                "200": {
                    "description": "Deleted (again: the same answer)",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "id": {"type": "string"},
                                    "deleted": {"type": "boolean"},
                                    "deleted_at": {"type": "string"},
                                    "reason": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "401": {"$ref": "#/components/responses/Error"},
                "403": {"$ref": "#/components/responses/Error"},
                "404": {"$ref": "#/components/responses/Error"},
            },
        }
    },
)


@bp.get("/<job_id>/artifacts/<name>")
@jwt_required()
def artifact(job_id: str, name: str) -> ResponseReturnValue:
    """An artifact's bytes (local store) or a redirect to a presigned URL (S3)."""
    user = current_user()
    job = jobs.get_or_raise(db(), parse_job_id(job_id), org_id=user.org_id)
    if name not in ARTIFACTS:
        raise ArtifactNotFound(details={"allowed": list(ARTIFACTS)})
    key = artifact_key(job, name)
    if key is None:
        raise ArtifactNotFound(details={"name": name})
    res = resources()
    direct = res.storage.url_for(key, res.settings.presign_expires_s)
    if direct is not None:
        return redirect(direct, code=302)
    try:
        data = res.storage.get(key)
    except ObjectNotFound as exc:
        raise ArtifactNotFound(details={"name": name}) from exc
    response = Response(data, mimetype=_content_type(name, data))
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response.headers["Cache-Control"] = "private, no-store"
    if name in ("input", "report") and response.mimetype == "application/octet-stream":
        response.headers["Content-Disposition"] = f'attachment; filename="{job.id}-{name}"'
    return response


def _content_type(name: str, data: bytes) -> str:
    if name in _ARTIFACT_TYPES:
        return _ARTIFACT_TYPES[name]
    if name == "report":
        if data.startswith(b"%PDF"):
            return "application/pdf"
        if data.lstrip()[:1] in (b"{", b"["):
            return "application/json"
    if name == "input":
        if data.startswith(b"\x89PNG"):
            return "image/png"
        if data.startswith(b"\xff\xd8\xff"):
            return "image/jpeg"
    return "application/octet-stream"
