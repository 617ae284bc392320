"""Calibration families compared by leave-one-patient-out CV on the realistic validation set.

Validation only (never the test patient). For each family the map is fitted on the slices of all
but one validation patient (a positive is a lesion painted on a patient's slice, so it goes with
that patient) and scored on the held-out patient's; the pooled held-out NLL and ECE say how well
each family would calibrate a patient it did not see. Families:

- ``temperature``: sigmoid(z / T);
- ``platt`` (the shipped rule for the max head): sigmoid((z - b) / T);
- ``beta`` (monotone beta calibration, Kull et al. 2017): sigmoid(a ln s - b ln(1 - s) + c) with
  s = sigmoid(z / t0), a, b >= 0 (a term whose fitted weight is negative is dropped and the rest
  refitted); with a = 0 the low end is flat: a floor probability for slices the model cannot tell;
- ``isotonic``: pool-adjacent-violators, clipped to [0.01, 0.99].

Usage: python -m ml_core.tools.calibration_cv --model ml_core/models/liverscan-lite0-0.5.0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

import numpy as np

Map = Callable[[np.ndarray], np.ndarray]


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-4) -> np.ndarray:
    """Weights of an L2-regularised logistic regression (Newton's method)."""
    w = np.zeros(x.shape[1])
    for _ in range(200):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) / len(y) + l2 * w
        hess = (x.T * (p * (1 - p))) @ x / len(y) + l2 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if float(np.abs(step).max()) < 1e-10:
            break
    return w


def _beta_features(z: np.ndarray, t0: float) -> np.ndarray:
    s = np.clip(1.0 / (1.0 + np.exp(-z / t0)), 1e-9, 1 - 1e-9)
    return np.stack([np.log(s), -np.log(1 - s), np.ones_like(s)], axis=1)


def fit_beta(z: np.ndarray, y: np.ndarray) -> tuple[Map, dict[str, float]]:
    """Monotone beta calibration: a, b >= 0 (a negative term is dropped and the rest refitted)."""
    t0 = max(1.0, float(np.std(z)))
    x = _beta_features(z, t0)
    keep = [0, 1, 2]
    w = _logistic(x, y)
    while any(w[i] < 0 for i, k in enumerate(keep) if k < 2):
        worst = min((i for i, k in enumerate(keep) if k < 2), key=lambda i: w[i])
        keep.pop(worst)
        w = _logistic(x[:, keep], y)
    full = np.zeros(3)
    full[keep] = w
    params = {"t0": t0, "a": float(full[0]), "b": float(full[1]), "c": float(full[2])}
    return (lambda q: 1.0 / (1.0 + np.exp(-(_beta_features(q, t0) @ full)))), params


def fit_isotonic(z: np.ndarray, y: np.ndarray) -> Map:
    """Pool-adjacent-violators on the sorted logits, interpolated, clipped to [0.01, 0.99]."""
    order = np.argsort(z)
    blocks: list[list[float]] = []  # [sum of labels, count, first z, last z]
    for zz, yy in zip(z[order], y[order], strict=True):
        blocks.append([float(yy), 1.0, float(zz), float(zz)])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            last, prev = blocks.pop(), blocks.pop()
            blocks.append([prev[0] + last[0], prev[1] + last[1], prev[2], last[3]])
    xs = np.array([(b[2] + b[3]) / 2 for b in blocks])
    ps = np.array([b[0] / b[1] for b in blocks])
    return lambda q: np.clip(np.interp(q, xs, ps), 0.01, 0.99)


def families() -> dict[str, Callable[[np.ndarray, np.ndarray], Map]]:
    """Each family's fit: (logits, labels) -> map from logits to probabilities."""
    from ml_core.classifier import calibrated_probability
    from ml_core.evaluation import fit_platt, fit_temperature

    def temperature(z: np.ndarray, y: np.ndarray) -> Map:
        t = fit_temperature(z, y)
        return lambda q: np.asarray(calibrated_probability(q, t))

    def platt(z: np.ndarray, y: np.ndarray) -> Map:
        t, b = fit_platt(z, y)
        return lambda q: np.asarray(calibrated_probability(q, t, b))

    return {
        "temperature": temperature,
        "platt": platt,
        "beta": lambda z, y: fit_beta(z, y)[0],
        "isotonic": fit_isotonic,
    }


def cross_validate(
    raw: np.ndarray, labels: np.ndarray, weights: np.ndarray, groups: np.ndarray
) -> dict[str, dict[str, float]]:
    """Leave-one-group-out NLL and ECE of every family (weights repeat slices, as in the fits)."""
    from ml_core.evaluation import ece

    out = {}
    for name, fit in families().items():
        probs, ys = [], []
        for g in sorted(set(groups.tolist())):
            train, held = groups != g, groups == g
            m = fit(np.repeat(raw[train], weights[train]), np.repeat(labels[train], weights[train]))
            probs.append(np.repeat(m(raw[held]), weights[held]))
            ys.append(np.repeat(labels[held], weights[held]))
        p = np.clip(np.concatenate(probs), 1e-6, 1 - 1e-6)
        y = np.concatenate(ys)
        nll = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        out[name] = {"cv_nll": round(nll, 4), "cv_ece": round(ece(p, y), 4)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table and one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m ml_core.tools.calibration_cv")
    parser.add_argument("--model", required=True, help="artifact folder")
    args = parser.parse_args(argv)
    from ml_core.classifier import Classifier
    from ml_core.evaluation import _logits, load_validation_set

    clf = Classifier.load(args.model)
    vset = load_validation_set("realistic", clf)
    raw, _ = _logits(clf, vset.slices)
    groups = np.array([f"{m['source']}:{m['patient']}" for m in vset.meta])
    labels = np.asarray(vset.labels, np.float64)
    res = cross_validate(raw, labels, vset.weights, groups)
    _, beta = fit_beta(np.repeat(raw, vset.weights), np.repeat(labels, vset.weights))
    for name, r in res.items():
        print(f"{name:12s} leave-one-patient-out NLL {r['cv_nll']:.4f}  ECE {r['cv_ece']:.4f}")
    print(json.dumps({"model": args.model, "groups": len(set(groups.tolist())), **res,
                      "beta_full_fit": beta}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
