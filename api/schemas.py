"""Serialisation of jobs to the JSON of the HTTP contract (DESIGN.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import url_for

from api.domain.models import Job, JobStatus
from api.domain.storage import Storage

ARTIFACTS = ("heatmap", "overlay", "report", "input")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def artifact_key(job: Job, name: str) -> str | None:
    """The storage key of a job's artifact by public name, or None."""
    return {
        "heatmap": job.heatmap_key,
        "overlay": job.overlay_key,
        "report": job.report_key,
        "input": job.input_key,
    }.get(name)


def artifact_url(job: Job, name: str, storage: Storage, expires_s: int) -> str | None:
    """A presigned URL (S3) or the authenticated artifact route (local store), or None."""
    key = artifact_key(job, name)
    if key is None:
        return None
    direct = storage.url_for(key, expires_s)
    if direct is not None:
        return direct
    return url_for("jobs.artifact", job_id=job.id, name=name, _external=True)


def status_url(job: Job) -> str:
    """The polling URL of a job."""
    return url_for("jobs.get_job", job_id=job.id, _external=True)


def job_read(job: Job, storage: Storage, *, expires_s: int = 900) -> dict[str, Any]:
    """The job JSON of the contract."""
    validation: dict[str, Any] | None = None
    if job.validation is not None or job.status is JobStatus.REJECTED:
        stored = dict(job.validation or {})
        validation = {
            "passed": bool(stored.get("passed", job.status is not JobStatus.REJECTED)),
            "reason_code": stored.get("reason_code", job.reason_code),
            "checks": list(stored.get("checks", [])),
        }
        for extra in ("gate",):
            if extra in stored:
                validation[extra] = stored[extra]
    result: dict[str, Any] | None = None
    if job.status is JobStatus.SUCCEEDED:
        result = {
            "label": job.label,
            "probability": job.probability,
            "threshold": job.threshold,
            "model": {
                "name": job.model_name,
                "version": job.model_version,
                "sha256": job.model_sha256,
            },
            "heatmap_url": artifact_url(job, "heatmap", storage, expires_s),
            "overlay_url": artifact_url(job, "overlay", storage, expires_s),
            # Stable (filed reports outlive presigned URLs); on S3 the route redirects to one.
            "report_url": (
                url_for("reports.report_pdf", job_id=job.id, _external=True)
                if job.report_key
                else None
            ),
        }
    error = None
    if job.status is JobStatus.FAILED:
        error = {"code": job.error_code, "message": job.error_message}
    return {
        "id": str(job.id),
        "status": job.status.value,
        "created_at": _iso(job.created_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "client_ref": job.client_ref,
        "batch_id": str(job.batch_id) if job.batch_id else None,
        "status_url": status_url(job),
        "input": {
            "filename": job.input_filename,
            "sha256": job.input_sha256,
            "size": job.input_size,
            "content_type": job.input_content_type,
            "format": job.input_format,
            "width": job.input_width,
            "height": job.input_height,
            "modality": job.input_modality,
        },
        "validation": validation,
        "result": result,
        "error": error,
    }


def job_created(job: Job) -> dict[str, Any]:
    """The 202 body of a submit."""
    return {
        "id": str(job.id),
        "status": job.status.value,
        "status_url": status_url(job),
        "created_at": _iso(job.created_at),
    }
