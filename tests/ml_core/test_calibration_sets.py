"""The realistic validation set: deterministic, val patients only, lesions inside the stated ranges."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from ml_core.calibration_sets import (
    CONTRAST_CLASSES_HU,
    COPIES,
    SIZE_CLASSES_MM,
    lesion_draw,
    paint,
    realistic_backgrounds,
    realistic_set,
    render_w400,
)
from ml_core.datasets import load_splits


def _ellipse_liver(slices: list[np.ndarray]) -> list[np.ndarray]:
    """A stand-in for the localiser: a fixed ellipse on the patient's right (no TensorFlow)."""
    out = []
    for s in slices:
        yy, xx = np.mgrid[: s.shape[0], : s.shape[1]]
        out.append(((yy - 220) / 110.0) ** 2 + ((xx - 170) / 90.0) ** 2 < 1.0)
    return out


@pytest.fixture(scope="module")
def vset():  # type: ignore[no-untyped-def]
    return realistic_set(_ellipse_liver, seed=11)


def test_the_set_is_deterministic(vset) -> None:  # type: ignore[no-untyped-def]
    """The same seed gives the same slices, labels and lesions; another seed other lesions."""
    again = realistic_set(_ellipse_liver, seed=11)
    assert len(again.slices) == len(vset.slices)
    assert all(np.array_equal(a, b) for a, b in zip(again.slices, vset.slices, strict=True))
    assert again.meta == vset.meta
    other = realistic_set(_ellipse_liver, seed=12)
    assert [m.get("diameter_mm") for m in other.meta] != [m.get("diameter_mm") for m in vset.meta]


def test_only_val_patients_and_no_tumor_sources(vset) -> None:  # type: ignore[no-untyped-def]
    """Every slice comes from a val patient; never the holdout, test, MSD/LiTS or HCC volumes."""
    splits = load_splits()["patients"]
    keys = {
        ("totalseg" if m["source"] == "totalseg_dicom" else m["source"], m["patient"])
        for m in vset.meta
    }
    for source, patient in keys:
        assert splits[f"{source}:{patient}"] == "val", (source, patient)
        assert source not in ("ircadb", "msd_liver", "hcc_tace_seg", "MSD-Task09-Spleen")
    assert all(m["split"] == "val" for m in vset.meta)
    assert {"CHAOS-CT", "CURVAS", "totalseg_dicom"} <= {m["source"] for m in vset.meta}


def test_balanced_design_and_lesions_in_the_stated_ranges(vset) -> None:  # type: ignore[no-untyped-def]
    """Each background: one clean slice (weight COPIES) and one lesioned copy per size x contrast stratum."""
    clean = [m for m in vset.meta if m["kind"] == "clean"]
    lesions = [m for m in vset.meta if m["kind"] == "lesion"]
    assert len(lesions) == COPIES * len(clean)
    assert np.all(vset.weights[vset.labels < 0.5] == COPIES)
    assert np.all(vset.weights[vset.labels > 0.5] == 1)
    assert vset.summary()["weighted_prevalence"] == pytest.approx(0.5)
    strata = Counter((m["size_class"], m["contrast_class"]) for m in lesions)
    assert set(strata.values()) == {len(clean)} and len(strata) == COPIES
    for m in lesions:
        lo, hi = SIZE_CLASSES_MM[m["size_class"]]
        assert lo <= m["diameter_mm"] <= hi
        lo, hi = CONTRAST_CLASSES_HU[m["contrast_class"]]
        assert lo <= m["contrast_hu"] <= hi
        assert m["lesion_px"] >= 3
    assert 3.0 <= min(m["contrast_hu"] for m in lesions) < 15.0
    assert 5.0 <= min(m["diameter_mm"] for m in lesions) < 15.0
    assert 0.05 < np.mean([m["hyperdense"] for m in lesions]) < 0.4


def test_painted_lesion_has_the_drawn_polarity_and_about_the_drawn_contrast() -> None:
    """Inside the lesion mask the mean HU change has the drawn sign and 0.2-1.5x its size."""
    bgs = realistic_backgrounds(None)
    for i, bg in enumerate(bgs[:6]):
        for s in range(COPIES):
            draw = lesion_draw(3, i, s)
            img, mask = paint(bg, draw, np.random.default_rng([i, s]))
            assert mask.sum() >= 3 and not (mask & ~bg.liver).any()
            change_hu = float((bg.image[mask] - img[mask]).mean()) * (
                1.0 if bg.is_hu else 400 / 255
            )
            ratio = (-change_hu if draw["hyperdense"] else change_hu) / draw["contrast_hu"]
            assert 0.2 < ratio < 1.5, (i, s, draw, ratio)


def test_lesion_masks_are_kept_for_the_pointing_game(vset) -> None:  # type: ignore[no-untyped-def]
    """Every lesioned slice keeps its lesion mask (its pixel count as recorded), clean slices None."""
    assert len(vset.masks) == len(vset.slices)
    for m, meta, img in zip(vset.masks, vset.meta, vset.slices, strict=True):
        if meta["kind"] == "clean":
            assert m is None
        else:
            assert m.dtype == bool and m.shape == img.shape
            assert int(m.sum()) == meta["lesion_px"] >= 3


def test_8bit_backgrounds_render_with_black_air_as_uploads_do() -> None:
    """Air and everything outside the field of view, black in the export, is black in the
    W400/L50 render the classifier is trained and validated on (CURVAS had it mid-grey, where no
    upload has it and the liver localiser found liver in the air)."""
    from ml_core.training import load_backgrounds

    for bg in load_backgrounds():
        if bg.is_hu:
            continue
        rendered = render_w400(bg.image, bg.is_hu)
        corners = np.concatenate([rendered[:16, :16].ravel(), rendered[-16:, -16:].ravel()])
        assert np.median(corners) < 10, (bg.source, bg.patient)
