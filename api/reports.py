"""Reports of a job: the PDF, a FHIR R4 DiagnosticReport, and DICOM outputs of DICOM uploads;
and the summary PDF of a batch (rendered here on request from the rows and stored overlays).

`report.pdf` (and for DICOM uploads `overlay_sc.dcm` and `sr.dcm`) are rendered lazily: the first
GET of a succeeded job's report enqueues `liverscan.render_report` (queue `reports`; a worker
renders from the stored upload and overlay) and waits up to LIVERSCAN_REPORT_WAIT_S for it, then
serves it; a render still running after that is a 202 with Retry-After (ask again). The FHIR
resource is built here from the job row.
A job that did not succeed has no report (404 `report_not_found`); another organization's job
is a 404 `job_not_found`; DICOM outputs of a non-DICOM upload are a 409 `not_dicom`.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, jsonify, redirect, url_for
from flask.typing import ResponseReturnValue
from flask_jwt_extended import jwt_required
from sqlalchemy import select

from api.auth import current_user
from api.domain import audit, batches, jobs
from api.domain.errors import LiverscanError, NotFound, ObjectNotFound
from api.domain.models import Job, JobStatus
from api.domain.queue import RENDER_REPORT, REPORTS_QUEUE
from api.domain.storage import DICOM_OVERLAY_NAME, DICOM_SR_NAME, job_key
from api.jobs import parse_job_id
from api.openapi import register_path
from api.resources import db, resources

bp = Blueprint("reports", __name__, url_prefix="/api/v1")

DISCLAIMER = "Decision support only, not a diagnosis; review the whole study before acting on it."
DICOM_OBJECTS = {"overlay": DICOM_OVERLAY_NAME, "sr": DICOM_SR_NAME}
FHIR_JSON = "application/fhir+json"

# Codings (kept in step with worker/reports.py, which writes the same codes into the SR).
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
LOCAL = "urn:liverscan:fhir:codes"
REPORT_CODE = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
RADIOLOGY = {
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "RAD",
    "display": "Radiology",
}
IMAGING = {
    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "imaging",
    "display": "Imaging",
}
FINDINGS = {
    "tumor": {"system": SNOMED, "code": "126851005", "display": "Neoplasm of liver"},
    "normal": {"system": SNOMED, "code": "281900007", "display": "No abnormality detected"},
}


class ReportNotFound(NotFound):
    """The job exists but has no report (not succeeded, or rendered before reports existed)."""

    code, message = "report_not_found", "This job has no report (only succeeded jobs have one)."


class NotDicom(LiverscanError):
    """DICOM outputs were asked for a job whose upload is not DICOM."""

    code, http_status = "not_dicom", 409
    message = "DICOM outputs exist only for DICOM uploads; this upload is not DICOM."


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _job_for_report(job_id: str, action: str) -> Job:
    """The caller's organization's job (else job_not_found), audited as a report access."""
    user = current_user()
    session = db()
    job = jobs.get_or_raise(session, parse_job_id(job_id), org_id=user.org_id)
    audit.record(session, action, org_id=user.org_id, user_id=user.id, job_id=job.id, detail=None)
    session.commit()
    return job


def _require_succeeded(job: Job) -> None:
    if job.status is not JobStatus.SUCCEEDED:
        raise ReportNotFound(details={"id": str(job.id), "status": job.status.value})


def _serve(job: Job, key: str, mimetype: str, filename: str) -> ResponseReturnValue:
    """Bytes from the local store, or a redirect to a presigned URL (S3); missing → report_not_found."""
    res = resources()
    if not res.storage.exists(key):
        raise ReportNotFound(details={"id": str(job.id)})
    direct = res.storage.url_for(key, res.settings.presign_expires_s)
    if direct is not None:
        return redirect(direct, code=302)
    try:
        data = res.storage.get(key)
    except ObjectNotFound as exc:
        raise ReportNotFound(details={"id": str(job.id)}) from exc
    response = Response(data, mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    response.headers["Cache-Control"] = "private, no-store"
    return response


RENDER_POLL_S = 0.1
RETRY_AFTER_S = 2


def _rendered_report_key(job: Job) -> str | None:
    """The job's report key, asking a worker to render it first if it was never rendered."""
    if job.report_key is not None:
        return job.report_key
    res = resources()
    res.queue.enqueue(RENDER_REPORT, str(job.id), queue=REPORTS_QUEUE)  # idempotent task
    deadline = time.monotonic() + res.settings.report_wait_s
    while True:
        with res.session_factory() as session:
            key = session.scalar(select(Job.report_key).where(Job.id == job.id))
        if key is not None or time.monotonic() >= deadline:
            return key
        time.sleep(RENDER_POLL_S)


def _rendering(job: Job) -> ResponseReturnValue:
    response = jsonify(
        {
            "id": str(job.id),
            "status": "rendering",
            "message": "The report is being rendered; ask again shortly.",
        }
    )
    response.status_code = 202
    response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


@bp.get("/jobs/<job_id>/report")
@jwt_required()
def report_pdf(job_id: str) -> ResponseReturnValue:
    """The job's PDF report (local store: the bytes; S3: a redirect to a presigned URL)."""
    job = _job_for_report(job_id, "report.pdf")
    _require_succeeded(job)
    key = _rendered_report_key(job)
    if key is None:
        return _rendering(job)
    return _serve(job, key, "application/pdf", f"liverscan-{job.id}.pdf")


@bp.get("/jobs/<job_id>/fhir")
@jwt_required()
def report_fhir(job_id: str) -> tuple[Response, int]:
    """The job's result as a FHIR R4 DiagnosticReport (application/fhir+json)."""
    job = _job_for_report(job_id, "report.fhir")
    _require_succeeded(job)
    body = json.dumps(diagnostic_report(job), indent=2)
    return Response(body, mimetype=FHIR_JSON), 200


@bp.get("/jobs/<job_id>/dicom/<kind>")
@jwt_required()
def report_dicom(job_id: str, kind: str) -> ResponseReturnValue:
    """A DICOM output of a DICOM upload: `overlay` (Secondary Capture) or `sr` (Basic Text SR)."""
    job = _job_for_report(job_id, "report.dicom")
    if kind not in DICOM_OBJECTS:
        raise ReportNotFound(
            "No such DICOM output.", details={"kind": kind[:32], "allowed": list(DICOM_OBJECTS)}
        )
    if job.input_format is not None and job.input_format != "dicom":
        raise NotDicom(details={"id": str(job.id), "format": job.input_format})
    _require_succeeded(job)
    if _rendered_report_key(job) is None:  # rendered together with the PDF
        return _rendering(job)
    name = DICOM_OBJECTS[kind]
    key = job_key(job.org_id, job.id, name)
    return _serve(job, key, "application/dicom", f"liverscan-{job.id}-{name}")


def _coding_concept(coding: dict[str, str], text: str | None = None) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [coding]}
    if text:
        concept["text"] = text
    return concept


def diagnostic_report(job: Job) -> dict[str, Any]:
    """A FHIR R4 DiagnosticReport of a succeeded job, with contained Observations, Device and Media."""
    label = job.label or "normal"
    probability = float(job.probability or 0.0)
    threshold = float(job.threshold or 0.0)
    finding = FINDINGS.get(label, FINDINGS["normal"])
    headline = "Tumor suspected" if label == "tumor" else "No tumor detected"
    issued = _iso(job.finished_at)
    device = {
        "resourceType": "Device",
        "id": "model",
        "identifier": [{"system": "urn:liverscan:model-sha256", "value": job.model_sha256 or ""}],
        "deviceName": [{"name": job.model_name or "liverscan", "type": "model-name"}],
        "version": [{"value": job.model_version or ""}],
        "note": [
            {
                "text": "Machine-learning model (EfficientNet) for liver tumor screening. "
                + DISCLAIMER
            }
        ],
    }
    common = {
        "status": "final",
        "category": [_coding_concept(IMAGING)],
        "effectiveDateTime": _iso(job.created_at),
        "issued": issued,
        "device": {"reference": "#model"},
    }
    prob_obs = {
        "resourceType": "Observation",
        "id": "probability",
        **common,
        "code": _coding_concept(
            {"system": LOCAL, "code": "tumor-probability", "display": "Tumor probability (calibrated)"},
            "Calibrated probability of a liver tumor on this slice",
        ),
        "valueQuantity": {"value": round(probability, 6), "unit": "probability", "system": UCUM, "code": "1"},
        "component": [
            {
                "code": _coding_concept(
                    {"system": LOCAL, "code": "decision-threshold", "display": "Decision threshold"}
                ),
                "valueQuantity": {"value": round(threshold, 6), "unit": "probability", "system": UCUM, "code": "1"},
            }
        ],
    }  # fmt: skip
    label_obs = {
        "resourceType": "Observation",
        "id": "finding",
        **common,
        "code": _coding_concept(
            {"system": LOCAL, "code": "screening-label", "display": "Liver tumor screening label"},
            "Screening label",
        ),
        "valueCodeableConcept": _coding_concept(finding, label),
        "derivedFrom": [{"reference": "#probability"}],
    }
    contained: list[dict[str, Any]] = [device, prob_obs, label_obs]
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": str(job.id),
        "contained": contained,
        "identifier": [{"system": "urn:ietf:rfc:3986", "value": f"urn:uuid:{job.id}"}],
        "status": "final",
        "category": [_coding_concept(RADIOLOGY)],
        "code": _coding_concept(REPORT_CODE, "Liver tumor screening (AI decision support)"),
        "effectiveDateTime": _iso(job.created_at),
        "issued": issued,
        "result": [{"reference": "#probability"}, {"reference": "#finding"}],
        "conclusion": (
            f"{headline}: calibrated probability {probability:.3f} "
            f"({'at or above' if probability >= threshold else 'below'} threshold {threshold:.3f}). "
            + DISCLAIMER
        ),
        "conclusionCode": [_coding_concept(finding)],
    }
    if job.client_ref:
        report["identifier"].append({"system": "urn:liverscan:client-ref", "value": job.client_ref})
    if job.overlay_key:
        contained.append(
            {
                "resourceType": "Media",
                "id": "overlay",
                "status": "completed",
                "type": _coding_concept(
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/media-type",
                        "code": "image",
                        "display": "Image",
                    }
                ),
                "issued": issued,
                "device": {"reference": "#model"},
                "content": {
                    "contentType": "image/png",
                    "url": url_for("jobs.artifact", job_id=job.id, name="overlay", _external=True),
                    "title": "Grad-CAM overlay",
                },
            }
        )
        report["media"] = [{"comment": "Grad-CAM overlay", "link": {"reference": "#overlay"}}]
    if job.report_key or job.overlay_key:  # rendered on the first GET of the URL
        report["presentedForm"] = [
            {
                "contentType": "application/pdf",
                "url": url_for("reports.report_pdf", job_id=job.id, _external=True),
                "title": "liverscan report (PDF)",
            }
        ]
    return report


BATCH_THUMBNAILS = 200  # rows with a thumbnail (highest probability first); the rest are text


@bp.get("/batches/<batch_id>/report")
@jwt_required()
def batch_report_pdf(batch_id: str) -> Response:
    """The batch summary PDF: counts, then every job, highest probability first, with thumbnails."""
    from api.batches import parse_batch_id

    user = current_user()
    session = db()
    batch = batches.get_or_raise(session, parse_batch_id(batch_id), org_id=user.org_id)
    audit.record(
        session,
        "report.batch",
        org_id=user.org_id,
        user_id=user.id,
        detail={"batch": str(batch.id)},
    )
    session.commit()
    pdf = render_batch_pdf(
        batches.summary(session, batch), batches.results_rows(session, batch), _thumbnail
    )
    response = Response(pdf, mimetype="application/pdf")
    response.headers["Content-Disposition"] = (
        f'attachment; filename="liverscan-batch-{batch.id}.pdf"'
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "private, no-store"
    return response


def _thumbnail(job: Job) -> bytes | None:
    """A small PNG of the job's stored overlay, or None (no overlay, or the store lost it)."""
    if job.overlay_key is None:
        return None
    import io

    from PIL import Image

    try:
        data = resources().storage.get(job.overlay_key)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        image.thumbnail((96, 96))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    except Exception:  # a thumbnail is a nicety: a missing or unreadable overlay leaves "-"
        return None


def _sort_key(row: dict[str, Any]) -> tuple[int, float]:
    probability = row.get("probability")
    if probability is not None:
        return (0, -float(probability))
    return (1 if row["status"] in ("queued", "processing") else 2, 0.0)


def _latin1(text: Any) -> str:
    out = str(text)
    for src, dst in {"≥": ">=", "≤": "<=", "—": "-", "–": "-", "…": "..."}.items():
        out = out.replace(src, dst)
    return out.encode("latin-1", "replace").decode("latin-1")


def render_batch_pdf(summary: dict[str, Any], rows: list[dict[str, Any]], thumbnail: Any) -> bytes:
    """The batch summary PDF (A4): counts and one row per file, highest probability first."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_title(f"liverscan batch {summary['id']}")
    pdf.set_author("liverscan")
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.set_margins(12, 12, 12)
    pdf.add_page()
    width = pdf.epw
    pdf.set_font("Helvetica", "B", 15)
    pdf.cell(width, 8, "liverscan - batch summary", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 8.5)
    pdf.multi_cell(width, 4, DISCLAIMER, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(1)
    counts = summary["counts"]
    tumor = sum(1 for r in rows if r.get("label") == "tumor")
    lines = [
        f"Batch {summary['id']} - {summary['status']}, created {summary['created_at']}"
        + (f", completed {summary['completed_at']}" if summary.get("completed_at") else ""),
        f"Files: {summary['file_count']}   Jobs: {summary['job_count']}   "
        f"Succeeded: {counts.get('succeeded', 0)} (tumor suspected: {tumor})   "
        f"Rejected: {counts.get('rejected', 0)}   Failed: {counts.get('failed', 0)}   "
        f"Refused at intake: {summary['rejected_at_intake']}   "
        f"Pending: {counts.get('queued', 0) + counts.get('processing', 0)}",
    ]
    pdf.set_font("Helvetica", "", 9)
    for line in lines:
        pdf.multi_cell(width, 4.5, _latin1(line), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(2)
    ordered = sorted(rows, key=_sort_key)
    pdf.set_font("Helvetica", "", 7.5)
    with pdf.table(
        col_widths=(16, 52, 22, 20, 18, 58),
        text_align="LEFT",
        line_height=3.6,
        padding=0.6,
        headings_style=FontFace(emphasis="BOLD"),
    ) as table:
        heading = table.row()
        for title in ("Overlay", "File / client ref", "Status", "Label", "Probability", "Reason"):
            heading.cell(title)
        for index, row in enumerate(ordered):
            job = row["job"]
            cells = table.row()
            thumb = thumbnail(job) if job is not None and index < BATCH_THUMBNAILS else None
            if thumb is not None:
                cells.cell(img=thumb, img_fill_width=True)
            else:
                cells.cell("-")
            name = row.get("client_ref") or row.get("filename") or (str(job.id) if job else "-")
            cells.cell(_latin1(str(name)[:80]))
            cells.cell(str(row["status"]))
            cells.cell(str(row.get("label") or "-"))
            probability = row.get("probability")
            cells.cell("-" if probability is None else f"{float(probability):.3f}")
            cells.cell(_latin1(row.get("reason_code") or ""))
    pdf.ln(2)
    pdf.set_font("Helvetica", "B", 8.5)
    pdf.multi_cell(width, 4, DISCLAIMER, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


_ERR = {"$ref": "#/components/responses/Error"}
_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"cookie": []}]
_RENDERING = {
    "description": "Rendered on first request and not ready within LIVERSCAN_REPORT_WAIT_S: "
    '`{id, status: "rendering", message}` with Retry-After; ask again',
}

register_path(
    "/api/v1/jobs/{job_id}/report",
    {
        "get": {
            "summary": "The job's PDF report (S3: redirect to a presigned URL)",
            "parameters": [_ID],
            "security": _SECURITY,
            "responses": {
                "200": {"description": "PDF", "content": {"application/pdf": {}}},
                "302": {"description": "Presigned URL"},
                "202": _RENDERING,
                "401": _ERR,
                "404": _ERR,
            },
        }
    },
)
register_path(
    "/api/v1/batches/{batch_id}/report",
    {
        "get": {
            "summary": "The batch summary PDF: counts and every job, highest probability first",
            "parameters": [{**_ID, "name": "batch_id"}],
            "security": _SECURITY,
            "responses": {
                "200": {"description": "PDF", "content": {"application/pdf": {}}},
                "401": _ERR,
                "404": _ERR,
            },
        }
    },
)
register_path(
    "/api/v1/jobs/{job_id}/fhir",
    {
        "get": {
            "summary": "The job's result as a FHIR R4 DiagnosticReport",
            "parameters": [_ID],
            "security": _SECURITY,
            "responses": {
                "200": {"description": "DiagnosticReport", "content": {FHIR_JSON: {}}},
                "401": _ERR,
                "404": _ERR,
            },
        }
    },
)
register_path(
    "/api/v1/jobs/{job_id}/dicom/{kind}",
    {
        "get": {
            "summary": "DICOM outputs of a DICOM upload: overlay (Secondary Capture) or sr (Basic Text SR)",
            "parameters": [
                _ID,
                {
                    "name": "kind",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": list(DICOM_OBJECTS)},
                },
            ],
            "security": _SECURITY,
            "responses": {
                "200": {"description": "DICOM Part 10 file", "content": {"application/dicom": {}}},
                "302": {"description": "Presigned URL"},
                "202": _RENDERING,
                "401": _ERR,
                "404": _ERR,
                "409": _ERR,
            },
        }
    },
)
