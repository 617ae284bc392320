"""The job page links every report a clinician can download, and the links work with the web session."""

from __future__ import annotations

import re

from tests.reports.conftest import Stack


def _open_page(stack: Stack, headers: dict[str, str], job_id: str) -> str:
    token = headers["Authorization"].removeprefix("Bearer ")
    stack.client.set_cookie("access_token_cookie", token)  # what the web login sets
    r = stack.client.get(f"/jobs/{job_id}")
    assert r.status_code == 200
    return r.get_data(as_text=True)


def _href(html: str, anchor: str) -> str:
    match = re.search(rf'id="{anchor}" href="([^"]+)"', html)
    assert match, anchor
    return match.group(1).replace("&amp;", "&")


def test_dicom_job_page_links_pdf_fhir_and_dicom_outputs(stack: Stack, liver_dicom: bytes) -> None:
    """PDF, FHIR, DICOM SC and SR links on the page; each opens with the session cookie alone."""
    headers = stack.account()
    job = stack.process(headers, liver_dicom, "slice.dcm")
    assert job["status"] == "succeeded", job
    html = _open_page(stack, headers, job["id"])
    assert stack.download(_href(html, "report-pdf"), {}).startswith(b"%PDF")
    r = stack.client.get(_href(html, "report-fhir"))
    assert r.status_code == 200 and r.get_json()["resourceType"] == "DiagnosticReport"
    for anchor in ("report-dicom-sc", "report-dicom-sr"):
        assert stack.download(_href(html, anchor), {})[128:132] == b"DICM"


def test_png_job_page_offers_no_dicom_outputs(stack: Stack, liver_png: bytes) -> None:
    """A PNG upload's page links the PDF and FHIR report but no DICOM outputs."""
    headers = stack.account()
    job = stack.process(headers, liver_png, "slice.png")
    html = _open_page(stack, headers, job["id"])
    assert 'id="report-pdf"' in html and 'id="report-fhir"' in html
    assert "report-dicom" not in html
