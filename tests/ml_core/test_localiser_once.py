"""One upload, one localiser run: the content gate and the classifier's crop share the U-Net's
output through the localiser's content-keyed cache, and the shared output is the one a fresh
localiser gives."""

from __future__ import annotations

import numpy as np
import pytest

from ml_core import gate as G
from ml_core import localiser as L
from ml_core.classifier import Classifier


def _localiser(cache_slices: int = L.CACHE_SLICES) -> L.Localiser:
    import keras

    keras.utils.set_random_seed(3)
    return L.Localiser(L.build_unet(32, 4), input_size=32, threshold=0.5, cache_slices=cache_slices)


@pytest.fixture(scope="module")
def parts() -> tuple[L.Localiser, G.LiverGate, Classifier]:
    import keras

    loc = _localiser()
    keras.utils.set_random_seed(4)
    gate = G.LiverGate(G.build_gate_cnn(32), loc, threshold=0.5)
    return loc, gate, Classifier.build_untrained(input_size=32, localiser=loc)


def _slices(n: int, seed: int, shape: tuple[int, int] = (96, 80)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


def test_gate_then_classifier_on_one_slice_runs_the_localiser_once(parts) -> None:
    loc, gate, clf = parts
    (s,) = _slices(1, seed=10)
    before = loc.runs
    gate.score([s])
    clf.predict([s.copy()])  # same pixels in another buffer, as the worker hands them on
    assert loc.runs - before == 1


def test_the_shared_mask_equals_a_fresh_localisers_mask(parts) -> None:
    loc, gate, _clf = parts
    slices = _slices(3, seed=11)
    gate.score(slices)
    fresh = L.Localiser(loc.model, input_size=32, threshold=0.5)
    for cached, new in zip(loc.segment(slices), fresh.segment(slices), strict=True):
        np.testing.assert_array_equal(cached, new)
    assert fresh.runs == 3


def test_gate_scores_are_the_same_with_and_without_the_cache(parts) -> None:
    loc, gate, _clf = parts
    slices = _slices(4, seed=12)
    first = gate.score(slices)  # runs CNN and U-Net together
    again = gate.score(slices)  # localiser output from the cache, CNN alone
    np.testing.assert_allclose(again, first, rtol=1e-6, atol=1e-7)


def test_a_changed_pixel_is_a_new_slice(parts) -> None:
    loc, _gate, _clf = parts
    (s,) = _slices(1, seed=13)
    loc.segment([s])
    t = s.copy()
    t[0, 0] ^= 1
    before = loc.runs
    loc.segment([t])
    loc.segment([s.T.copy()])  # same bytes count, other shape
    assert loc.runs - before == 2


def test_the_cache_keeps_only_the_most_recent_slices() -> None:
    loc = _localiser(cache_slices=2)
    a, b, c = _slices(3, seed=14)
    loc.segment([a, b, c])  # one batched run; a falls out
    assert loc.runs == 3
    loc.segment([b, c])
    assert loc.runs == 3
    loc.segment([a])
    assert loc.runs == 4


def test_the_batch_api_of_0_3_0_still_scores_like_score(parts) -> None:
    _loc, gate, _clf = parts
    slices = _slices(2, seed=15, shape=(64, 64))
    batch, _ = L.to_input(slices, 32)
    np.testing.assert_allclose(gate.score_batch(batch), gate.score(slices), atol=0.05)
