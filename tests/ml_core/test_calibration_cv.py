"""The calibration-family comparison tool (ml_core/tools/calibration_cv.py) on known score shapes."""

from __future__ import annotations

import numpy as np

from ml_core.tools.calibration_cv import cross_validate, fit_beta, fit_isotonic


def _scores(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max-head-like logits: a third of the positives look like negatives, the rest far above."""
    rng = np.random.default_rng(seed)
    neg = rng.normal(0.0, 1.0, 600)
    faint = rng.normal(0.0, 1.0, 200)
    strong = rng.normal(6.0, 2.0, 400)
    z = np.concatenate([neg, faint, strong])
    y = np.concatenate([np.zeros(600), np.ones(600)])
    groups = np.arange(len(z)) % 4
    return z, y, groups


def test_beta_is_monotone() -> None:
    z, y, _ = _scores()
    m, params = fit_beta(z, y)
    assert params["a"] >= 0 and params["b"] >= 0
    q = np.linspace(-6, 14, 200)
    p = m(q)
    assert np.all(np.diff(p) >= -1e-12)
    assert p[0] < 0.3 and p[-1] > 0.95


def test_beta_beats_platt_where_the_shape_is_not_a_sigmoid() -> None:
    z, y, g = _scores()
    res = cross_validate(z, y, np.ones(len(z), np.int64), g)
    assert set(res) == {"temperature", "platt", "beta", "isotonic"}
    assert res["beta"]["cv_nll"] < res["platt"]["cv_nll"]
    assert res["beta"]["cv_ece"] < res["platt"]["cv_ece"]


def test_isotonic_is_monotone_and_never_certain() -> None:
    z, y, _ = _scores(1)
    p = fit_isotonic(z, y)(np.linspace(-8, 16, 300))
    assert np.all(np.diff(p) >= 0) and p.min() >= 0.01 and p.max() <= 0.99
