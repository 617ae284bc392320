"""Synthetic lesions: inside the liver, sized from the pixel spacing, on HU and 8-bit slices."""

from __future__ import annotations

import numpy as np
import pytest

from ml_core.synthesis import insert_lesions


def _liver(h: int = 256, w: int = 256) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - 128) / 90.0) ** 2 + ((xx - 110) / 80.0) ** 2 < 1.0


@pytest.mark.parametrize("seed", range(6))
def test_lesions_stay_inside_the_liver_and_change_only_the_liver(seed: int) -> None:
    """A lesion never appears outside the liver mask, and pixels outside the liver are untouched."""
    liver = _liver()
    rng = np.random.default_rng(seed)
    hu = (110 + rng.normal(0, 12, liver.shape)).astype(np.float32)
    hu[~liver] = -80.0
    out, mask = insert_lesions(hu, liver, rng, is_hu=True, spacing_mm=0.8)
    assert mask.any()
    assert not (mask & ~liver).any()
    assert out.shape == hu.shape and out.dtype == hu.dtype
    changed = np.abs(out - hu) > 1e-3
    # mass effect may shift liver pixels, the lesion itself only changes liver pixels
    assert not (changed & ~liver & (np.abs(hu + 80.0) > 1e-3)).any()


@pytest.mark.parametrize("diameter", [(5.0, 5.5), (20.0, 21.0), (45.0, 50.0)])
def test_lesion_size_follows_the_pixel_spacing(diameter: tuple[float, float]) -> None:
    """The lesion's equivalent diameter in mm stays near the drawn 5-50 mm range at the given spacing."""
    liver = np.ones((400, 400), bool)
    spacing = 0.7
    sizes = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        hu = np.full(liver.shape, 110.0, np.float32)
        _, mask = insert_lesions(
            hu, liver, rng, is_hu=True, spacing_mm=spacing, n_lesions=1, diameter_mm=diameter
        )
        sizes.append(2.0 * np.sqrt(mask.sum() / np.pi) * spacing)
    mean = float(np.mean(sizes))
    assert 0.5 * diameter[0] <= mean <= 1.5 * diameter[1]


def test_hypodense_lesions_on_8bit_slices_are_realistically_darker() -> None:
    """On an 8-bit W400 slice most lesions are darker than liver by a few to a few tens of grey levels."""
    liver = _liver()
    drops = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        img = np.full(liver.shape, 165, np.uint8)
        out, mask = insert_lesions(img, liver, rng, is_hu=False)
        assert out.dtype == np.uint8
        if mask.sum() > 20:
            drops.append(165.0 - float(out[mask].mean()))
    drops_arr = np.asarray(drops)
    assert (drops_arr > 0).mean() >= 0.6  # mostly hypodense, some hyperdense
    assert np.median(np.abs(drops_arr)) < 40  # not cyst-like black holes


def test_generation_is_reproducible_from_the_generator() -> None:
    """The same seed gives the same lesion (on-the-fly but reproducible training)."""
    liver = _liver()
    img = np.full(liver.shape, 160, np.uint8)
    a = insert_lesions(img, liver, np.random.default_rng(7), is_hu=False)
    b = insert_lesions(img, liver, np.random.default_rng(7), is_hu=False)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_a_slice_without_liver_is_returned_unchanged() -> None:
    """No liver, no lesion: the input comes back as is with an empty mask."""
    img = np.full((64, 64), 100, np.uint8)
    out, mask = insert_lesions(img, np.zeros((64, 64), bool), np.random.default_rng(0), is_hu=False)
    assert np.array_equal(out, img) and not mask.any()
