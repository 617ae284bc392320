"""Classifier: sha256-verified loading, batched prediction on slices of any size, full-slice heatmaps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from ml_core.classifier import (  # noqa: E402
    CARD,
    WEIGHTS,
    Classifier,
    seal_card,
    write_untrained_artifact,
)
from ml_core.errors import MLCoreError  # noqa: E402


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real artifact folder (random weights, real files and sha256s)."""
    return write_untrained_artifact(tmp_path_factory.mktemp("model") / "liverscan-untrained-0")


@pytest.fixture(scope="module")
def classifier(artifact: Path) -> Classifier:
    """The tiny artifact, loaded through Classifier.load."""
    return Classifier.load(artifact)


def _slices() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 255, (512, 512), dtype=np.uint8),
        rng.integers(0, 255, (300, 420), dtype=np.uint8),
        np.zeros((96, 64), np.uint8),
    ]


def test_predict_on_a_batch_of_different_sizes(classifier: Classifier) -> None:
    """One call returns one prediction per slice with a heatmap the size of that slice, in [0, 1], no NaN."""
    slices = _slices()
    preds = classifier.predict(slices)
    assert len(preds) == len(slices)
    for s, p in zip(slices, preds, strict=True):
        assert p.heatmap.shape == s.shape and p.heatmap.dtype == np.float32
        assert not np.isnan(p.heatmap).any()
        assert 0.0 <= float(p.heatmap.min()) and float(p.heatmap.max()) <= 1.0
        assert 0.0 <= p.probability <= 1.0
        assert p.label == ("tumor" if p.probability >= p.threshold else "normal")
        assert p.threshold == classifier.threshold
    assert classifier.predict([]) == []


def test_batched_prediction_equals_one_by_one(classifier: Classifier) -> None:
    """Batching never changes a slice's result."""
    slices = _slices()
    together = classifier.predict(slices)
    alone = [classifier.predict([s])[0] for s in slices]
    for a, b in zip(together, alone, strict=True):
        assert a.logit == pytest.approx(b.logit, abs=1e-4)
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)


def test_model_info_comes_from_the_card(classifier: Classifier, artifact: Path) -> None:
    """Every result can record the model's name, version and sha256 from model_card.json."""
    card = json.loads((artifact / CARD).read_text())
    assert classifier.info.name == card["name"]
    assert classifier.info.version == card["version"]
    assert classifier.info.sha256 == card["sha256"] and len(card["sha256"]) == 64


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_the_cards_calibration_sets_the_probability(artifact: Path, tmp_path: Path) -> None:
    """probability = sigmoid((logit - logit_offset) / temperature) with the card's values; label by threshold."""
    folder = _copy(artifact, tmp_path)
    card = json.loads((folder / CARD).read_text())
    card.update(temperature=2.0, logit_offset=1.5, threshold=0.5)
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    clf = Classifier.load(folder)
    assert clf.logit_offset == 1.5 and clf.temperature == 2.0
    (p,) = clf.predict([np.full((96, 96), 120, np.uint8)])
    assert p.probability == pytest.approx(1 / (1 + np.exp(-(p.logit - 1.5) / 2.0)), abs=1e-6)
    assert p.label == ("tumor" if p.logit >= 1.5 else "normal")


def test_corrupted_weights_fail_the_sha256_check(artifact: Path, tmp_path: Path) -> None:
    """A flipped byte in the weights is refused with model_load_error, never loaded."""
    folder = _copy(artifact, tmp_path)
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(MLCoreError) as err:
        Classifier.load(folder)
    assert err.value.code == "model_load_error"


@pytest.mark.parametrize(
    ("field", "value"),
    [("threshold", 0.01), ("temperature", 9.0), ("input", {"size": 64}), ("runtimes", {})],
)
def test_a_card_edited_without_resealing_is_refused(
    artifact: Path, tmp_path: Path, field: str, value: Any
) -> None:
    """A serving field changed by hand (a threshold that would turn every slice "tumor") is
    model_load_error; re-sealed, it loads as another identity, so results name what made them."""
    folder = _copy(artifact, tmp_path)
    card = json.loads((folder / CARD).read_text())
    card[field] = value if field != "input" else {**card["input"], **value}
    (folder / CARD).write_text(json.dumps(card))
    with pytest.raises(MLCoreError, match="serving fields") as err:
        Classifier.load(folder)
    assert err.value.code == "model_load_error"
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    assert (
        Classifier.load(folder).info.sha256 != json.loads((artifact / CARD).read_text())["sha256"]
    )


def test_a_documentation_field_can_change_without_a_new_identity(
    artifact: Path, tmp_path: Path
) -> None:
    """Metrics, commands and notes do not change what the model outputs: the identity stays."""
    folder = _copy(artifact, tmp_path)
    card = json.loads((folder / CARD).read_text())
    card["metrics"] = {"auc": 0.5}
    card["intended_use"] = "edited note"
    (folder / CARD).write_text(json.dumps(card))
    assert Classifier.load(folder).info.sha256 == card["sha256"]


def test_missing_weights_file_is_refused(artifact: Path, tmp_path: Path) -> None:
    """A missing weights file is model_load_error, never a silent random initialisation."""
    folder = _copy(artifact, tmp_path)
    (folder / WEIGHTS).unlink()
    with pytest.raises(MLCoreError) as err:
        Classifier.load(folder)
    assert err.value.code == "model_load_error"


def test_missing_or_broken_card_is_refused(artifact: Path, tmp_path: Path) -> None:
    """No model card, or an unreadable one, is model_load_error."""
    folder = _copy(artifact, tmp_path)
    (folder / CARD).write_text("{not json")
    with pytest.raises(MLCoreError) as err:
        Classifier.load(folder)
    assert err.value.code == "model_load_error"
    (folder / CARD).unlink()
    with pytest.raises(MLCoreError) as err:
        Classifier.load(folder)
    assert err.value.code == "model_load_error"


def test_weights_of_the_wrong_shape_are_refused(artifact: Path, tmp_path: Path) -> None:
    """Weights that do not fit the architecture the card describes fail at load, even with a valid sha256."""
    folder = _copy(artifact, tmp_path)
    card = json.loads((folder / CARD).read_text())
    card["backbone"] = "lite0"  # same file, other architecture
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    with pytest.raises(MLCoreError) as err:
        Classifier.load(folder)
    assert err.value.code == "model_load_error"


def test_untrained_classifier_without_localiser_uses_the_whole_slice() -> None:
    """The tiny in-memory classifier for other packages' tests predicts on any slice."""
    clf = Classifier.build_untrained(input_size=32)
    (p,) = clf.predict([np.full((128, 160), 90, np.uint8)])
    assert p.heatmap.shape == (128, 160)
    assert p.label in ("tumor", "normal")


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    """The model the service ships (ml_core/models/CURRENT)."""
    from ml_core.classifier import default_model_path

    return Classifier.load(default_model_path())


def test_crop_floor_bounds_the_magnification_of_a_small_liver(
    artifact: Path, tmp_path: Path
) -> None:
    """With input.min_side_frac in the card, a small liver's crop box is at least that share of the slice, same centre."""
    from ml_core.classifier import square_box

    mask = np.zeros((512, 512), bool)
    mask[200:240, 300:330] = True  # a 40 x 30 px liver tip
    assert square_box(mask)[2] - square_box(mask)[0] == 48  # 40 px + 10 % per side
    y0, x0, y1, x1 = square_box(mask, min_side_frac=0.27)
    assert (y1 - y0, x1 - x0) == (138, 138)  # round(0.27 * 512)
    assert abs((y0 + y1) / 2 - 220) <= 1 and abs((x0 + x1) / 2 - 315) <= 1

    folder = tmp_path / "floored"
    shutil.copytree(artifact, folder)
    card = json.loads((folder / CARD).read_text())
    card["input"]["min_side_frac"] = 0.27
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    floored = Classifier.load(folder)

    class Tip:  # a localiser that finds the small liver
        def segment(self, slices: list[np.ndarray]) -> list[np.ndarray]:
            return [mask for _ in slices]

    floored._localiser = Tip()
    (box,) = floored.boxes([np.zeros((512, 512), np.uint8)])
    assert box[2] - box[0] == round(0.27 * 512)
    big = np.zeros((512, 512), bool)
    big[100:400, 50:350] = True  # a large liver keeps its own box
    assert square_box(big, min_side_frac=0.27) == square_box(big)


def test_card_output_stride_8_runs_stride_16_weights_atrous(artifact: Path, tmp_path: Path) -> None:
    """A card with input.output_stride 8 loads the same stride-16 weights file: a 2x finer CAM grid
    holding the stride-16 cell logits as its odd subgrid, so the slice logit (their max) can only rise."""
    import keras

    from ml_core.classifier import build_network, cell_logits, sha256_file

    def folder_at(stride: int, score_stride: int | None = None) -> Path:
        folder = tmp_path / f"os{stride}-{score_stride}"
        shutil.copytree(artifact, folder)
        keras.utils.set_random_seed(4)
        build_network(64, "lite0", head="max", output_stride=16).save_weights(str(folder / WEIGHTS))
        card = json.loads((folder / CARD).read_text())
        card["backbone"] = "lite0"
        card["input"].update(size=64, head="max", output_stride=stride)
        if score_stride is not None:
            card["input"]["score_stride"] = score_stride
        card["files"] = {k: sha256_file(folder / k) for k in card["files"]}
        (folder / CARD).write_text(json.dumps(seal_card(card)))
        return folder

    coarse, fine = Classifier.load(folder_at(16)), Classifier.load(folder_at(8))
    assert (coarse.cam_cells, fine.cam_cells) == (4, 8)
    assert fine.info.sha256 != coarse.info.sha256  # same files, another forward: another identity
    slices = _slices()
    boxes = coarse.boxes(slices)
    lc, cc = coarse.logits_and_cams(slices, boxes)
    lf, cf = fine.logits_and_cams(slices, boxes)
    assert cc.shape[1:] == (4, 4) and cf.shape[1:] == (8, 8)
    assert np.all(lf >= lc - 1e-5)
    from ml_core.classifier import crop, to_model_input

    x = to_model_input([crop(s, b, 64) for s, b in zip(slices, boxes, strict=True)])
    cells_c = np.asarray(cell_logits(coarse._network, coarse._network(x, training=False)[1]))
    cells_f = np.asarray(cell_logits(fine._network, fine._network(x, training=False)[1]))
    np.testing.assert_allclose(cells_f[:, 1::2, 1::2], cells_c, atol=1e-4)
    for s, p in zip(slices, fine.predict(slices), strict=True):
        assert p.heatmap.shape == s.shape and not np.isnan(p.heatmap).any()

    # Scored on its stride-16 cells: the stride-16 model's logits, probabilities and labels
    # exactly, with the stride-8 heatmap.
    both = Classifier.load(folder_at(8, score_stride=16))
    lb, cb = both.logits_and_cams(slices, boxes)
    np.testing.assert_allclose(lb, lc, atol=1e-5)
    np.testing.assert_allclose(cb, cf, atol=1e-6)
    for pc, pb in zip(coarse.predict(slices), both.predict(slices), strict=True):
        assert pb.label == pc.label and pb.probability == pytest.approx(pc.probability, abs=1e-6)
    with pytest.raises(ValueError, match="score_stride"):
        build_network(64, "lite0", head="max", output_stride=16, score_stride=8)


@pytest.mark.integration
def test_shipped_model_loads_verified_with_its_gate(shipped: Classifier) -> None:
    """The shipped artifact passes its sha256 check, names itself, and brings the content gate."""
    from ml_core.classifier import default_model_path

    card = json.loads((default_model_path() / CARD).read_text())
    assert shipped.info.sha256 == card["sha256"]
    assert shipped.info.version == card["version"]
    assert 0.0 < shipped.threshold < 1.0 and shipped.temperature > 0
    gate = shipped.gate()
    assert 0.0 < gate.threshold <= 1.0
    (score,) = gate.score([np.zeros((256, 256), np.uint8)])
    assert score < gate.threshold  # a black square is not a liver slice


@pytest.mark.integration
def test_shipped_model_on_a_real_tumor_slice(shipped: Classifier) -> None:
    """On a real 3Dircadb1.1 tumor slice the heatmap covers the full slice and stays mostly on the body."""
    from ml_core.evaluation import load_test, window_u8

    t = load_test()
    pos = np.nonzero(t["labels"] > 0.5)[0]
    i = int(pos[np.argmax(t["tumor"][pos].reshape(len(pos), -1).sum(1))])
    (p,) = shipped.predict([window_u8(t["hu"][i], 400, 50)])
    assert p.heatmap.shape == (512, 512) and not np.isnan(p.heatmap).any()
    assert 0.0 <= p.probability <= 1.0 and p.label in ("tumor", "normal")


@pytest.mark.integration
def test_shipped_model_scores_real_tumors_above_the_same_slices_with_the_tumor_inpainted(
    shipped: Classifier,
) -> None:
    """On the 10 largest real tumors of 3Dircadb1.1 the score falls once the tumor is inpainted away."""
    from ml_core.evaluation import ablate, load_test, window_u8

    t = load_test()
    pos = np.nonzero(t["labels"] > 0.5)[0]
    sel = pos[np.argsort(-t["tumor"][pos].reshape(len(pos), -1).sum(1))[:10]]
    slices = [window_u8(t["hu"][i], 400, 50) for i in sel]
    rng = np.random.default_rng(5)
    ablated = [
        ablate(s, t["tumor"][i], t["liver"][i], rng) for s, i in zip(slices, sel, strict=True)
    ]
    with_tumor = np.array([p.logit for p in shipped.predict(slices)])
    without = np.array([p.logit for p in shipped.predict(ablated)])
    assert (with_tumor > without).sum() >= 8  # measured: 10 of 10 (0.2.0); 0.3.0 passes too
    assert with_tumor.mean() > without.mean() + 1.0


@pytest.mark.integration
def test_shipped_heatmap_lights_large_real_tumors(shipped: Classifier) -> None:
    """On the 10 largest real tumors of 3Dircadb1.1 the heatmap peaks on or next to the tumor and puts much of its energy there."""
    import cv2

    from ml_core.evaluation import load_test, window_u8

    t = load_test()
    pos = np.nonzero(t["labels"] > 0.5)[0]
    sel = pos[np.argsort(-t["tumor"][pos].reshape(len(pos), -1).sum(1))[:10]]
    preds = shipped.predict([window_u8(t["hu"][i], 400, 50) for i in sel])
    near, energy = 0, []
    for p, i in zip(preds, sel, strict=True):
        tumor = t["tumor"][i]
        yy, xx = np.unravel_index(int(np.argmax(p.heatmap)), p.heatmap.shape)
        dist = cv2.distanceTransform((~tumor).astype(np.uint8), cv2.DIST_L2, 5)
        near += bool(dist[yy, xx] <= 15.0)  # 15 px ~ 1 cm at this spacing
        energy.append(float(p.heatmap[tumor].sum() / p.heatmap.sum()))
    # measured with 0.4.0: 10 of 10 and 0.56; with 0.3.0 (4x4 CAM, GAP head): 4 of 10 and 0.21
    assert near >= 8
    assert float(np.mean(energy)) >= 0.4
