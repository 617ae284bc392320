"""Loaders of ../shared/data: patient-level splits, holdout, shapes and harmonised intensities."""

from __future__ import annotations

import collections
import csv

import numpy as np
import pytest

from ml_core import datasets as D

pytestmark = pytest.mark.skipif(not D.default_root().is_dir(), reason="../shared/data missing")


@pytest.fixture(scope="module")
def splits() -> dict:
    return D.load_splits()


def test_committed_manifest_is_reproducible(splits: dict) -> None:
    """The shipped splits.json is exactly what the fixed seed builds from the data."""
    assert D.build_splits() == splits


def test_every_slice_source_patient_lands_in_exactly_one_split(splits: dict) -> None:
    seen: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for split in D.SPLITS:
        for _img, _mask, meta in D.iter_slices_8bit(split, splits=splits):
            seen[(meta["source"], meta["patient"])].add(split)
        for _img, _mask, meta in D.iter_msd(split, splits=splits):
            seen[(meta["source"], meta["patient"])].add(split)
    assert seen, "no slices found"
    assert all(len(s) == 1 for s in seen.values())
    train = {k for k, s in seen.items() if s == {"train"}}
    test = {k for k, s in seen.items() if s == {"test"}}
    assert train and test and not (train & test)


def test_all_kits19_slices_share_one_split(splits: dict) -> None:
    kits = {v for k, v in splits["patients"].items() if k.startswith("KiTS19:")}
    assert len(kits) == 1
    n = sum(1 for _ in D.iter_slices_8bit(kits.pop(), splits=splits, sources=("KiTS19",)))
    assert n == 44  # every KiTS19 slice of the manifest


def test_msd_flipped_and_mirrored_copies_share_their_volume_split(splits: dict) -> None:
    with open(D.default_root() / "msd_liver_slices" / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_volume: dict[str, set[str]] = collections.defaultdict(set)
    for row in rows:
        by_volume[row["volume_index_10000plus"]].add(row["augmentation"])
    both = [v for v, augs in by_volume.items() if len(augs) == 2]
    assert both, "expected volumes with both augmentations"
    split_sets = {v: {D.split_of("msd_liver", v, splits)} for v in by_volume}
    assert all(len(s) == 1 for s in split_sets.values())
    assert {D.split_of("msd_liver", v, splits) for v in by_volume} == {"train", "val", "test"}


def test_msd_slices_come_in_the_radiological_view() -> None:
    """The MSD export turned every slice a quarter; the loader turns it back, so the liver (the
    patient's right) lies left of the body's centre, as in an upload and every other source."""
    n = 0
    for img, mask, meta in D.iter_msd():
        _, body_x = np.nonzero(img > 20)
        _, liver_x = np.nonzero(mask)
        assert liver_x.mean() < body_x.mean(), meta
        n += 1
    assert n == 643


def test_ircadb_1_1_is_held_out_from_every_training_split(splits: dict) -> None:
    assert D.split_of("ircadb", "3Dircadb1.1", splits) == "holdout"
    patients = {
        meta["patient"] for _i, _m, meta in D.iter_ircadb(("train", "val", "test"), splits=splits)
    }
    assert "3Dircadb1.1" not in patients and "3Dircadb1.7" in patients


def test_samples_are_uint8_slices_with_matching_masks_and_meta() -> None:
    img, mask, meta = next(D.iter_ircadb("holdout"))
    assert img.dtype == np.uint8 and img.shape == (512, 512)
    assert mask is not None and mask.dtype == bool and mask.shape == img.shape
    assert set(meta) == {"source", "patient", "z", "has_liver", "spacing_mm"}
    assert meta["spacing_mm"] is not None and meta["has_liver"] == bool(mask.any())


def test_harmonised_8bit_liver_sits_near_the_w400_liver_grey() -> None:
    medians = [
        float(np.median(img[mask]))
        for img, mask, meta in D.iter_slices_8bit(sources=("CHAOS-CT", "CURVAS", "AMOS22"))
        if mask is not None and mask.sum() > 2000
    ]
    assert medians and all(abs(m - D.LIVER_U8) < 15 for m in medians)


def test_liver_distance_is_zero_inside_the_extent_and_grows_outside() -> None:
    vol = D.load_hu_volume("ircadb", "3Dircadb1.7")
    dist = vol.liver_distance_mm()
    assert dist is not None and dist.shape == (vol.hu.shape[0],)
    has = vol.liver.reshape(vol.hu.shape[0], -1).any(axis=1)
    assert np.all(dist[has] == 0) and dist.max() > 30.0


def test_negatives_are_split_by_file_and_all_decode(splits: dict) -> None:
    files = D.negative_files()
    assert sorted(splits["negatives"]) == files
    decoded = [rel for _img, rel in D.iter_negatives(splits=splits)]
    assert decoded == files


def test_dataset_dicom_slices_are_shown_as_the_upload_path_decodes_them() -> None:
    # The pydicom CT is stored with the column direction reversed; the loader must flip it
    # like ml_core.decoding does, or the gate's held-out figures score it upside down.
    from ml_core.decoding import decode

    root = D.default_root()
    for f in (
        sorted((root / "pydicom_abdomen").glob("*.dcm"))
        + sorted((root / "totalsegmentator" / "example_ct_dicom").iterdir())[:2]
    ):
        hu, _, _ = D.dicom_hu(f)
        assert np.array_equal(hu, decode(f.read_bytes()).pixels), f.name
    ct = [s for s in D.iter_small_examples("test") if "ct_upper" in s[2]["patient"]]
    assert len(ct) == 1
    img = ct[0][0]
    bone_rows = np.nonzero(img >= 250)[0]
    body_rows = np.nonzero(img > 0)[0]
    assert bone_rows.mean() > body_rows.mean()  # spine below the body's centre
