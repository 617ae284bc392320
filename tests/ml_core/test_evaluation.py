"""Evaluation measures: calibration, slice-level threshold, shortcut-free AUCs, ablation, export paths."""

from __future__ import annotations

import numpy as np
import pytest

from ml_core.evaluation import (
    ablate,
    ece,
    fit_platt,
    fit_temperature,
    fit_threshold,
    matched_auc,
    point_hit,
    point_metrics,
    validation_pointing,
    with_intervals,
)


def test_temperature_scaling_fixes_overconfident_logits() -> None:
    """Logits that are 4x too confident get a temperature near 4 and a lower calibration error."""
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(float)
    t = fit_temperature(4 * true_logit, labels)
    assert 3.0 < t < 5.5
    raw = 1 / (1 + np.exp(-4 * true_logit))
    cal = 1 / (1 + np.exp(-4 * true_logit / t))
    assert ece(cal, labels) < ece(raw, labels)
    assert ece(cal, labels) < 0.05


def test_platt_scaling_removes_a_shift_that_temperature_cannot() -> None:
    """Logits shifted up by 5 and 3x too confident (a max over cells) get back T ~ 3, offset ~ 5."""
    rng = np.random.default_rng(1)
    true_logit = rng.normal(0, 2, 4000)
    labels = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(float)
    shifted = 3 * true_logit + 5.0
    t, b = fit_platt(shifted, labels)
    assert 2.5 < t < 3.6 and 4.0 < b < 6.0
    platt = 1 / (1 + np.exp(-(shifted - b) / t))
    temp = 1 / (1 + np.exp(-shifted / fit_temperature(shifted, labels)))
    assert ece(platt, labels) < 0.05 < ece(temp, labels)


def test_threshold_is_fitted_by_youden_j_at_slice_level() -> None:
    """The fitted threshold separates perfectly separable validation scores."""
    probs = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1], float)
    t = fit_threshold(probs, labels)
    m = point_metrics(probs, labels, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_intervals_bracket_the_point_estimate() -> None:
    """Every reported metric comes with a 95% bootstrap interval around its value."""
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(40), np.zeros(20)]
    probs = np.clip(labels * 0.3 + rng.random(60) * 0.7, 0, 1)
    out = with_intervals(probs, labels, 0.5)
    for name in ("accuracy", "precision", "recall", "f1", "auc", "sensitivity", "specificity"):
        lo, hi = out[name]["ci95"]
        assert lo <= out[name]["value"] <= hi


def test_liver_area_matched_auc_removes_the_size_shortcut() -> None:
    """A score that is just liver area looks perfect overall but is near chance on area-matched pairs."""
    rng = np.random.default_rng(2)
    area = np.r_[rng.uniform(8000, 20000, 60), rng.uniform(3000, 12000, 30)]
    labels = np.r_[np.ones(60), np.zeros(30)]
    from ml_core.training import auc

    assert auc(area, labels) > 0.8
    matched, pairs = matched_auc(area, labels, area)
    assert pairs > 100
    assert matched < auc(area, labels)


def test_ablation_inpaints_the_tumor_away() -> None:
    """After ablation the tumor region looks like the surrounding liver, and the rest is unchanged."""
    yy, xx = np.mgrid[0:128, 0:128]
    liver = (yy - 64) ** 2 + (xx - 64) ** 2 < 50**2
    tumor = (yy - 60) ** 2 + (xx - 70) ** 2 < 10**2
    rng = np.random.default_rng(3)
    img = np.where(liver, 165, 40).astype(np.float32) + rng.normal(0, 4, liver.shape)
    img[tumor] -= 30
    img_u8 = np.clip(img, 0, 255).astype(np.uint8)
    out = ablate(img_u8, tumor, liver, np.random.default_rng(0))
    assert abs(float(out[tumor].mean()) - 165) < 8
    assert float(img_u8[tumor].mean()) < 140
    far = ~liver
    assert np.array_equal(out[far], img_u8[far])


def test_dicom_export_path_matches_the_windowed_png_path() -> None:
    """A DICOM CT slice (HU via slope/intercept) decodes through ml_core to the same W400/L50 grey as the PNG path."""
    pytest.importorskip("pydicom")
    from ml_core.evaluation import dicom_roundtrip, png_roundtrip, window_u8

    rng = np.random.default_rng(4)
    hu = rng.integers(-200, 300, (64, 64)).astype(np.int16)
    via_dicom = dicom_roundtrip(hu, 0.7)
    via_png = png_roundtrip(window_u8(hu, 400, 50))
    assert via_dicom.shape == (64, 64)
    assert np.abs(via_dicom.astype(int) - via_png.astype(int)).max() <= 1


def test_heldout_tumor_free_specificity_counts_only_test_patients_and_their_flags() -> None:
    """The held-out specificity uses test-split patients only, counts every flagged slice, and resamples patients."""
    from ml_core.classifier import Classifier
    from ml_core.datasets import load_splits
    from ml_core.evaluation import heldout_negatives

    clf = Classifier.build_untrained(input_size=32)
    none = heldout_negatives(clf, lambda z: np.zeros_like(z), 0.5)
    every = heldout_negatives(clf, lambda z: np.ones_like(z), 0.5)
    splits = load_splits()["patients"]
    assert none["slices"] >= 20 and none["patients"] >= 3
    assert {splits[p] for p in none["per_patient"]} == {"test"}
    assert sum(v["slices"] for v in none["per_patient"].values()) == none["slices"]
    assert none["flagged"] == 0 and none["specificity"]["value"] == 1.0
    assert every["flagged"] == every["slices"] and every["specificity"]["value"] == 0.0
    assert every["specificity"]["ci95"] == [0.0, 0.0]


def test_validation_pointing_counts_heatmap_maxima_inside_the_lesion_masks() -> None:
    """Share of lesioned slices whose heatmap maximum is inside the mask / within 15 px; clean slices ignored."""
    from ml_core.calibration_sets import ValidationSet

    mask = np.zeros((100, 100), bool)
    mask[40:50, 40:50] = True
    on, near, far, flat = (np.zeros((100, 100), np.float32) for _ in range(4))
    on[45, 45] = 1.0
    near[45, 60] = 1.0  # 11 px right of the mask
    far[90, 5] = 1.0
    clean = np.zeros((100, 100), np.float32)
    clean[0, 0] = 1.0
    assert point_hit(on, mask) == (1.0, 1.0)
    assert point_hit(near, mask) == (0.0, 1.0)
    assert point_hit(far, mask) == (0.0, 0.0)
    assert point_hit(flat, mask) == (0.0, 0.0)
    meta = [{"kind": "clean"}] + [
        {"kind": "lesion", "size_class": c, "contrast_class": 0} for c in (0, 1, 2, 2)
    ]
    vset = ValidationSet(
        "t",
        [np.zeros((100, 100), np.uint8)] * 5,
        np.array([0, 1, 1, 1, 1], np.float32),
        np.array([4, 1, 1, 1, 1]),
        meta,
        [None, mask, mask, mask, mask],
    )
    res = validation_pointing([clean, on, near, far, flat], vset, np.array([0, 1, 1, 0, 0], bool))
    assert res is not None
    assert res["lesion_slices"] == 4
    assert res["pointing_game"] == pytest.approx(0.25)
    assert res["pointing_game_within_15px"] == pytest.approx(0.5)
    assert res["pointing_game_by_size_class"] == {"5-15": 1.0, "15-30": 0.0, "30-50": 0.0}
    assert res["pointing_game_detected"] == pytest.approx(0.5) and res["detected"] == 2
    no_masks = ValidationSet("s", vset.slices, vset.labels, vset.weights, meta)
    assert validation_pointing([clean, on, near, far, flat], no_masks) is None


def test_the_calibration_family_changes_the_shown_probability_never_a_label(monkeypatch) -> None:
    """`evaluate --calibration temperature` fixes the offset at 0 where the max head's rule fits
    Platt; the Youden cut lands on the same validation logit, so every slice keeps its label."""
    from types import SimpleNamespace

    from ml_core import evaluation
    from ml_core.calibration_sets import ValidationSet

    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(40), np.ones(40)].astype(np.float32)
    logits = 3 * rng.normal(0, 1.5, 80) + 4 * labels + 2.0  # shifted: a max over cells
    monkeypatch.setattr(evaluation, "_logits", lambda clf, slices: (logits, [None] * len(slices)))
    meta = [{"kind": "lesion" if y else "clean", "source": "s", "patient": "p"} for y in labels]
    vset = ValidationSet(
        "t", [np.zeros((8, 8), np.uint8)] * 80, labels, np.ones(80, np.int64), meta
    )
    clf = SimpleNamespace(head="max", temperature=1.0, logit_offset=0.0, threshold=0.5)
    platt = evaluation.fit_on(clf, vset)
    temp = evaluation.fit_on(clf, vset, family="temperature")
    assert platt["logit_offset"] > 0.5
    assert temp["logit_offset"] == 0.0
    assert temp["temperature"] == pytest.approx(fit_temperature(logits.astype(np.float64), labels))
    assert temp["validation"]["logit_cut"] == pytest.approx(platt["validation"]["logit_cut"])
    for key in ("sensitivity", "specificity"):
        assert temp["validation"][key] == platt["validation"][key]
    assert temp["validation"]["ece"] != platt["validation"]["ece"]
    with pytest.raises(ValueError, match="unknown calibration family"):
        evaluation.fit_on(clf, vset, family="isotonic")
