"""The PDF report a clinic files: rendered by the worker, downloadable from the job's report_url."""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime

import numpy as np
from pypdf import PdfReader

from ml_core.classifier import default_model_path
from ml_core.overlay import overlay_png
from ml_core.types import ModelInfo
from tests.reports.conftest import Stack
from worker import reports


def _text(pdf: bytes) -> str:
    reader = PdfReader(io.BytesIO(pdf))
    return "\n".join(page.extract_text() for page in reader.pages)


def test_job_report_url_leads_to_a_pdf_with_the_result(stack: Stack, liver_png: bytes) -> None:
    """report_url (and /report) → a PDF naming label, probability, threshold, model, checks, job, client ref."""
    headers = stack.account()
    job = stack.process(headers, liver_png, "slice.png", client_ref="ward7-0042")
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert result["report_url"]

    pdf = stack.download(result["report_url"], headers)
    assert pdf.startswith(b"%PDF")
    assert stack.download(f"/api/v1/jobs/{job['id']}/report", headers) == pdf
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) <= 2
    text = _text(pdf)
    headline = "Tumor suspected" if result["label"] == "tumor" else "No tumor detected"
    assert headline in text and f"label: {result['label']}" in text
    assert f"{result['probability']:.3f}" in text and f"{result['threshold']:.3f}" in text
    for value in (result["model"]["name"], result["model"]["version"], result["model"]["sha256"]):
        assert value in text
    assert job["id"] in text and "ward7-0042" in text
    for check in job["validation"]["checks"]:
        assert check["name"].replace("_", " ") in text
    assert "Decision support only, not a diagnosis" in text
    assert "Submitted" in text and "Report generated" in text
    # The tiny test model has no card, so the report says so instead of borrowing figures.
    assert "No held-out test-set performance is recorded" in text
    # Two images (scan, overlay) and the colour scale are embedded on the first page.
    assert len(reader.pages[0].images) >= 3


def test_pdf_shows_the_shipped_models_validated_performance_with_intervals() -> None:
    """With the shipped model card, the report lists its test-set AUC with the 95% interval."""
    folder = default_model_path()
    card = json.loads((folder / "model_card.json").read_text())
    info = ModelInfo(card["name"], card["version"], card["sha256"])
    assert reports.read_card(folder, info) == card
    assert reports.read_card(folder, ModelInfo(info.name, info.version, "0" * 64)) is None
    # Same weights, other version (e.g. a recalibrated card): not this card's figures either.
    assert reports.read_card(folder, ModelInfo(info.name, "0.0.1", info.sha256)) is None

    grey = np.tile(np.linspace(0, 255, 128, dtype=np.float32), (128, 1)).astype(np.uint8)
    heat = np.zeros((128, 128), np.float32)
    heat[40:80, 40:80] = 1.0
    r = reports.ReportInput(
        job_id=uuid.uuid4(), client_ref=None, created_at=datetime.now(UTC), started_at=None,
        input_format="png", modality=None, width=128, height=128, input_sha256="ab" * 32,
        label="tumor", probability=0.91, threshold=card["threshold"], model=info,
        checks=[{"name": "content", "passed": True, "detail": "liver slice score 0.97 ≥ 0.944"}],
        slice_u8=grey, heatmap=heat, card=card,
    )  # fmt: skip
    text = _text(reports.render_pdf(r, overlay_png(grey, heat)))
    auc = card["metrics"]["auc"]
    lo, hi = auc["ci95"]
    assert f"{auc['value']:.2f} (95% CI {lo:.2f}-{hi:.2f})" in text
    assert "Tumor-ablation AUC" in text and "Liver-area-matched AUC" in text
    assert "0.97 >= 0.944" in text  # non-Latin-1 signs are spelled out, never dropped
    assert card["intended_use"] in text
