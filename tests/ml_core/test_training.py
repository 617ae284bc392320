"""Paired training data and a few real training steps through to a loadable artifact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from ml_core.training import Background, batches, make_pair


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
    clean, les = make_pair(bg, np.random.default_rng(1), 64, strong=True)
    assert clean.shape == les.shape == (64, 64)
    diff = np.abs(clean - les) > 1.0
    assert 0 < diff.mean() < 0.5


def test_batches_hold_pairs_half_clean_half_lesioned() -> None:
    """Every batch alternates clean (0) and lesioned (1) versions of the same slice."""
    gen = batches([_background(True), _background(False)], 8, 48, seed=3, step0=0, curriculum=10)
    x, y = next(gen)
    assert x.shape == (8, 48, 48, 3) and x.dtype == np.float32
    assert list(y) == [0.0, 1.0] * 4
    assert 0.0 <= float(x.min()) and float(x.max()) <= 255.0


@pytest.mark.slow
def test_a_few_training_steps_write_a_loadable_artifact(tmp_path: Path) -> None:
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
    ]
    assert run(parser.parse_args(argv)) == 0
    state = json.loads((ckpts / "tiny" / "state.json").read_text())
    assert state["step"] == 2 and (ckpts / "tiny" / "best.weights.h5").exists()
    assert run(parser.parse_args([*argv, "--steps", "3", "--eval-every", "1"])) == 0
    assert (
        json.loads((ckpts / "tiny" / "state.json").read_text())["step"] == 3
    )  # resumed, not restarted
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
    clf = Classifier.load(folder)
    (pred,) = clf.predict([np.zeros((100, 120), np.uint8)])
    assert pred.heatmap.shape == (100, 120)
    second = export_artifact(ckpts / "tiny", "0.0.2", models_dir=models, set_current=False)
    assert Classifier.load(second).info.version == "0.0.2"
    assert (models / "CURRENT").read_text().strip() == folder.name  # a comparison export
