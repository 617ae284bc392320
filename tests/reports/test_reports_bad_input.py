"""Reports that do not exist are refused with the envelope and an exact code, never an empty file."""

from __future__ import annotations

import uuid

import pytest

from tests.reports.conftest import Stack

ROUTES = ("report", "fhir", "dicom/overlay", "dicom/sr")


def _error(stack: Stack, path: str, headers: dict[str, str]) -> tuple[int, str]:
    r = stack.client.get(path, headers=headers)
    body = r.get_json()
    assert body is not None and set(body) == {"error"}, r.get_data()[:200]
    return r.status_code, str(body["error"]["code"])


def test_rejected_job_has_no_report(stack: Stack) -> None:
    """A rejected upload (not a decodable image) → 404 report_not_found on PDF and FHIR."""
    headers = stack.account()
    job = stack.process(headers, b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "broken.png")
    assert job["status"] == "rejected", job
    for route in ("report", "fhir"):
        assert _error(stack, f"/api/v1/jobs/{job['id']}/{route}", headers) == (
            404,
            "report_not_found",
        )


@pytest.mark.parametrize("route", ROUTES)
def test_queued_job_has_no_report_yet(stack: Stack, liver_dicom: bytes, route: str) -> None:
    """Before the worker finished, every report route is 404 report_not_found."""
    headers = stack.account()
    job_id = stack.submit(headers, liver_dicom, "slice.dcm")
    assert _error(stack, f"/api/v1/jobs/{job_id}/{route}", headers) == (404, "report_not_found")


def test_another_organizations_job_is_not_found(stack: Stack, liver_png: bytes) -> None:
    """Every report of another clinic's job is 404 job_not_found, exactly like the job itself."""
    owner = stack.account("Clinic A")
    job = stack.process(owner, liver_png, "slice.png")
    assert job["status"] == "succeeded"
    other = stack.account("Clinic B")
    for route in ROUTES:
        assert _error(stack, f"/api/v1/jobs/{job['id']}/{route}", other) == (404, "job_not_found")
    assert _error(stack, f"/api/v1/jobs/{uuid.uuid4()}/fhir", owner) == (404, "job_not_found")


def test_dicom_outputs_of_a_png_upload_are_a_conflict(stack: Stack, liver_png: bytes) -> None:
    """A PNG job asking for DICOM outputs → 409 not_dicom; an unknown kind → 404."""
    headers = stack.account()
    job = stack.process(headers, liver_png, "slice.png")
    assert job["status"] == "succeeded"
    for kind in ("overlay", "sr"):
        assert _error(stack, f"/api/v1/jobs/{job['id']}/dicom/{kind}", headers) == (
            409,
            "not_dicom",
        )
    assert _error(stack, f"/api/v1/jobs/{job['id']}/dicom/pixels", headers) == (
        404,
        "report_not_found",
    )
