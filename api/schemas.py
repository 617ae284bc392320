"""Serialisation of jobs to the JSON of the HTTP contract (DESIGN.md)."""

from __future__ import annotations

from typing import Any

from flask import url_for

from api.domain.models import Job
from api.domain.serialize import artifact_key, iso, job_json
from api.domain.storage import Storage


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
    """The job JSON of the contract, with absolute links."""

    def link(name: str) -> str | None:
        if name == "report":
            # Stable (filed reports outlive presigned URLs); on S3 the route redirects to one.
            # Rendered on the first GET (api/reports.py), so a job with an overlay has one.
            if not (job.report_key or job.overlay_key):
                return None
            return url_for("reports.report_pdf", job_id=job.id, _external=True)
        return artifact_url(job, name, storage, expires_s)

    return job_json(job, link=link, status_url=status_url(job))


def job_created(job: Job) -> dict[str, Any]:
    """The 202 body of a submit."""
    return {
        "id": str(job.id),
        "status": job.status.value,
        "status_url": status_url(job),
        "created_at": iso(job.created_at),
    }
