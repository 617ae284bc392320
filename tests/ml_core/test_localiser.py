"""Liver localiser: Dice, bounding boxes, sha256-verified loading and the shipped model's Dice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ml_core import localiser as L
from ml_core.errors import MLCoreError

SHIPPED = L.STAGING_DIR


def _disc(shape: tuple[int, int], cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_dice_of_identical_masks_is_one_and_of_disjoint_masks_zero() -> None:
    a = _disc((64, 64), 20, 20, 8)
    b = _disc((64, 64), 45, 45, 8)
    assert L.dice(a, a) == 1.0
    assert L.dice(a, b) == 0.0


def test_dice_counts_overlap_twice_over_the_sum_of_areas() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :4] = True  # 40 px
    b[:, 2:8] = True  # 60 px, 20 px shared
    assert L.dice(a, b) == pytest.approx(2 * 20 / 100)


def test_dice_of_two_empty_masks_is_the_empty_value_and_shapes_must_match() -> None:
    empty = np.zeros((8, 8), bool)
    assert L.dice(empty, empty) == 1.0
    assert L.dice(empty, empty, empty=0.0) == 0.0
    with pytest.raises(ValueError):
        L.dice(empty, np.zeros((8, 9), bool))


def test_liver_bbox_adds_the_margin_and_clips_to_the_image() -> None:
    m = np.zeros((100, 80), bool)
    m[10:30, 60:75] = True
    assert L.liver_bbox(m, margin=5) == (5, 55, 35, 80)
    assert L.liver_bbox(m, margin=0) == (10, 60, 30, 75)
    assert L.liver_bbox(np.zeros((5, 5), bool)) is None


def test_small_spurious_blobs_are_removed_but_liver_lobes_kept() -> None:
    m = (
        _disc((128, 128), 60, 40, 25)
        | _disc((128, 128), 60, 85, 12)
        | _disc((128, 128), 110, 110, 2)
    )
    kept = L.keep_main_components(m)
    assert kept[60, 40] and kept[60, 85]  # the lobe (23% of the main area) stays
    assert not kept[110, 110]  # a 13 px blob goes


def _copy_artifact(tmp_path: Path) -> Path:
    if not (SHIPPED / L.CARD_NAME).is_file():
        pytest.skip("no trained localiser in ml_core/models/_staging/localiser")
    dst = tmp_path / "localiser"
    shutil.copytree(SHIPPED, dst)
    return dst


def test_corrupted_weights_fail_the_sha256_check_with_model_load_error(tmp_path: Path) -> None:
    folder = tmp_path / "localiser"
    folder.mkdir()
    (folder / L.WEIGHTS_NAME).write_bytes(b"not the weights that were trained")
    card = {"weights": L.WEIGHTS_NAME, "sha256": "0" * 64, "input_size": 96, "threshold": 0.5}
    (folder / L.CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(MLCoreError) as err:
        L.Localiser.load(folder)
    assert err.value.code == "model_load_error"


def test_missing_card_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(MLCoreError) as err:
        L.Localiser.load(tmp_path)
    assert err.value.code == "model_load_error"


@pytest.mark.integration
def test_shipped_weights_with_one_flipped_byte_are_refused(tmp_path: Path) -> None:
    folder = _copy_artifact(tmp_path)
    w = folder / L.WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(MLCoreError) as err:
        L.Localiser.load(folder)
    assert err.value.code == "model_load_error"


@pytest.fixture(scope="module")
def shipped() -> L.Localiser:
    if not (SHIPPED / L.CARD_NAME).is_file():
        pytest.skip("no trained localiser in ml_core/models/_staging/localiser")
    return L.Localiser.load(SHIPPED)


def _held_out_slices() -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Three liver slices of patients the localiser never saw: 3Dircadb1.1, an MSD and a CURVAS test patient."""
    from ml_core import datasets as D

    if not D.default_root().is_dir():
        pytest.skip("../shared/data missing")
    out = []
    vol = D.load_hu_volume("ircadb", "3Dircadb1.1")
    z = int(np.argmax(vol.liver.reshape(vol.liver.shape[0], -1).sum(axis=1)))
    out.append((D.window_u8(vol.hu[z]), vol.liver[z], "3Dircadb1.1"))
    msd = max(D.iter_msd("test"), key=lambda s: int(s[1].sum()))
    out.append((msd[0], msd[1], "msd test"))
    curvas = max(
        (s for s in D.iter_slices_8bit("test", sources=("CURVAS",)) if s[1] is not None),
        key=lambda s: int(s[1].sum()),
    )
    out.append((curvas[0], curvas[1], "curvas test"))
    return out


#: Stated in docs/model_gate.md for the shipped localiser (its patient-mean Dice is 0.82-0.90).
STATED_MEAN_DICE = 0.80
STATED_MIN_DICE = 0.65


@pytest.mark.integration
def test_shipped_localiser_reaches_its_stated_dice_on_held_out_patients(
    shipped: L.Localiser,
) -> None:
    slices = _held_out_slices()
    masks = shipped.segment([s[0] for s in slices])  # one batched call, mixed 512 and 256 px
    dices = {}
    for mask, (img, truth, name) in zip(masks, slices, strict=True):
        assert mask.shape == img.shape and mask.dtype == bool, name
        dices[name] = L.dice(mask, truth)
    assert min(dices.values()) >= STATED_MIN_DICE, dices
    assert float(np.mean(list(dices.values()))) >= STATED_MEAN_DICE, dices


@pytest.mark.integration
def test_shipped_localiser_finds_no_liver_far_below_it(shipped: L.Localiser) -> None:
    from ml_core import datasets as D

    vol = D.load_hu_volume("ircadb", "3Dircadb1.1")
    dist = vol.liver_distance_mm()
    assert dist is not None
    far = int(np.argmax(dist))
    (mask,) = shipped.segment([D.window_u8(vol.hu[far])])
    assert mask.sum() < 0.002 * mask.size


def test_small_share_draws_small_liver_sections() -> None:
    """``--small-share``: that share of a batch comes from slices whose liver is < 2% of the square."""
    ts = object.__new__(L.TrainingSet)
    ts.size = 32
    big = np.zeros((32, 32), bool)
    big[4:28, 4:28] = True
    tiny = np.zeros((32, 32), bool)
    tiny[10:13, 10:13] = True  # 9 px = 0.9% of the square
    ts.hu, ts.hu_masks = [np.full((32, 32), 40.0, np.float32)], [big]
    ts.u8 = [np.full((32, 32), 120.0, np.float32)] * 2
    ts.u8_masks, ts.u8_group = [big, tiny], [0, 1]
    assert ts.small_sections() == [(False, 1)]
    _, ys = ts.batch(np.random.default_rng(0), 64, small_share=1.0)
    frac = ys.reshape(64, -1).mean(axis=1)
    assert (frac < 0.05).all() and (frac > 0).any()
    _, ys = ts.batch(np.random.default_rng(0), 64)
    assert (ys.reshape(64, -1).mean(axis=1) > 0.2).sum() > 32
