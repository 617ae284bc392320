"""Evaluate a model artifact honestly (``python -m ml_core evaluate``): metrics JSON + SVG plots.

Threshold and temperature are fitted at SLICE level on a validation set of the val patients
of ml_core/splits.json (full slices through the serving path; ml_core/calibration_sets.py):
by default the "realistic" set (real tumor-free val slices, and copies with one synthetic
lesion from faint and small to strong and large), optionally the old "synthetic" one (val
backgrounds clean and with training-like lesions); both are always reported. Temperature
(and, for the max head, a logit offset: Platt scaling) by minimum negative log-likelihood,
threshold by Youden's J (sensitivity + specificity - 1, ties -> the lower threshold).
The test is the real tumors of 3Dircadb1.1 (never trained on; slices with liver area >= 3000
px), reported beside the two shortcut baselines (liver area, slice position) and the two
shortcut-free measures:
liver-area-matched AUC (tumor/no-tumor pairs whose liver areas differ < 1.5x) and
tumor-ablation AUC (each tumor slice against itself with the tumor inpainted away by OpenCV
Telea on the dilated mask plus matched noise). Per export format (PNG, JPEG q90, DICOM
through ml_core.decoding) and per window (W350-400 / L40-60). Localisation: pointing game and
heatmap energy share inside the liver and inside the tumor; on validation, the pointing game
over the realistic set's synthetic lesions (whose masks are known), for model choices made
without the test patient.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ml_core.calibration_sets import (
    CONTRAST_CLASSES_HU,
    NAMES,
    SIZE_CLASSES_MM,
    ValidationSet,
    realistic_set,
    render_w400,
)
from ml_core.classifier import CARD, Classifier, calibrated_probability, seal_card
from ml_core.training import DATA_DIR, auc, load_backgrounds, split

log = logging.getLogger(__name__)

MIN_TEST_LIVER_PX = 3000
WINDOWS: tuple[tuple[float, float], ...] = ((400, 50), (350, 40), (350, 60), (400, 40), (400, 60))
N_BOOT = 1000


# ---------------------------------------------------------------- metrics


def confusion(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts tp, fp, tn, fn of ``probs >= threshold`` against labels (0/1)."""
    pred = probs >= threshold
    y = labels > 0.5
    return {
        "tp": int((pred & y).sum()),
        "fp": int((pred & ~y).sum()),
        "tn": int((~pred & ~y).sum()),
        "fn": int((~pred & y).sum()),
    }


def point_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall (= sensitivity), specificity, F1 and AUC at a threshold."""
    c = confusion(probs, labels, threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * prec * sens / (prec + sens) if (tp and prec + sens) else 0.0
    return {
        "accuracy": (tp + tn) / max(1, tp + fp + tn + fn),
        "precision": prec,
        "recall": sens,
        "sensitivity": sens,
        "specificity": spec,
        "f1": f1,
        "auc": auc(probs, labels),
    }


def with_intervals(
    probs: np.ndarray, labels: np.ndarray, threshold: float, seed: int = 0
) -> dict[str, Any]:
    """point_metrics with stratified bootstrap 95% intervals: {metric: {"value", "ci95": [lo, hi]}}."""
    rng = np.random.default_rng(seed)
    base = point_metrics(probs, labels, threshold)
    pos, neg = np.nonzero(labels > 0.5)[0], np.nonzero(labels <= 0.5)[0]
    boots: dict[str, list[float]] = {k: [] for k in base}
    for _ in range(N_BOOT):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        for k, v in point_metrics(probs[idx], labels[idx], threshold).items():
            boots[k].append(v)
    out: dict[str, Any] = {}
    for k, v in base.items():
        arr = np.asarray(boots[k], float)
        arr = arr[~np.isnan(arr)]
        ci = (
            [float(np.percentile(arr, 2.5)), float(np.percentile(arr, 97.5))]
            if arr.size
            else [None, None]
        )
        out[k] = {"value": float(v), "ci95": ci}
    return out


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over equal-width probability bins."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (probs >= lo) & ((probs < hi) if hi < 1 else (probs <= hi))
        if m.any():
            total += m.mean() * abs(float(probs[m].mean()) - float(labels[m].mean()))
    return float(total)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Per-bin mean predicted probability, observed frequency and count."""
    edges = np.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (probs >= lo) & ((probs < hi) if hi < 1 else (probs <= hi))
        if m.any():
            out.append(
                {"p": float(probs[m].mean()), "freq": float(labels[m].mean()), "n": int(m.sum())}
            )
    return out


def roc_points(scores: np.ndarray, labels: np.ndarray) -> list[tuple[float, float]]:
    """ROC curve points (fpr, tpr) from the highest threshold down."""
    order = np.argsort(-scores, kind="stable")
    y = labels[order] > 0.5
    tps, fps = np.cumsum(y), np.cumsum(~y)
    p, n = max(1, int(y.sum())), max(1, int((~y).sum()))
    return [(0.0, 0.0)] + [(float(f / n), float(t / p)) for f, t in zip(fps, tps, strict=True)]


def _nll(z: np.ndarray, y: np.ndarray, temperature: float, offset: float = 0.0) -> float:
    """Mean negative log-likelihood of sigmoid((z - offset) / temperature) for labels y."""
    u = (z - offset) / temperature
    return float(np.mean(np.logaddexp(0.0, u) - y * u))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of sigmoid(logit / T) (grid, log-spaced)."""
    best_t, best = 1.0, float("inf")
    for t in np.exp(np.linspace(np.log(0.05), np.log(50.0), 400)):
        nll = _nll(logits, labels, float(t))
        if nll < best:
            best_t, best = float(t), nll
    return best_t


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Temperature T and offset b minimising the NLL of sigmoid((logit - b) / T) (Platt scaling).

    Newton's method on the two-parameter logistic regression (tiny L2 for stability). The max
    head's slice logit is a maximum over 64 cells, which shifts every score up: temperature
    alone cannot remove a shift. Falls back to (fit_temperature, 0) if the fit is not increasing.
    """
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    x = np.stack([z, np.ones_like(z)], axis=1)
    w = np.array([1.0 / max(fit_temperature(z, y), 1e-3), 0.0])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / len(y) + 1e-4 * w
        hess = (x.T * (p * (1 - p))) @ x / len(y) + 1e-4 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w = w - step
        if float(np.abs(step).max()) < 1e-10:
            break
    a, c = float(w[0]), float(w[1])
    if not np.isfinite(a) or not np.isfinite(c) or a <= 1e-6:
        return fit_temperature(z, y), 0.0
    return 1.0 / a, -c / a


def fit_threshold(probs: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising Youden's J on validation probabilities (the lowest among ties)."""
    best_t, best_j = 0.5, -2.0
    for t in np.unique(probs):
        m = point_metrics(probs, labels, float(t))
        j = m["sensitivity"] + m["specificity"] - 1
        if j > best_j + 1e-12:
            best_t, best_j = float(t), j
    return best_t


def point_hit(heat: np.ndarray, mask: np.ndarray, near_px: float = 15.0) -> tuple[float, float]:
    """Pointing game of one full-slice heatmap: (max inside ``mask``, max within ``near_px`` of it) as 0/1.

    The maximum is the first pixel of np.argmax; a heatmap that is 0 everywhere scores (0, 0).
    """
    import cv2

    if heat.max() <= 0:
        return 0.0, 0.0
    yy, xx = np.unravel_index(int(np.argmax(heat)), heat.shape)
    dist = cv2.distanceTransform((~mask.astype(bool)).astype(np.uint8), cv2.DIST_L2, 5)
    return float(mask[yy, xx]), float(dist[yy, xx] <= near_px)


def validation_pointing(
    heat: list[np.ndarray], vset: ValidationSet, threshold_hits: np.ndarray | None = None
) -> dict[str, Any] | None:
    """Validation pointing game over the lesioned slices of a set that keeps lesion masks; None otherwise.

    Share of lesioned slices whose full-slice heatmap maximum lies inside the synthetic lesion
    mask, and within 15 px of it, overall and per size and contrast class (every lesioned slice
    counts, detected or not; ``threshold_hits`` (N,) bool adds the share among those above the
    threshold).
    """
    rows = [i for i, m in enumerate(vset.masks or []) if m is not None and m.any()]
    if not rows:
        return None
    hit = np.zeros(len(vset.slices))
    near = np.zeros(len(vset.slices))
    for i in rows:
        hit[i], near[i] = point_hit(heat[i], vset.masks[i])
    out: dict[str, Any] = {
        "lesion_slices": len(rows),
        "pointing_game": float(hit[rows].mean()),
        "pointing_game_within_15px": float(near[rows].mean()),
    }
    for key, classes in (("size_class", SIZE_CLASSES_MM), ("contrast_class", CONTRAST_CLASSES_HU)):
        by: dict[str, float] = {}
        for c, (lo, hi) in enumerate(classes):
            sel = [i for i in rows if vset.meta[i].get(key) == c]
            if sel:
                by[f"{lo:g}-{hi:g}"] = float(hit[sel].mean())
        out[f"pointing_game_by_{key}"] = by
    if threshold_hits is not None:
        sel = [i for i in rows if threshold_hits[i]]
        out["pointing_game_detected"] = float(hit[sel].mean()) if sel else None
        out["detected"] = len(sel)
    return out


def matched_auc(
    scores: np.ndarray, labels: np.ndarray, area: np.ndarray, ratio: float = 1.5
) -> tuple[float, int]:
    """Concordance over tumor/no-tumor pairs whose liver areas differ by less than ``ratio``; (auc, pairs)."""
    pos, neg = np.nonzero(labels > 0.5)[0], np.nonzero(labels <= 0.5)[0]
    num, n = 0.0, 0
    for i in pos:
        for j in neg:
            r = max(area[i], area[j]) / max(1.0, min(area[i], area[j]))
            if r < ratio:
                n += 1
                num += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
    return (num / n if n else float("nan")), n


# ---------------------------------------------------------------- data


def window_u8(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """HU -> uint8 through ml_core.preprocessing.window (the serving path)."""
    from ml_core.preprocessing import window

    return window(hu.astype(np.float32), width=width, level=level)


def jpeg_roundtrip(img: np.ndarray, quality: int = 90) -> np.ndarray:
    """Encode and decode a uint8 slice as JPEG through ml_core.decoding (as an upload would be)."""
    import cv2

    from ml_core.decoding import decode
    from ml_core.preprocessing import to_slice_u8

    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return to_slice_u8(decode(enc.tobytes()))


def png_roundtrip(img: np.ndarray) -> np.ndarray:
    """Encode and decode a uint8 slice as PNG through ml_core.decoding."""
    import cv2

    from ml_core.decoding import decode
    from ml_core.preprocessing import to_slice_u8

    ok, enc = cv2.imencode(".png", img)
    assert ok
    return to_slice_u8(decode(enc.tobytes()))


def dicom_roundtrip(hu: np.ndarray, spacing: float) -> np.ndarray:
    """Write an HU slice as a CT DICOM (slope 1, intercept -1024) and decode it through ml_core (window W400/L50)."""
    import io

    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from ml_core.decoding import decode
    from ml_core.preprocessing import to_slice_u8

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return to_slice_u8(decode(buf.getvalue()))


def ablate(
    img_u8: np.ndarray, tumor: np.ndarray, liver: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Inpaint the dilated tumor mask away (Telea) and add noise matched to the liver's texture: uint8 (H, W)."""
    import cv2

    mask = cv2.dilate(tumor.astype(np.uint8), np.ones((7, 7), np.uint8))
    out = cv2.inpaint(img_u8, mask, 5, cv2.INPAINT_TELEA).astype(np.float32)
    resid = img_u8.astype(np.float32) - cv2.medianBlur(img_u8, 5).astype(np.float32)
    ref = liver & ~mask.astype(bool)
    sd = float(resid[ref].std()) if ref.sum() > 50 else 5.0
    noise = cv2.GaussianBlur(rng.normal(0, 1, img_u8.shape).astype(np.float32), (0, 0), 0.7)
    noise *= sd / (float(noise.std()) + 1e-6)
    out = np.where(mask > 0, out + noise, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def load_test() -> dict[str, Any]:
    """3Dircadb1.1 slices with liver area >= 3000 px: HU, liver, tumor masks, labels, areas, positions."""
    z = np.load(DATA_DIR / "ircadb" / "3Dircadb1.1.npz")
    with open(DATA_DIR / "ircadb" / "3Dircadb1.1_slices.csv") as f:
        rows = list(csv.DictReader(f))
    idx = [int(r["slice_index"]) for r in rows if int(r["liver_px"]) >= MIN_TEST_LIVER_PX]
    lab = {int(r["slice_index"]): float(r["has_liver_tumor"]) for r in rows}
    return {
        "index": np.asarray(idx),
        "hu": z["ct_hu"][idx],
        "liver": z["liver"][idx],
        "tumor": z["tumor"][idx] & z["liver"][idx],
        "labels": np.asarray([lab[i] for i in idx], np.float32),
        "area": z["liver"][idx].reshape(len(idx), -1).sum(1).astype(np.float64),
        "spacing": float(z["spacing_mm"][1]),
    }


def validation_slices(seed: int = 99, repeats: int = 2) -> tuple[list[np.ndarray], np.ndarray]:
    """Full-size uint8 W400/L50 slices of the val patients, each clean and with synthetic lesions (``repeats`` times)."""
    from ml_core.synthesis import insert_lesions
    from ml_core.training import _window

    rng = np.random.default_rng(seed)
    slices, labels = [], []
    for _ in range(repeats):
        for bg in split(load_backgrounds(), "val"):
            les, _ = insert_lesions(
                bg.image, bg.liver, rng, is_hu=bg.is_hu, spacing_mm=bg.spacing_mm
            )
            slices += [
                _window(bg.image, bg.is_hu, 400, 50).astype(np.uint8),
                _window(les, bg.is_hu, 400, 50).astype(np.uint8),
            ]
            labels += [0.0, 1.0]
    return slices, np.asarray(labels, np.float32)


VAL_SET_NAMES = NAMES
#: Decided on validation only, before the test patient was scored with it (docs/model.md).
DEFAULT_VAL_SET = "realistic"
CALIBRATION_RULE = (
    "probability = sigmoid((logit - offset) / T); T and offset: min NLL on the {val_set} "
    "validation slices ({family}); threshold: max Youden J on the same, slice level"
)
#: Calibration families ``evaluate --calibration`` can fit: "auto" is Platt for the max head and
#: temperature alone for the gap head (the rule up to 0.5.5); "temperature" fixes the offset at 0.
CALIBRATION_FAMILIES = ("auto", "platt", "temperature")
_FAMILY_TEXT = {
    "platt": "Platt scaling: T and offset",
    "temperature": "temperature scaling: offset 0",
}


def resolve_family(family: str, head: str) -> str:
    """The family ``family`` stands for with this head: "platt" or "temperature"."""
    if family not in CALIBRATION_FAMILIES:
        raise ValueError(f"unknown calibration family {family!r} (one of {CALIBRATION_FAMILIES})")
    if family == "auto":
        return "platt" if head == "max" else "temperature"
    return family


def load_validation_set(name: str, clf: Classifier) -> ValidationSet:
    """The named validation set: "realistic" (calibration_sets.realistic_set) or "synthetic" (validation_slices)."""
    if name == "realistic":
        return realistic_set(clf.liver_masks)
    if name == "synthetic":
        slices, labels = validation_slices()
        # validation_slices walks the val backgrounds in this order, clean then lesioned, per repeat.
        bgs = split(load_backgrounds(), "val")
        meta = [
            {"source": b.source, "patient": b.patient, "split": b.split, "kind": kind}
            for _ in range(len(labels) // (2 * len(bgs)))
            for b in bgs
            for kind in ("clean", "lesion")
        ]
        assert [m["kind"] == "lesion" for m in meta] == list(labels > 0.5)
        return ValidationSet("synthetic", slices, labels, np.ones(len(labels), np.int64), meta)
    raise ValueError(f"unknown validation set {name!r} (one of {', '.join(VAL_SET_NAMES)})")


def fit_on(
    clf: Classifier, vset: ValidationSet, *, fit: bool = True, family: str = "auto"
) -> dict[str, Any]:
    """Fit calibration (``family``; "auto": Platt for the max head, temperature for gap) and the
    Youden threshold on one set.

    Returns temperature, logit_offset, threshold and a "validation" report (AUC, both calibration
    families with their ECE and NLL, the logit cut, and per stratum / per patient figures);
    "_logits" and "_labels" are the weight-expanded validation arrays.
    """
    raw, heat = _logits(clf, vset.slices)
    z, y = vset.expand(raw)
    t_only = fit_temperature(z, y)
    platt = fit_platt(z, y)
    if not fit:
        temperature, offset = clf.temperature, clf.logit_offset
    elif resolve_family(family, clf.head) == "platt":
        temperature, offset = platt
    else:
        temperature, offset = t_only, 0.0
    prob = np.asarray(calibrated_probability(z, temperature, offset))
    threshold = fit_threshold(prob, y) if fit else clf.threshold
    thr = min(max(threshold, 1e-12), 1 - 1e-12)
    families = {
        "temperature_only": (t_only, 0.0),
        "platt": platt,
    }
    report: dict[str, Any] = {
        **vset.summary(),
        "n": len(y),
        "auc": auc(z, y),
        **point_metrics(prob, y, threshold),
        "ece": ece(prob, y),
        "logit_cut": offset + temperature * float(np.log(thr / (1 - thr))),
        "families": {
            k: {
                "temperature": t,
                "logit_offset": b,
                "ece": ece(np.asarray(calibrated_probability(z, t, b)), y),
                "nll": _nll(z, y, t, b),
            }
            for k, (t, b) in families.items()
        },
    }
    raw_prob = np.asarray(calibrated_probability(raw, temperature, offset))
    strata: dict[str, Any] = {}
    for i, m in enumerate(vset.meta):
        if m["kind"] == "lesion" and "size_class" in m:
            key = f"size{m['size_class']}_contrast{m['contrast_class']}"
            strata.setdefault(key, []).append(float(raw_prob[i] >= threshold))
    if strata:
        report["sensitivity_by_stratum"] = {k: float(np.mean(v)) for k, v in sorted(strata.items())}
        report["strata"] = {
            "size_mm": [list(c) for c in SIZE_CLASSES_MM],
            "contrast_hu": [list(c) for c in CONTRAST_CLASSES_HU],
        }
    per_patient: dict[str, list[float]] = {}
    for i, m in enumerate(vset.meta):
        if m["kind"] == "clean" and "patient" in m:
            per_patient.setdefault(f"{m['source']}:{m['patient']}", []).append(
                float(raw_prob[i] < threshold)
            )
    if per_patient:
        report["specificity_by_patient"] = {k: float(np.mean(v)) for k, v in per_patient.items()}
    pointing = validation_pointing(heat, vset, raw_prob >= threshold)
    if pointing is not None:
        report["localisation"] = pointing
    del heat
    return {
        "temperature": temperature,
        "logit_offset": offset,
        "threshold": threshold,
        "validation": report,
        "_logits": z,
        "_labels": y,
    }


# ---------------------------------------------------------------- evaluation


def _logits(
    clf: Classifier, slices: list[np.ndarray], batch: int = 32
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits (N,) and full-slice heatmaps through Classifier.predict, in batches."""
    logits, heat = [], []
    for i in range(0, len(slices), batch):
        for p in clf.predict(slices[i : i + batch]):
            logits.append(p.logit)
            heat.append(p.heatmap)
    return np.asarray(logits, np.float64), heat


def evaluate(
    model_dir: Path,
    out_dir: Path,
    *,
    fit: bool = True,
    val_set: str = DEFAULT_VAL_SET,
    validation_only: bool = False,
    family: str = "auto",
) -> dict[str, Any]:
    """Run the full evaluation of one artifact; write metrics.json and SVG plots to ``out_dir``.

    Calibration and threshold are fitted on ``val_set`` ("realistic" or "synthetic"; both are
    always reported) with the calibration ``family`` (CALIBRATION_FAMILIES). ``validation_only``
    stops before the test patient and writes validation.json instead.
    """
    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    clf = Classifier.load(model_dir)
    res: dict[str, Any] = {
        "model": {"name": clf.info.name, "version": clf.info.version, "sha256": clf.info.sha256}
    }

    resolved = resolve_family(family, clf.head)
    fits = {
        name: fit_on(clf, load_validation_set(name, clf), fit=fit, family=family)
        for name in VAL_SET_NAMES
    }
    for name, f in fits.items():
        log.info(
            "validation %s: AUC %.3f, T %.3f, offset %.3f, threshold %.3f, sens %.3f, spec %.3f",
            name,
            f["validation"]["auc"],
            f["temperature"],
            f["logit_offset"],
            f["threshold"],
            f["validation"]["sensitivity"],
            f["validation"]["specificity"],
        )
        if "localisation" in f["validation"]:
            loc = f["validation"]["localisation"]
            log.info(
                "validation %s pointing game: %.3f (within 15 px %.3f) over %d lesion slices",
                name,
                loc["pointing_game"],
                loc["pointing_game_within_15px"],
                loc["lesion_slices"],
            )
    chosen = fits[val_set]
    temperature, offset, threshold = (
        chosen["temperature"],
        chosen["logit_offset"],
        chosen["threshold"],
    )
    # How each set's fit scores on the other set (validation only: says whether fits transfer).
    for name, f in fits.items():
        f["validation"]["ece_with_other_fits"] = {
            other: ece(
                np.asarray(
                    calibrated_probability(f["_logits"], g["temperature"], g["logit_offset"])
                ),
                f["_labels"],
            )
            for other, g in fits.items()
            if other != name
        }
    res["calibration"] = {
        "temperature": temperature,
        "logit_offset": offset,
        "threshold": threshold,
        "validation_set": val_set,
        "family": resolved if fit else "card",
        "rule": CALIBRATION_RULE.format(val_set=val_set, family=_FAMILY_TEXT[resolved]),
        "validation": chosen["validation"],
        "validation_sets": {
            name: {k: v for k, v in f.items() if not k.startswith("_")} for name, f in fits.items()
        },
    }
    if validation_only:
        res["seconds"] = round(time.time() - t0, 1)
        (out_dir / "validation.json").write_text(json.dumps(res, indent=2))
        return res

    def calibrated(z: np.ndarray) -> np.ndarray:
        return np.asarray(calibrated_probability(z, temperature, offset))

    t = load_test()
    y, area = t["labels"], t["area"]
    base = [window_u8(h, 400, 50) for h in t["hu"]]
    logits, heat = _logits(clf, [png_roundtrip(b) for b in base])
    prob = calibrated(logits)
    real = with_intervals(prob, y, threshold)
    real["ece"] = ece(prob, y)
    real["n"] = {"tumor": int(y.sum()), "no_tumor": int((1 - y).sum())}
    real["confusion"] = confusion(prob, y, threshold)
    real["baselines"] = {
        "liver_area_auc": auc(area, y),
        "slice_position_auc": auc(t["index"].astype(float), y),
    }
    m_auc, m_pairs = matched_auc(logits, y, area)
    real["liver_area_matched_auc"] = {
        "value": m_auc,
        "pairs": m_pairs,
        "liver_area_on_same_pairs": matched_auc(area, y, area)[0],
    }
    rng = np.random.default_rng(5)
    pos = np.nonzero(y > 0.5)[0]
    abl = [ablate(base[i], t["tumor"][i], t["liver"][i], rng) for i in pos]
    alog, _ = _logits(clf, abl)
    diff = logits[pos] - alog
    real["tumor_ablation_auc"] = {
        "value": float(np.mean((diff > 0) + 0.5 * (diff == 0))),
        "share_score_drops": float(np.mean(diff > 0)),
        "pairs": len(pos),
    }
    # Localisation on the real tumor slices.
    hits, near, e_liver, e_tumor, chance = [], [], [], [], []
    for i in pos:
        h = heat[i]
        hit, close = point_hit(h, t["tumor"][i])
        hits.append(hit)
        near.append(close)
        if h.max() <= 0:
            continue
        tot = float(h.sum())
        e_liver.append(float(h[t["liver"][i]].sum()) / tot)
        e_tumor.append(float(h[t["tumor"][i]].sum()) / tot)
        chance.append(float(t["tumor"][i].sum()) / float(t["liver"][i].sum()))
    real["localisation"] = {
        "pointing_game": float(np.mean(hits)),
        "pointing_game_within_15px": float(np.mean(near)),
        "cam_grid": f"{clf.cam_cells}x{clf.cam_cells} cells over the liver crop at {clf.input_size} px input",
        "energy_in_liver": float(np.mean(e_liver)) if e_liver else None,
        "energy_in_tumor": float(np.mean(e_tumor)) if e_tumor else None,
        "tumor_share_of_liver_area": float(np.mean(chance)) if chance else None,
    }
    res["real_test_3Dircadb1.1"] = real
    log.info(
        "real: AUC %.3f, matched %.3f, ablation %.3f",
        real["auc"]["value"],
        m_auc,
        real["tumor_ablation_auc"]["value"],
    )

    fmt: dict[str, Any] = {"png": {"auc": real["auc"]["value"], **_at(prob, y, threshold)}}
    jl, _ = _logits(clf, [jpeg_roundtrip(b) for b in base])
    fmt["jpeg_q90"] = {"auc": auc(jl, y), **_at(calibrated(jl), y, threshold)}
    try:
        dl, _ = _logits(clf, [dicom_roundtrip(h, t["spacing"]) for h in t["hu"]])
        fmt["dicom"] = {"auc": auc(dl, y), **_at(calibrated(dl), y, threshold)}
    except Exception as exc:  # report, do not hide, a broken DICOM path
        fmt["dicom"] = {"error": f"{type(exc).__name__}: {exc}"}
    res["per_format"] = fmt
    win: dict[str, Any] = {}
    for w, lv in WINDOWS:
        wl, _ = _logits(clf, [window_u8(h, w, lv) for h in t["hu"]])
        win[f"W{int(w)}/L{int(lv)}"] = {
            "auc": auc(wl, y),
            "matched_auc": matched_auc(wl, y, area)[0],
            **_at(calibrated(wl), y, threshold),
        }
    res["per_window"] = win
    res["heldout_tumor_free"] = heldout_negatives(clf, calibrated, threshold)
    log.info(
        "held-out tumor-free slices of other patients: specificity %.3f (%d of %d flagged)",
        res["heldout_tumor_free"]["specificity"]["value"],
        res["heldout_tumor_free"]["flagged"],
        res["heldout_tumor_free"]["slices"],
    )
    res["seconds"] = round(time.time() - t0, 1)
    (out_dir / "metrics.json").write_text(json.dumps(res, indent=2))
    write_plots(out_dir, prob, y, threshold)
    return res


def heldout_negatives(
    clf: Classifier, calibrated: Any, threshold: float, seed: int = 0
) -> dict[str, Any]:
    """Specificity on the real tumor-free liver slices of the test split's 8-bit sources.

    Other patients and sites than the test patient (CHAOS, CURVAS and AMOS test patients,
    liver >= MIN_LIVER_PX, rendered like the realistic set's negatives), never trained or
    fitted on. No tumors there, so specificity only; its 95% interval resamples patients,
    because slices of one patient are not independent.
    """
    bgs = [
        b for b in split(load_backgrounds(), "test") if b.source in ("CHAOS-CT", "CURVAS", "AMOS22")
    ]
    if not bgs:
        return {"slices": 0}
    logits, _ = _logits(clf, [render_w400(b.image, b.is_hu) for b in bgs])
    flagged = np.asarray(calibrated(logits)) >= threshold
    who = np.asarray([f"{b.source}:{b.patient}" for b in bgs])
    patients = sorted(set(who))
    rows_of = [np.flatnonzero(who == p) for p in patients]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(N_BOOT):
        pick = rng.choice(len(patients), len(patients))
        rows = np.concatenate([rows_of[i] for i in pick])
        boots.append(1.0 - float(flagged[rows].mean()))
    return {
        "slices": len(bgs),
        "patients": len(patients),
        "flagged": int(flagged.sum()),
        "specificity": {
            "value": 1.0 - float(flagged.mean()),
            "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
        },
        "per_patient": {
            p: {"slices": len(rows), "flagged": int(flagged[rows].sum())}
            for p, rows in zip(patients, rows_of, strict=True)
        },
        "median_logit": float(np.median(logits)),
    }


def _at(prob: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    m = point_metrics(prob, y, threshold)
    return {"sensitivity": m["sensitivity"], "specificity": m["specificity"]}


# ---------------------------------------------------------------- plots (plain SVG: no plotting dependency)


def _svg(body: str, title: str) -> str:
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="320" height="320" viewBox="0 0 320 320" font-family="sans-serif" font-size="11">'
        f'<text x="160" y="16" text-anchor="middle" font-size="13">{title}</text>'
        '<rect x="40" y="30" width="260" height="260" fill="none" stroke="#333"/>' + body + "</svg>"
    )


def write_plots(out_dir: Path, prob: np.ndarray, y: np.ndarray, threshold: float) -> None:
    """Write roc.svg, confusion.svg and reliability.svg for the real test slices."""
    px = lambda v: 40 + 260 * v  # noqa: E731
    py = lambda v: 290 - 260 * v  # noqa: E731
    pts = " ".join(f"{px(f):.1f},{py(t):.1f}" for f, t in roc_points(prob, y))
    roc = f'<line x1="40" y1="290" x2="300" y2="30" stroke="#aaa" stroke-dasharray="4"/><polyline fill="none" stroke="#c00" stroke-width="2" points="{pts}"/>'
    roc += f'<text x="170" y="310" text-anchor="middle">false positive rate (AUC {auc(prob, y):.3f})</text>'
    (out_dir / "roc.svg").write_text(_svg(roc, "ROC, 3Dircadb1.1 (real tumors)"))
    c = confusion(prob, y, threshold)
    cells = [("tp", 0, 0), ("fn", 1, 0), ("fp", 0, 1), ("tn", 1, 1)]
    body = ""
    for k, col, row in cells:
        x0, y0 = 40 + 130 * col, 30 + 130 * row
        body += f'<rect x="{x0}" y="{y0}" width="130" height="130" fill="#{"dde" if k in ("tp", "tn") else "fdd"}" stroke="#333"/>'
        body += f'<text x="{x0 + 65}" y="{y0 + 70}" text-anchor="middle" font-size="20">{k.upper()} {c[k]}</text>'
    body += '<text x="170" y="310" text-anchor="middle">rows: true tumor / no tumor; cols: predicted tumor / normal</text>'
    (out_dir / "confusion.svg").write_text(_svg(body, f"Confusion at threshold {threshold:.3f}"))
    rel = reliability(prob, y)
    body = '<line x1="40" y1="290" x2="300" y2="30" stroke="#aaa" stroke-dasharray="4"/>'
    for b in rel:
        body += f'<circle cx="{px(b["p"]):.1f}" cy="{py(b["freq"]):.1f}" r="{3 + min(8, b["n"] / 5):.1f}" fill="#06c" opacity="0.7"/>'
    body += f'<text x="170" y="310" text-anchor="middle">mean predicted probability (ECE {ece(prob, y):.3f})</text>'
    (out_dir / "reliability.svg").write_text(_svg(body, "Reliability diagram"))


def update_card(model_dir: Path, res: dict[str, Any], command: str) -> None:
    """Write threshold, temperature, metrics and localisation into the artifact's model_card.json."""
    p = model_dir / CARD
    card = json.loads(p.read_text())
    card["threshold"] = res["calibration"]["threshold"]
    card["temperature"] = res["calibration"]["temperature"]
    card["logit_offset"] = res["calibration"]["logit_offset"]
    card["calibration"] = res["calibration"]
    real = res["real_test_3Dircadb1.1"]
    card["metrics"] = {k: v for k, v in real.items() if k != "localisation"}
    card["localisation"] = real["localisation"]
    card["per_format"] = res["per_format"]
    card["per_window"] = res["per_window"]
    if "heldout_tumor_free" in res:
        card["heldout_tumor_free"] = res["heldout_tumor_free"]
    card.setdefault("commands", {})["evaluate"] = command
    p.write_text(json.dumps(seal_card(card), indent=2))  # a new threshold is a new identity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m ml_core evaluate``."""
    parser.add_argument(
        "--model", default=None, help="artifact folder (default: ml_core/models/CURRENT)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder for metrics.json and plots (default: <model>/eval)",
    )
    parser.add_argument(
        "--no-fit", action="store_true", help="keep the card's threshold and temperature"
    )
    parser.add_argument(
        "--val-set",
        choices=list(VAL_SET_NAMES),
        default=DEFAULT_VAL_SET,
        help="validation set that calibration and threshold are fitted on (both are reported): "
        "realistic = real tumor-free val slices + one faint-to-strong, 5-50 mm synthetic lesion "
        "copies (ml_core/calibration_sets.py); synthetic = the old val backgrounds clean and with "
        "training-like lesions",
    )
    parser.add_argument(
        "--calibration",
        choices=list(CALIBRATION_FAMILIES),
        default="auto",
        help="calibration family fitted on the validation set: auto = Platt (T and offset) for "
        "the max head, temperature alone for the gap head; temperature = offset 0",
    )
    parser.add_argument(
        "--validation-only",
        action="store_true",
        help="fit and report on the validation sets only; do not score the test patient",
    )
    parser.add_argument(
        "--update-card",
        action="store_true",
        help="write threshold, temperature and metrics into model_card.json",
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate and print a short summary; write metrics.json and plots."""
    from ml_core.classifier import default_model_path

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model_dir = Path(args.model) if args.model else default_model_path()
    out = Path(args.out) if args.out else model_dir / "eval"
    res = evaluate(
        model_dir,
        out,
        fit=not args.no_fit,
        val_set=args.val_set,
        validation_only=args.validation_only,
        family=args.calibration,
    )
    if args.validation_only:
        return 0
    if args.update_card:
        update_card(
            model_dir,
            res,
            f"python -m ml_core evaluate --model {model_dir.as_posix()} --val-set {args.val_set}"
            + ("" if args.calibration == "auto" else f" --calibration {args.calibration}")
            + " --update-card",
        )
    r = res["real_test_3Dircadb1.1"]
    log.info(
        "3Dircadb1.1: AUC %.3f [%.3f-%.3f] (liver area %.3f, position %.3f), matched %.3f, ablation %.3f, sens %.3f spec %.3f, ECE %.3f, pointing %.3f",
        r["auc"]["value"],
        *r["auc"]["ci95"],
        r["baselines"]["liver_area_auc"],
        r["baselines"]["slice_position_auc"],
        r["liver_area_matched_auc"]["value"],
        r["tumor_ablation_auc"]["value"],
        r["sensitivity"]["value"],
        r["specificity"]["value"],
        r["ece"],
        r["localisation"]["pointing_game"],
    )
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m ml_core.evaluation")
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
