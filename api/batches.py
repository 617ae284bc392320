"""The batches blueprint: submit many files (parts and/or zips), follow progress, export a CSV."""

from __future__ import annotations

import csv
import io
import uuid
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from flask_jwt_extended import jwt_required

from api import openapi
from api.auth import current_user
from api.domain import batches, intake
from api.domain.models import Batch
from api.resources import db, resources
from api.schemas import artifact_url, status_url

bp = Blueprint("batches", __name__, url_prefix="/api/v1/batches")

CSV_COLUMNS = (
    "filename",
    "client_ref",
    "status",
    "reason_code",
    "label",
    "probability",
    "model_version",
    "overlay_url",
    "job_id",
)
_TRUE = {"1", "true", "yes", "on"}
# Spreadsheets run cells starting with these as formulas; a filename is user input.
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


@bp.before_request
def _batch_request_limits() -> None:
    """A batch request may be far larger than one upload, with one multipart part per file."""
    settings = resources().settings
    request.max_content_length = settings.batch_max_mb * 1024 * 1024
    request.max_form_parts = settings.batch_max_files + 64


def parse_batch_id(raw: str) -> uuid.UUID:
    """A batch id from the URL; anything that is not a UUID is simply not found."""
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise batches.BatchNotFound(details={"id": raw[:64]}) from exc


def read_files() -> list[batches.BatchFile]:
    """Every multipart `file` part, paired with the `client_ref` parts when their counts match."""
    parts = request.files.getlist("file")
    refs = request.form.getlist("client_ref")
    if len(refs) != len(parts):
        refs = [""] * len(parts)
    files = []
    for part, ref in zip(parts, refs, strict=True):
        upload = intake.Upload(
            data=part.read(), filename=part.filename or None, content_type=part.mimetype or None
        )
        files.append(batches.BatchFile(upload=upload, client_ref=ref or None))
    return files


@bp.post("")
@jwt_required()
def submit_batch() -> tuple[Response, int]:
    """Accept many files as one batch (202); bad files are refused one by one, listed in `rejected`."""
    user = current_user()
    res = resources()
    files = read_files()
    if len(files) > res.settings.batch_max_files:
        raise batches.TooManyFiles(details={"max_files": res.settings.batch_max_files})
    result = batches.submit(
        db(),
        settings=res.settings,
        storage=res.storage,
        queue=res.queue,
        org_id=user.org_id,
        user_id=user.id,
        files=files,
        callback_url=(request.form.get("callback_url") or "").strip() or None,
        job_events=(request.form.get("job_events") or "").lower() in _TRUE,
    )
    url = _status_url(result.batch)
    response = jsonify(
        {
            "id": str(result.batch.id),
            "status_url": url,
            "results_url": url + "/results.csv",
            "job_ids": [str(job.id) for job in result.jobs],
            "jobs": [
                {"id": str(j.id), "filename": j.input_filename, "status_url": status_url(j)}
                for j in result.jobs
            ],
            "rejected": result.rejected,
            "skipped": result.skipped,
        }
    )
    response.headers["Location"] = url
    return response, 202


@bp.get("/<batch_id>")
@jwt_required()
def get_batch(batch_id: str) -> tuple[Response, int]:
    """Counts per status, progress, the files refused at intake, and every job of the batch."""
    user = current_user()
    session = db()
    batch = batches.get_or_raise(session, parse_batch_id(batch_id), org_id=user.org_id)
    body = batches.summary(session, batch)
    body["status_url"] = _status_url(batch)
    body["results_url"] = body["status_url"] + "/results.csv"
    body["jobs"] = [
        {
            "id": str(job.id),
            "filename": job.input_filename,
            "client_ref": job.client_ref,
            "status": job.status.value,
            "reason_code": job.reason_code or job.error_code,
            "label": job.label,
            "probability": job.probability,
            "status_url": status_url(job),
        }
        for job in batches.jobs_of(session, batch.id)
    ]
    return jsonify(body), 200


@bp.get("/<batch_id>/results.csv")
@jwt_required()
def results_csv(batch_id: str) -> Response:
    """One CSV row per file: filename, client_ref, status, reason_code, label, probability, model, overlay."""
    user = current_user()
    session = db()
    batch = batches.get_or_raise(session, parse_batch_id(batch_id), org_id=user.org_id)
    res = resources()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in batches.results_rows(session, batch):
        job = row["job"]
        overlay = (
            artifact_url(job, "overlay", res.storage, res.settings.presign_expires_s)
            if job is not None
            else None
        )
        values: list[Any] = [
            row["filename"],
            row["client_ref"],
            row["status"],
            row["reason_code"],
            row["label"],
            "" if row["probability"] is None else f"{row['probability']:.6f}",
            row["model_version"],
            overlay,
            str(job.id) if job is not None else "",
        ]
        writer.writerow([_cell(v) for v in values])
    response = Response(out.getvalue(), mimetype="text/csv")
    response.headers["Content-Disposition"] = f'attachment; filename="batch-{batch.id}.csv"'
    response.headers["Cache-Control"] = "private, no-store"
    return response


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_PREFIXES) else text


def _status_url(batch: Batch) -> str:
    return url_for("batches.get_batch", batch_id=batch.id, _external=True)


_BATCH_ID = {
    "name": "batch_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_ERR = {"$ref": "#/components/responses/Error"}
_AUTH: list[dict[str, list[str]]] = [{"bearer": []}, {"cookie": []}]

openapi.register_path(
    "/api/v1/batches",
    {
        "post": {
            "summary": "Submit many images (file parts and/or zips) as one batch",
            "security": _AUTH,
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                },
                                "client_ref": {"type": "array", "items": {"type": "string"}},
                                "callback_url": {"type": "string", "format": "uri"},
                                "job_events": {"type": "boolean"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "202": {
                    "description": "Accepted: {id, status_url, results_url, job_ids, jobs, rejected, skipped}"
                },
                "401": _ERR,
                "413": _ERR,
                "422": _ERR,
                "503": _ERR,
            },
        }
    },
)
openapi.register_path(
    "/api/v1/batches/{batch_id}",
    {
        "get": {
            "summary": "A batch: counts per status, progress and its jobs",
            "security": _AUTH,
            "parameters": [_BATCH_ID],
            "responses": {"200": {"description": "The batch"}, "401": _ERR, "404": _ERR},
        }
    },
)
openapi.register_path(
    "/api/v1/batches/{batch_id}/results.csv",
    {
        "get": {
            "summary": "One CSV row per file of the batch",
            "security": _AUTH,
            "parameters": [_BATCH_ID],
            "responses": {
                "200": {"description": "CSV", "content": {"text/csv": {}}},
                "401": _ERR,
                "404": _ERR,
            },
        }
    },
)
