"""The performance page: the shipped model card drawn server-side, and live figures per organization."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from api.app import create_app
from api.domain.db import make_engine, make_session_factory
from api.domain.models import Job, JobStatus, Organization, utcnow
from api.domain.settings import Settings
from tests.web.live import PASSWORD, LiveServer, unique_email

CARD = {
    "name": "liverscan-b0",
    "version": "2026.11.28",
    "sha256": "ab" * 32,
    "threshold": 0.42,
    "metrics": {
        "validation": {"accuracy": 0.99},
        "test": {
            "accuracy": {"value": 0.91, "ci95": [0.86, 0.95]},
            "precision": 0.88,
            "precision_ci": [0.8, 0.93],
            "recall": [0.9, 0.84, 0.95],
            "f1": {"value": 0.89, "low": 0.83, "high": 0.93},
            "auc": {"value": 0.94, "ci": {"low": 0.9, "high": 0.97}},
            "ece": 0.05,
            "confusion_matrix": {"tn": 40, "fp": 5, "fn": 4, "tp": 37},
            "roc": {"fpr": [0.0, 0.1, 0.3, 1.0], "tpr": [0.0, 0.7, 0.9, 1.0]},
            "reliability": {"bins": [
                {"confidence": 0.1, "observed": 0.12, "count": 30},
                {"confidence": 0.5, "observed": 0.45, "count": 20},
                {"confidence": 0.9, "observed": 0.93, "count": 36},
            ]},
        },
    },
    "localisation": {"pointing_game": 0.78, "energy_in_liver": 0.81},
    "training": {"data": [
        {"data": "3D-IRCADb-01", "source": "IRCAD France", "licence": "CC BY-NC-ND 4.0"},
        {"data": "CHAOS CT", "source": "CHAOS challenge", "licence": "CC BY-NC-SA 4.0"},
    ]},
}  # fmt: skip


def _client(live_server: LiveServer, model_path: Path) -> FlaskClient:
    settings = live_server.settings.model_copy(update={"model_path": model_path})
    return create_app(settings).test_client()


def _log_in(client: FlaskClient, email: str) -> None:
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
    assert token is not None
    resp = client.post(
        "/login", data={"csrf_token": token.group(1), "email": email, "password": PASSWORD}
    )
    assert resp.status_code == 302


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.fixture
def signed_in(live_server: LiveServer, tmp_path: Path) -> tuple[str, Path]:
    email = unique_email("perf")
    live_server.api_signup(email, "Clinic Performance")
    return email, tmp_path


def test_model_card_metrics_intervals_and_plots_are_shown(
    live_server: LiveServer, signed_in: tuple[str, Path]
) -> None:
    email, tmp = signed_in
    folder = tmp / "models" / "liverscan-b0-2026.11.28"
    folder.mkdir(parents=True)
    (folder / "model_card.json").write_text(json.dumps(CARD))
    (tmp / "models" / "CURRENT").write_text(folder.name + "\n")
    client = _client(live_server, tmp / "models")
    _log_in(client, email)
    resp = client.get("/performance")
    assert resp.status_code == 200
    text = _text(resp.text)
    assert "liverscan-b0 version 2026.11.28" in text
    assert "Decision threshold 0.420" in text
    # The held-out test figures, not the validation ones, each with its interval.
    assert "Accuracy 0.910 0.860 – 0.950" in text
    assert "Precision 0.880 0.800 – 0.930" in text
    assert "Recall (sensitivity) 0.900 0.840 – 0.950" in text
    assert "F1 0.890 0.830 – 0.930" in text
    assert "AUC 0.940 0.900 – 0.970" in text
    assert "Expected calibration error 0.050 not reported" in text
    assert "Actual normal 40 5 Actual tumor 4 37" in text
    assert 'aria-label="ROC curve (AUC 0.940)"' in resp.text
    assert 'aria-label="Reliability (ECE 0.050)"' in resp.text
    assert resp.text.count("<circle") == 3
    assert "pointing game 0.78" in text
    assert "CC BY-NC-ND 4.0" in text and "CC BY-NC-SA 4.0" in text
    assert "<script" not in resp.text.split("</main>")[0]  # no inline script: CSP-ready


def test_missing_model_card_is_said_plainly(
    live_server: LiveServer, signed_in: tuple[str, Path]
) -> None:
    email, tmp = signed_in
    client = _client(live_server, tmp / "no-models-here")
    _log_in(client, email)
    resp = client.get("/performance")
    assert resp.status_code == 200
    assert "No model card shipped" in resp.text
    assert "Live figures for your organization" in resp.text


def test_card_without_metrics_says_so_and_still_shows_what_it_has(
    live_server: LiveServer, signed_in: tuple[str, Path]
) -> None:
    email, tmp = signed_in
    (tmp / "m").mkdir()
    card = {
        "name": "liverscan-lite0",
        "version": "0.1.0",
        "threshold": 0.5,
        "training": EVALUATED_CARD["training"],
    }
    (tmp / "m" / "model_card.json").write_text(json.dumps(card))
    client = _client(live_server, tmp / "m")
    _log_in(client, email)
    text = _text(client.get("/performance").text)
    assert "reports no test-set metrics yet" in text
    assert "liverscan-lite0 version 0.1.0" in text
    assert "CC BY-NC-ND 4.0" in text


def test_unreadable_model_card_is_treated_as_absent(
    live_server: LiveServer, signed_in: tuple[str, Path]
) -> None:
    email, tmp = signed_in
    (tmp / "m").mkdir()
    (tmp / "m" / "model_card.json").write_text("{not json")
    client = _client(live_server, tmp / "m")
    _log_in(client, email)
    assert "No model card shipped" in client.get("/performance").text


def test_live_figures_count_only_the_callers_organization(
    live_server: LiveServer, signed_in: tuple[str, Path]
) -> None:
    email, tmp = signed_in
    settings: Settings = live_server.settings
    engine = make_engine(settings)
    sessions = make_session_factory(engine)
    now = utcnow()
    with sessions.begin() as session:
        from api.domain.models import User

        user = session.query(User).filter_by(email=email).one()
        other = Organization(name="Someone else", webhook_secret="x")
        session.add(other)
        session.flush()

        def job(
            org_id: uuid.UUID, status: JobStatus, seconds: float, reason: str | None = None
        ) -> Job:
            return Job(
                org_id=org_id, status=status, input_key=f"{org_id}/{uuid.uuid4()}/input", input_sha256="0" * 64,
                created_at=now - timedelta(seconds=seconds + 60), finished_at=now - timedelta(seconds=60),
                reason_code=reason,
            )  # fmt: skip

        session.add_all([
            job(user.org_id, JobStatus.SUCCEEDED, 2.0),
            job(user.org_id, JobStatus.SUCCEEDED, 4.0),
            job(user.org_id, JobStatus.REJECTED, 1.0, "not_grayscale"),
            job(user.org_id, JobStatus.REJECTED, 3.0, "not_liver_ct"),
            *[job(other.id, JobStatus.REJECTED, 9.0, "unsupported_format") for _ in range(5)],
        ])  # fmt: skip
    engine.dispose()
    client = _client(live_server, tmp / "none")
    _log_in(client, email)
    text = _text(client.get("/performance").text)
    assert "Jobs in the last 14 days 4" in text
    assert "Median time to result 2.5 s" in text
    assert "Rejection rate 50.0% of 4 finished jobs" in text
    assert "The image is in colour; CT and MR slices are grayscale." in text
    assert "unsupported_format" not in text  # another clinic's rejections are not shown


# The shape `python -m ml_core evaluate --update-card` writes (ml_core/evaluation.py: update_card).
EVALUATED_CARD = {
    "name": "liverscan-lite0",
    "version": "1.0.0",
    "sha256": "cd" * 32,
    "threshold": 0.37,
    "temperature": 1.4,
    "calibration": {"threshold": 0.37, "validation": {"n": 400, "auc": 0.99, "accuracy": 0.97}},
    "metrics": {
        "accuracy": {"value": 0.83, "ci95": [0.76, 0.9]},
        "precision": {"value": 0.85, "ci95": [0.77, 0.93]},
        "recall": {"value": 0.87, "ci95": [0.79, 0.94]},
        "sensitivity": {"value": 0.87, "ci95": [0.79, 0.94]},
        "specificity": {"value": 0.75, "ci95": [0.58, 0.9]},
        "f1": {"value": 0.86, "ci95": [0.8, 0.91]},
        "auc": {"value": 0.9, "ci95": [0.84, 0.95]},
        "ece": 0.07,
        "n": {"tumor": 74, "no_tumor": 24},
        "confusion": {"tp": 64, "fp": 6, "tn": 18, "fn": 10},
        "baselines": {"liver_area_auc": 0.89, "slice_position_auc": 0.92},
        "liver_area_matched_auc": {"value": 0.81, "pairs": 40, "liver_area_on_same_pairs": 0.5},
        "tumor_ablation_auc": {"value": 0.86, "share_score_drops": 0.86, "pairs": 74},
    },
    "localisation": {"pointing_game": 0.71, "energy_in_liver": 0.8, "energy_in_tumor": 0.3},
    "per_format": {
        "png": {"auc": 0.9, "sensitivity": 0.87},
        "jpeg_q90": {"auc": 0.89, "sensitivity": 0.86},
    },
    "per_window": {
        "W350/L40": {"auc": 0.88, "matched_auc": 0.8},
        "W400/L60": {"auc": 0.9, "matched_auc": 0.81},
    },
    "training": {
        "data": [{"data": "3D-IRCADb-01", "source": "IRCAD France", "licence": "CC BY-NC-ND 4.0"}]
    },
}
PLOT = '<svg xmlns="http://www.w3.org/2000/svg" width="320" height="320"><polyline points="40,290 300,30"/></svg>'


def test_card_written_by_ml_core_evaluate_is_drawn_with_its_plots(
    live_server: LiveServer, signed_in: tuple[str, Path]
) -> None:
    email, tmp = signed_in
    folder = tmp / "models" / "liverscan-lite0-1.0.0"
    (folder / "eval").mkdir(parents=True)
    (folder / "model_card.json").write_text(json.dumps(EVALUATED_CARD))
    (folder / "eval" / "roc.svg").write_text(PLOT)
    (folder / "eval" / "reliability.svg").write_text(PLOT)
    (tmp / "models" / "CURRENT").write_text(folder.name + "\n")
    client = _client(live_server, tmp / "models")
    _log_in(client, email)
    html = client.get("/performance").text
    text = _text(html)
    assert "Decision threshold 0.370" in text
    assert "Held-out test slices: 74 tumor, 24 no tumor." in text
    assert "Accuracy 0.830 0.760 – 0.900" in text  # the test set's, not the validation's 0.97
    assert "Liver-area-matched AUC 0.810 not reported" in text
    assert "Tumor-ablation AUC 0.860 not reported" in text
    assert "Baseline: liver area alone, AUC 0.890" in text
    assert "Actual normal 18 6 Actual tumor 10 64" in text
    assert "jpeg_q90 0.890 0.860" in text
    assert "W350/L40 0.880 0.800" in text
    assert "pointing game 0.71" in text
    plot = client.get("/performance/plots/roc.svg")
    assert plot.status_code == 200 and plot.mimetype == "image/svg+xml"
    assert 'src="/performance/plots/reliability.svg"' in html
    assert client.get("/performance/plots/weights.svg").status_code == 404
