"""The job JSON of the HTTP contract (DESIGN.md), shared by the API and the worker's webhooks.

Only the links differ between them: the API builds absolute URLs with Flask, the worker (which
has no request and no public host name) relative API paths. Both pass their link builder in.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from api.domain.models import Job, JobStatus

# Public artifact names of a job and the column holding each one's storage key.
ARTIFACTS = ("heatmap", "overlay", "report", "input")


def iso(value: datetime | None) -> str | None:
    """ISO 8601 UTC with a Z suffix, or None."""
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


def artifact_key(job: Job, name: str) -> str | None:
    """The storage key of a job's artifact by public name, or None."""
    return {
        "heatmap": job.heatmap_key,
        "overlay": job.overlay_key,
        "report": job.report_key,
        "input": job.input_key,
    }.get(name)


def job_json(job: Job, *, link: Callable[[str], str | None], status_url: str) -> dict[str, Any]:
    """The job JSON; `link(name)` gives the URL of the heatmap, overlay or report (or None)."""
    validation: dict[str, Any] | None = None
    if job.validation is not None or job.status is JobStatus.REJECTED:
        stored = dict(job.validation or {})
        validation = {
            "passed": bool(stored.get("passed", job.status is not JobStatus.REJECTED)),
            "reason_code": stored.get("reason_code", job.reason_code),
            "checks": list(stored.get("checks", [])),
        }
        if "gate" in stored:
            validation["gate"] = stored["gate"]
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
            "heatmap_url": link("heatmap"),
            "overlay_url": link("overlay"),
            "report_url": link("report"),
        }
    error = None
    if job.status is JobStatus.FAILED:
        error = {"code": job.error_code, "message": job.error_message}
    return {
        "id": str(job.id),
        "status": job.status.value,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "client_ref": job.client_ref,
        "batch_id": str(job.batch_id) if job.batch_id else None,
        "status_url": status_url,
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
