"""The FHIR R4 DiagnosticReport of a job, validated with fhir.resources (R4B models)."""

from __future__ import annotations

import json

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from tests.reports.conftest import Stack

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_fhir_diagnostic_report_carries_the_result(stack: Stack, liver_png: bytes) -> None:
    """A valid DiagnosticReport: LOINC code, Observations for probability and label, overlay Media, PDF."""
    headers = stack.account()
    job = stack.process(headers, liver_png, "slice.png", client_ref="ward7-0042")
    assert job["status"] == "succeeded", job
    r = stack.client.get(f"/api/v1/jobs/{job['id']}/fhir", headers=headers)
    assert r.status_code == 200 and r.mimetype == "application/fhir+json"
    body = json.loads(r.get_data())

    parsed = DiagnosticReport.model_validate(body)  # raises on any R4(B) structure error
    assert parsed.status == "final"
    assert [(c.system, c.code) for c in parsed.code.coding] == [("http://loinc.org", "18748-4")]
    assert parsed.subject is None  # de-identified: no patient is named
    assert body["identifier"][0]["value"] == f"urn:uuid:{job['id']}"
    assert {"system": "urn:liverscan:client-ref", "value": "ward7-0042"} in body["identifier"]

    contained = {res["id"]: res for res in body["contained"]}
    refs = [ref["reference"].removeprefix("#") for ref in body["result"]]
    observations = [contained[ref] for ref in refs]
    assert all(o["resourceType"] == "Observation" for o in observations)
    quantity = next(o["valueQuantity"] for o in observations if "valueQuantity" in o)
    assert quantity["value"] == round(job["result"]["probability"], 6)
    assert (quantity["system"], quantity["code"]) == ("http://unitsofmeasure.org", "1")
    label = next(o["valueCodeableConcept"] for o in observations if "valueCodeableConcept" in o)
    expected = "126851005" if job["result"]["label"] == "tumor" else "281900007"
    assert label["coding"][0] == {
        "system": "http://snomed.info/sct",
        "code": expected,
        "display": "Neoplasm of liver" if expected == "126851005" else "No abnormality detected",
    }
    assert label["text"] == job["result"]["label"]
    device = contained["model"]
    assert device["version"][0]["value"] == job["result"]["model"]["version"]
    assert device["identifier"][0]["value"] == job["result"]["model"]["sha256"]
    assert "Decision support only" in body["conclusion"]

    (media_link,) = body["media"]
    media = contained[media_link["link"]["reference"].removeprefix("#")]
    assert media["resourceType"] == "Media" and media["content"]["contentType"] == "image/png"
    assert stack.download(media["content"]["url"], headers).startswith(PNG_MAGIC)
    (form,) = body["presentedForm"]
    assert form["contentType"] == "application/pdf"
    assert stack.download(form["url"], headers).startswith(b"%PDF")
