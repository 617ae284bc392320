"""Read the shipped model card (a JSON file under ml_core/models/) without importing ml_core."""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The api never imports ml_core (import contract); the card is read as a plain file.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parents[2] / "ml_core" / "models"

METRIC_NAMES: list[tuple[str, tuple[str, ...]]] = [
    ("Accuracy", ("accuracy", "acc")),
    ("Precision", ("precision", "ppv")),
    ("Recall (sensitivity)", ("recall", "sensitivity", "tpr")),
    ("Specificity", ("specificity", "tnr")),
    ("F1", ("f1", "f1_score")),
    ("AUC", ("auc", "roc_auc")),
    ("Liver-area-matched AUC", ("area_matched_auc", "liver_area_matched_auc", "auc_area_matched")),
    ("Tumor-ablation AUC", ("ablation_auc", "tumor_ablation_auc", "auc_ablation")),
    ("Expected calibration error", ("ece", "expected_calibration_error")),
    ("Baseline: liver area alone, AUC", ("liver_area_auc",)),
    ("Baseline: slice position alone, AUC", ("slice_position_auc",)),
]
PLOT_NAMES = ("roc", "reliability", "confusion")
_VALUE_KEYS = ("value", "point", "estimate", "mean", "auc")
_LOW_KEYS = ("low", "lo", "lower", "ci_low", "ci95_low")
_HIGH_KEYS = ("high", "hi", "upper", "ci_high", "ci95_high")
_CI_KEYS = ("ci", "ci95", "ci_95", "interval", "bootstrap_ci", "ci95_bootstrap")


@dataclass(frozen=True)
class Metric:
    """One metric with an optional 95% interval."""

    label: str
    value: float
    low: float | None = None
    high: float | None = None


@dataclass
class CardView:
    """The parts of a model card the performance page knows how to draw."""

    path: Path
    raw: dict[str, Any]
    name: str | None = None
    version: str | None = None
    sha256: str | None = None
    threshold: float | None = None
    metrics: list[Metric] = field(default_factory=list)
    confusion: dict[str, int] | None = None
    roc: tuple[list[float], list[float], float | None] | None = None
    reliability: tuple[list[float], list[float], list[int] | None, float | None] | None = None
    localisation: dict[str, Any] | None = None
    data: Any = None
    licences: Any = None
    test_n: dict[str, Any] | None = None
    stability: dict[str, dict[str, Any]] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)


def find_card(models_dir: Path = DEFAULT_MODELS_DIR) -> Path | None:
    """The current model's model_card.json under a models folder (or in a model folder), else None."""
    if not models_dir.is_dir():
        return None
    if (models_dir / "model_card.json").is_file():  # a model folder itself
        return models_dir / "model_card.json"
    for pointer in ("CURRENT", "current", "CURRENT.txt", "current.txt"):
        p = models_dir / pointer
        if p.is_file():
            name = p.read_text(encoding="utf-8").strip()
            if name and (models_dir / name / "model_card.json").is_file():
                return models_dir / name / "model_card.json"
        if p.is_dir() and (p / "model_card.json").is_file():
            return p / "model_card.json"
    cards = sorted(models_dir.glob("*/model_card.json"), key=lambda c: c.stat().st_mtime)
    return cards[-1] if cards else None


def load_card(models_dir: Path = DEFAULT_MODELS_DIR) -> CardView | None:
    """Load and summarise the current model card; None when absent or unreadable."""
    path = find_card(models_dir)
    if path is None:
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("model card %s unreadable: %s", path, exc)
        return None
    if not isinstance(raw, dict):
        return None
    return summarise(path, raw)


def _walk(obj: Any) -> list[tuple[str, Any, dict[str, Any]]]:
    """Breadth-first (key, value, parent) triples of every dict entry in a JSON tree."""
    out: list[tuple[str, Any, dict[str, Any]]] = []
    queue: deque[Any] = deque([obj])
    while queue:
        cur = queue.popleft()
        if isinstance(cur, dict):
            for k, v in cur.items():
                out.append((str(k).lower(), v, cur))
                if isinstance(v, dict | list):
                    queue.append(v)
        elif isinstance(cur, list):
            queue.extend(x for x in cur if isinstance(x, dict | list))
    return out


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    return None


def _interval(v: Any) -> tuple[float | None, float | None]:
    if isinstance(v, list | tuple) and len(v) == 2 and all(_num(x) is not None for x in v):
        return float(v[0]), float(v[1])
    if isinstance(v, dict):
        lo = next((_num(v[k]) for k in _LOW_KEYS if k in v), None)
        hi = next((_num(v[k]) for k in _HIGH_KEYS if k in v), None)
        return lo, hi
    return None, None


def parse_metric(
    label: str, v: Any, parent: dict[str, Any] | None = None, key: str = ""
) -> Metric | None:
    """Turn the many shapes a metric may take in JSON into a Metric (value and interval)."""
    value = _num(v)
    lo = hi = None
    if value is None and isinstance(v, dict):
        value = next((_num(v[k]) for k in _VALUE_KEYS if k in v and _num(v[k]) is not None), None)
        lo, hi = _interval(v)
        if lo is None:
            for ck in _CI_KEYS:
                if ck in v:
                    lo, hi = _interval(v[ck])
                    break
    elif (
        value is None
        and isinstance(v, list | tuple)
        and len(v) == 3
        and all(_num(x) is not None for x in v)
    ):
        value, lo, hi = (float(x) for x in v)
    if value is None:
        return None
    if lo is None and parent is not None and key:
        for suffix in _CI_KEYS:
            for cand in (f"{key}_{suffix}", f"{key}{suffix}"):
                if cand in parent:
                    lo, hi = _interval(parent[cand])
                    break
    return Metric(label, value, lo, hi)


def _first(
    entries: list[tuple[str, Any, dict[str, Any]]], names: tuple[str, ...]
) -> tuple[str, Any, dict[str, Any]] | None:
    for name in names:
        for k, v, parent in entries:
            if k == name:
                return k, v, parent
    return None


def _floats(v: Any) -> list[float] | None:
    if isinstance(v, list) and v and all(_num(x) is not None for x in v):
        return [float(x) for x in v]
    return None


def _confusion(v: Any) -> dict[str, int] | None:
    if isinstance(v, dict):
        low = {str(k).lower(): x for k, x in v.items()}
        if all(k in low and _num(low[k]) is not None for k in ("tn", "fp", "fn", "tp")):
            return {k: int(low[k]) for k in ("tn", "fp", "fn", "tp")}
        for key in ("matrix", "counts", "values"):
            if key in low:
                return _confusion(low[key])
    if isinstance(v, list) and len(v) == 2 and all(isinstance(r, list) and len(r) == 2 for r in v):
        (tn, fp), (fn, tp) = v
        return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}
    return None


def _metrics_root(raw: dict[str, Any]) -> Any:
    """Prefer the held-out test metrics over validation or training figures."""
    metrics = raw.get("metrics", raw)
    if isinstance(metrics, dict):
        for key in ("test", "held_out_test", "test_set", "heldout"):
            if isinstance(metrics.get(key), dict):
                return metrics[key]
    return metrics


def summarise(path: Path, raw: dict[str, Any]) -> CardView:
    """Pick out the drawable parts of a model card; everything else stays in `raw`."""
    view = CardView(path=path, raw=raw)
    view.name = str(raw["name"]) if "name" in raw else None
    view.version = str(raw["version"]) if "version" in raw else None
    view.sha256 = str(raw.get("sha256") or raw.get("weights_sha256") or "") or None
    everything = _walk(raw)
    root = _walk(_metrics_root(raw))
    thr = _first(everything, ("threshold", "decision_threshold"))
    if thr is not None:
        view.threshold = (
            _num(thr[1])
            if _num(thr[1]) is not None
            else _num((thr[1] or {}).get("value") if isinstance(thr[1], dict) else None)
        )
    for label, names in METRIC_NAMES:
        hit = _first(root, names) or _first(everything, names)
        if hit is None:
            continue
        m = parse_metric(label, hit[1], hit[2], hit[0])
        if m is not None:
            view.metrics.append(m)
    cm = _first(root, ("confusion_matrix", "confusion")) or _first(
        everything, ("confusion_matrix", "confusion")
    )
    if cm is not None:
        view.confusion = _confusion(cm[1])
    roc = _first(root, ("roc", "roc_curve")) or _first(everything, ("roc", "roc_curve"))
    if roc is not None and isinstance(roc[1], dict | list):
        if isinstance(roc[1], list):  # [[fpr, tpr], ...] as ml_core.evaluation.roc_points gives
            pairs = [p for p in roc[1] if isinstance(p, list | tuple) and len(p) == 2]
            r: dict[str, Any] = {"fpr": [p[0] for p in pairs], "tpr": [p[1] for p in pairs]}
        else:
            r = {str(k).lower(): x for k, x in roc[1].items()}
        fpr, tpr = _floats(r.get("fpr")), _floats(r.get("tpr"))
        if fpr and tpr:
            auc = next((m.value for m in view.metrics if m.label == "AUC"), None)
            view.roc = (fpr, tpr, _num(r.get("auc")) if _num(r.get("auc")) is not None else auc)
    rel = _first(
        root, ("reliability", "reliability_diagram", "calibration_curve", "calibration")
    ) or _first(
        everything, ("reliability", "reliability_diagram", "calibration_curve", "calibration")
    )
    if rel is not None and isinstance(rel[1], dict | list):
        r = (
            {str(k).lower(): x for k, x in rel[1].items()}
            if isinstance(rel[1], dict)
            else {"bins": rel[1]}
        )
        bins = r.get("bins")
        if isinstance(bins, list) and bins and all(isinstance(b, dict) for b in bins):
            r = {k: [b.get(k) for b in bins] for k in {str(k) for b in bins for k in b}}
        conf = next(
            (
                _floats(r.get(k))
                for k in (
                    "confidence",
                    "mean_predicted",
                    "prob_pred",
                    "predicted",
                    "mean_confidence",
                )
                if _floats(r.get(k))
            ),
            None,
        )
        obs = next(
            (
                _floats(r.get(k))
                for k in (
                    "observed",
                    "fraction_positive",
                    "prob_true",
                    "accuracy",
                    "frequency",
                    "fraction_of_positives",
                )
                if _floats(r.get(k))
            ),
            None,
        )
        cnt = next((_floats(r.get(k)) for k in ("count", "counts", "n") if _floats(r.get(k))), None)
        if conf and obs:
            ece = next(
                (m.value for m in view.metrics if m.label == "Expected calibration error"), None
            )
            view.reliability = (conf, obs, [int(c) for c in cnt] if cnt else None, ece)
    loc = _first(
        everything,
        ("localisation", "localization", "gradcam_localisation", "grad_cam_localisation"),
    )
    if loc is not None:
        view.localisation = loc[1] if isinstance(loc[1], dict) else {"value": loc[1]}
    data = _first(everything, ("training_data", "data", "datasets"))
    view.data = data[1] if data is not None else None
    # One licence string inside a data entry is that entry's, not the model's list of licences.
    lic = next(
        (
            v
            for k, v, _ in everything
            if k in ("licences", "licenses") and isinstance(v, list | dict)
        ),
        None,
    )
    view.licences = lic
    n = _first(root, ("n", "test_n", "n_test"))
    if n is not None and isinstance(n[1], dict):
        view.test_n = n[1]
    for key in ("per_format", "per_window"):
        block = raw.get(key)
        if isinstance(block, dict) and all(isinstance(v, dict) for v in block.values()):
            view.stability[key] = block
    # ml_core's evaluate writes its plots beside the card (<model>/eval/*.svg): shown when the
    # card itself carries no curve data to draw.
    for name in PLOT_NAMES:
        svg = path.parent / "eval" / f"{name}.svg"
        if svg.is_file():
            view.plots[name] = svg
    return view
