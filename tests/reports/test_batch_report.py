"""The batch summary PDF: counts and every file, the highest-probability slices first."""

from __future__ import annotations

import io
import re

import numpy as np
from pypdf import PdfReader

from tests.reports.conftest import Stack
from worker import pipeline


def test_batch_summary_lists_every_job_highest_probability_first(
    stack: Stack, liver_png: bytes, liver_hu: np.ndarray
) -> None:
    """Two screened slices, one undecodable file: counts, rows sorted by probability, the reason shown."""
    from ml_core.overlay import encode_png
    from ml_core.preprocessing import window

    headers = stack.account()
    second = encode_png(window(np.flipud(liver_hu)))
    files = [
        (io.BytesIO(liver_png), "a.png"),
        (io.BytesIO(second), "b.png"),
        (io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), "broken.png"),
    ]
    r = stack.client.post(
        "/api/v1/batches",
        headers=headers,
        data={"file": files, "client_ref": ["ref-a", "ref-b", "ref-broken"]},
        content_type="multipart/form-data",
    )
    assert r.status_code == 202, r.get_json()
    batch = r.get_json()
    for job_id in batch["job_ids"]:
        pipeline.run(job_id, context=stack.ctx)
    state = stack.client.get(f"/api/v1/batches/{batch['id']}", headers=headers).get_json()

    r = stack.client.get(f"/api/v1/batches/{batch['id']}/report", headers=headers)
    assert r.status_code == 200 and r.mimetype == "application/pdf"
    reader = PdfReader(io.BytesIO(r.get_data()))
    text = "\n".join(page.extract_text() for page in reader.pages)
    succeeded = [j for j in state["jobs"] if j["status"] == "succeeded"]
    assert len(succeeded) == 2 and "Succeeded: 2" in text and "Rejected: 1" in text
    ranked = sorted(succeeded, key=lambda j: -j["probability"])
    positions = [text.index(j["client_ref"]) for j in ranked]
    assert positions == sorted(positions), "highest probability first"
    for job in succeeded:
        assert f"{job['probability']:.3f}" in text
    (rejected,) = [j for j in state["jobs"] if j["status"] == "rejected"]
    assert re.search(rf"ref-broken.*{rejected['reason_code']}", text, re.S)
    assert text.index("ref-broken") > max(positions)
    assert len(reader.pages[0].images) >= 2  # a thumbnail per screened slice
    assert "Decision support only" in text


def test_another_organizations_batch_report_is_not_found(stack: Stack, liver_png: bytes) -> None:
    """The summary of another clinic's batch is a 404 with the batch's not-found code."""
    owner = stack.account("Clinic A")
    r = stack.client.post(
        "/api/v1/batches",
        headers=owner,
        data={"file": [(io.BytesIO(liver_png), "a.png")]},
        content_type="multipart/form-data",
    )
    assert r.status_code == 202
    other = stack.account("Clinic B")
    r = stack.client.get(f"/api/v1/batches/{r.get_json()['id']}/report", headers=other)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "batch_not_found"
