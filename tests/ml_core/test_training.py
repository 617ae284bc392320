"""Paired training data and a few real training steps through to a loadable artifact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from ml_core.training import Background, batches, cell_targets, make_pair


def _background(is_hu: bool) -> Background:
    yy, xx = np.mgrid[0:256, 0:256]
    liver = ((yy - 120) / 80.0) ** 2 + ((xx - 100) / 70.0) ** 2 < 1.0
    rng = np.random.default_rng(0)
    if is_hu:
        img = np.where(liver, 110.0, -60.0) + rng.normal(0, 10, liver.shape)
    else:
        img = np.where(liver, 165.0, 60.0) + rng.normal(0, 6, liver.shape)
    return Background(
        img.astype(np.float32), liver, is_hu, 0.75 if is_hu else None, "p1", "test", "train"
    )


@pytest.mark.parametrize("is_hu", [True, False])
def test_pairs_differ_only_by_the_lesion(is_hu: bool) -> None:
    """Clean and lesioned crops of a pair are identical except where the lesion is."""
    bg = _background(is_hu)
    clean, les, mask = make_pair(bg, np.random.default_rng(1), 64, strong=True)
    assert clean.shape == les.shape == mask.shape == (64, 64)
    diff = np.abs(clean - les) > 1.0
    assert 0 < diff.mean() < 0.5
    # The mask follows the crop and its rotation: it covers where the pair differs.
    lesion = mask > 0.5
    assert lesion.any()
    assert (diff & lesion).sum() / diff.sum() > 0.6


def test_crop_floor_shows_a_small_liver_at_a_lower_magnification() -> None:
    """With min_side_frac the training crop of a small liver holds more surroundings, as serving's floor does."""
    yy, xx = np.mgrid[0:512, 0:512]
    liver = ((yy - 250) / 25.0) ** 2 + ((xx - 200) / 20.0) ** 2 < 1.0  # a 50 x 40 px liver tip
    img = np.where(liver, 165.0, 60.0).astype(np.float32)
    bg = Background(img, liver, False, None, "p1", "test", "train")

    def liver_share(frac: float) -> float:
        clean, _, _ = make_pair(bg, np.random.default_rng(2), 64, strong=False, min_side_frac=frac)
        return float((clean > 140).mean())  # liver grey 165 vs 60 around it

    tight, floored = liver_share(0.0), liver_share(0.5)
    assert tight > 0.35  # the tip fills most of the crop without a floor
    assert floored < tight / 5  # a 256 px box: the tip is a small part of it


def test_batches_hold_pairs_half_clean_half_lesioned() -> None:
    """Every batch alternates clean (0) and lesioned (1) versions of the same slice."""
    gen = batches([_background(True), _background(False)], 8, 48, seed=3, step0=0, curriculum=10)
    x, y, t = next(gen)
    assert x.shape == (8, 48, 48, 3) and x.dtype == np.float32
    assert list(y) == [0.0, 1.0] * 4
    assert 0.0 <= float(x.min()) and float(x.max()) <= 255.0
    assert t.shape == (8, 1, 1)  # one cell by default
    assert not t[0::2].any() and (t[1::2] > 0).all()  # lesion cells only in lesioned images


def test_cell_targets_mark_the_cells_that_hold_the_lesion() -> None:
    """A lesion in one corner of the crop makes that cell (and only it) a positive."""
    mask = np.zeros((64, 64), np.float32)
    mask[4:12, 50:60] = 1.0  # 80 px = 31% of the top-right 16 x 16 cell
    t = cell_targets(mask, 4)
    assert t.shape == (4, 4) and t[0, 3] == 1.0
    t[0, 3] = 0.0
    assert not t.any()
    edge = np.zeros((64, 64), np.float32)
    edge[0:1, 0:4] = 1.0  # 4 px = 1.6% of a cell: a partial positive
    assert 0.0 < cell_targets(edge, 4)[0, 0] < 1.0


def test_atrous_cell_targets_are_the_stride_16_targets_on_the_odd_subgrid() -> None:
    """Output stride 8 (atrous): the odd cells keep the stride-16 targets, the even ones sit between."""
    rng = np.random.default_rng(5)
    mask = np.zeros((128, 128), np.float32)
    mask[37:61, 70:83] = 1.0
    mask[rng.random((128, 128)) < 0.002] = 1.0  # scattered pixels: border windows count too
    fine, coarse = cell_targets(mask, 16, atrous=True), cell_targets(mask, 8)
    assert fine.shape == (16, 16)
    np.testing.assert_allclose(fine[1::2, 1::2], coarse, atol=1e-6)
    # a lesion on the stride-16 boundary at 64 px: the cell centred there holds all of it
    straddle = np.zeros((128, 128), np.float32)
    straddle[60:68, 60:68] = 1.0
    t = cell_targets(straddle, 16, atrous=True)
    assert t[8, 8] == 1.0 and t[6, 6] == 0.0 and not t[:6].any()


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch",
    [[], ["--backbone", "lite0", "--head", "max", "--output-stride", "16"]],
    ids=["b0-gap", "lite0-max-os16"],
)
def test_a_few_training_steps_write_a_loadable_artifact(tmp_path: Path, arch: list[str]) -> None:
    """`train` runs, checkpoints, resumes, and `--export` writes an artifact Classifier.load accepts."""
    pytest.importorskip("tensorflow")
    from ml_core.classifier import Classifier
    from ml_core.training import add_arguments, export_artifact, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ckpts = tmp_path / "ckpt"
    argv = [
        "--run",
        "tiny",
        "--input-size",
        "32",
        "--batch",
        "4",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--checkpoints",
        str(ckpts),
        "--val-pairs",
        "4",
        *arch,
    ]
    assert run(parser.parse_args(argv)) == 0
    state = json.loads((ckpts / "tiny" / "state.json").read_text())
    assert state["step"] == 2 and (ckpts / "tiny" / "best.weights.h5").exists()
    resumed = [*argv, "--steps", "3", "--eval-every", "1", "--lr", "1e-4", "--keep-every", "1"]
    assert run(parser.parse_args(resumed)) == 0
    state = json.loads((ckpts / "tiny" / "state.json").read_text())
    assert state["step"] == 3  # resumed, not restarted
    assert [(i["from_step"], i["lr"]) for i in state["invocations"]] == [(0, 1e-3), (2, 1e-4)]
    models = tmp_path / "models"
    staging = models / "_staging" / "localiser"
    from ml_core.classifier import write_untrained_artifact

    src = write_untrained_artifact(tmp_path / "tinyart")
    import shutil

    shutil.copytree(src / "localiser", staging)
    folder = export_artifact(ckpts / "tiny", "0.0.1", models_dir=models)
    assert (models / "CURRENT").read_text().strip() == folder.name
    card = json.loads((folder / "model_card.json").read_text())
    assert any("CC BY-NC-ND" in d["licence"] for d in card["training"]["data"])
    head = "max" if "max" in arch else "gap"
    assert card["input"]["head"] == head
    assert f"--head {head}" in card["commands"]["train"]
    assert "--lr 0.0001 --curriculum" in card["commands"]["train_then_from_step_2"]
    clf = Classifier.load(folder)
    (pred,) = clf.predict([np.zeros((100, 120), np.uint8)])
    assert pred.heatmap.shape == (100, 120)
    second = export_artifact(ckpts / "tiny", "0.0.2", models_dir=models, set_current=False)
    assert Classifier.load(second).info.version == "0.0.2"
    assert (models / "CURRENT").read_text().strip() == folder.name  # a comparison export
    # a kept step checkpoint, chosen later on another validation set, exports the same way
    kept = export_artifact(
        ckpts / "tiny", "0.0.3", models_dir=models, weights="step_00003.weights.h5"
    )
    card3 = json.loads((kept / "model_card.json").read_text())
    assert card3["training"]["exported_weights"] == "step_00003.weights.h5"
    assert card3["commands"]["export"].endswith("--export-weights step_00003.weights.h5")
    assert Classifier.load(kept).info.version == "0.0.3"


def test_min_contrast_makes_fainter_lesions_from_the_same_draws() -> None:
    """--min-contrast-hu 3 paints the same lesions as the default, only fainter on average."""
    bgs = [_background(True)]
    x15, _, t15 = next(batches(bgs, 8, 48, seed=5, step0=50, curriculum=10))
    x3, _, t3 = next(batches(bgs, 8, 48, seed=5, step0=50, curriculum=10, min_contrast_hu=3.0))
    np.testing.assert_array_equal(t15, t3)  # same lesions, same places
    d15 = np.abs(x15[1::2] - x15[0::2]).sum()
    d3 = np.abs(x3[1::2] - x3[0::2]).sum()
    assert 0 < d3 < d15


def test_kits19_backgrounds_are_the_by_eye_slices_with_one_eroded_liver_each() -> None:
    """The KiTS19 extra backgrounds: train-split patients of the by-eye list only, never an excluded
    one, one liver component of at least MIN_LIVER_PX, and clipped export pixels rendered black."""
    from ml_core.training import (
        KITS19_BY_EYE,
        KITS19_EXCLUDED,
        MIN_LIVER_PX,
        MODELS_DIR,
        kits19_backgrounds,
    )

    pytest.importorskip("tensorflow")
    import cv2

    from ml_core.localiser import Localiser

    localiser = Localiser.load(MODELS_DIR / "_staging" / "localiser")
    bgs = kits19_backgrounds(localiser.segment)
    assert len(bgs) >= 12 and len({b.patient for b in bgs}) >= 6
    assert {b.patient for b in bgs} <= set(KITS19_BY_EYE) and not {b.patient for b in bgs} & set(
        KITS19_EXCLUDED
    )
    assert {b.split for b in bgs} == {"train"} and {b.source for b in bgs} == {"KiTS19"}
    for b in bgs:
        assert b.liver.sum() >= MIN_LIVER_PX
        assert cv2.connectedComponents(b.liver.astype(np.uint8))[0] == 2  # background + one liver
        assert abs(float(np.median(b.image[b.liver])) - 165.0) < 1.0  # harmonised like the others
        assert float(b.image[:8, :8].max()) == 0.0  # the corner is air, clipped to 0 when exported


def _fake_run(tmp_path: Path) -> Path:
    """A run folder as `train` leaves it (state + best weights), from a tiny untrained artifact."""
    import shutil

    from ml_core.classifier import write_untrained_artifact

    art = write_untrained_artifact(tmp_path / "tinyart", gate_threshold=0.0)
    run = tmp_path / "ckpt" / "tiny"
    run.mkdir(parents=True)
    shutil.copyfile(art / "classifier.weights.h5", run / "best.weights.h5")
    args = {"backbone": "b0", "input_size": 32, "head": "gap", "output_stride": 32}
    state = {"args": args, "step": 1, "best_step": 1, "best_auc": 0.5, "invocations": []}
    (run / "state.json").write_text(json.dumps(state))
    return art


def _stage(art: Path, models: Path, *, second: str | None) -> None:
    """Stage the tiny artifact's localiser and gate; ``second``: the gate's second localiser
    "staged" (card and folder), "missing" (card names one, no folder), "leftover" (folder only)."""
    import shutil

    from ml_core import gate as G
    from ml_core.localiser import sha256_file

    staging = models / "_staging"
    for part in ("localiser", "gate"):
        shutil.copytree(art / part, staging / part)
    if second in ("staged", "leftover"):
        shutil.copytree(art / "localiser", staging / G.SECOND_LOCALISER_DIR)
    if second in ("staged", "missing"):
        card = json.loads((staging / "gate" / G.CARD_NAME).read_text())
        card["second_localiser_sha256"] = sha256_file(art / "localiser" / "localiser.weights.h5")
        (staging / "gate" / G.CARD_NAME).write_text(json.dumps(card))


@pytest.mark.parametrize("second", ["staged", "leftover"])
def test_export_ships_the_gates_second_localiser_only_when_the_gate_counts_it(
    tmp_path: Path, second: str
) -> None:
    from ml_core import gate as G
    from ml_core.classifier import Classifier
    from ml_core.training import export_artifact

    art, models = _fake_run(tmp_path), tmp_path / "models"
    _stage(art, models, second=second)
    folder = export_artifact(tmp_path / "ckpt" / "tiny", "0.0.1", models_dir=models)
    assert (models / "CURRENT").read_text().strip() == folder.name
    shipped = (folder / G.SECOND_LOCALISER_DIR).is_dir()
    assert shipped is (second == "staged")
    gate = Classifier.load(folder, runtime="tf").gate()
    assert (gate.second is not None) is (second == "staged")


def test_export_ships_a_staged_second_gate_and_serves_either_gate(tmp_path: Path) -> None:
    """A gate staged in gate_either/ goes into the exported artifact, which loads an EitherGate."""
    import shutil

    from ml_core import gate as G
    from ml_core.classifier import Classifier
    from ml_core.training import export_artifact

    art, models = _fake_run(tmp_path), tmp_path / "models"
    _stage(art, models, second=None)
    shutil.copytree(art / "gate", models / "_staging" / G.EITHER_GATE_DIR)
    folder = export_artifact(tmp_path / "ckpt" / "tiny", "0.0.1", models_dir=models)
    assert (folder / G.EITHER_GATE_DIR / G.WEIGHTS_NAME).is_file()
    assert (
        f"{G.EITHER_GATE_DIR}/{G.WEIGHTS_NAME}"
        in json.loads((folder / "model_card.json").read_text())["files"]
    )
    assert isinstance(Classifier.load(folder, runtime="tf").gate(), G.EitherGate)


def test_export_refuses_current_for_a_model_whose_gate_does_not_load(tmp_path: Path) -> None:
    from ml_core.errors import MLCoreError
    from ml_core.training import export_artifact

    art, models = _fake_run(tmp_path), tmp_path / "models"
    _stage(art, models, second="missing")  # the gate needs a second localiser nobody staged
    (models / "CURRENT").write_text("liverscan-b0-0.0.0\n")
    with pytest.raises(MLCoreError):
        export_artifact(tmp_path / "ckpt" / "tiny", "0.0.1", models_dir=models)
    assert (models / "CURRENT").read_text().strip() == "liverscan-b0-0.0.0"
