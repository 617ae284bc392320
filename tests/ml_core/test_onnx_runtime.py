"""The classifier's, the localiser's and the gate's forwards through ONNX Runtime: equal to
TensorFlow, verified, with a clear fallback.

Export tests need tf2onnx + onnx (the ``onnx-export`` extra) and skip without them; loading,
tamper and shipped-model tests need onnxruntime only (the ``ml`` extra).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from ml_core import onnx_runtime  # noqa: E402
from ml_core.classifier import (  # noqa: E402
    CARD,
    Classifier,
    default_model_path,
    seal_card,
    write_untrained_artifact,
)
from ml_core.errors import ModelLoadError  # noqa: E402

TOL = onnx_runtime.TOLERANCE


def _slices() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [
        rng.integers(0, 255, (512, 512), dtype=np.uint8),
        rng.integers(0, 255, (300, 420), dtype=np.uint8),
        np.zeros((96, 64), np.uint8),
    ]


def _tiny_lite0(folder: Path) -> Path:
    """A tiny real artifact with the shipped architecture: Lite0 at 64 px, max head, stride 8
    atrous scored on its stride-16 cells, a tiny localiser and gate (random weights, real files
    and sha256s)."""
    import keras

    from ml_core.classifier import WEIGHTS, build_network, sha256_file

    write_untrained_artifact(folder, gate_threshold=0.5)
    keras.utils.set_random_seed(4)
    build_network(64, "lite0", head="max", output_stride=16).save_weights(str(folder / WEIGHTS))
    card = json.loads((folder / CARD).read_text())
    card["backbone"] = "lite0"
    card["input"].update(size=64, head="max", output_stride=8, score_stride=16)
    card["files"] = {k: sha256_file(folder / k) for k in card["files"]}
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Lite0 artifact with classifier.onnx, localiser.onnx and gate.onnx exported into it."""
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    folder = _tiny_lite0(tmp_path_factory.mktemp("model") / "tiny")
    onnx_runtime.export(folder)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


def _with_fake_export(tmp_path: Path) -> Path:
    """A tiny artifact whose card lists a classifier.onnx that is not the file on disk."""
    folder = write_untrained_artifact(tmp_path / "tampered")
    (folder / onnx_runtime.ONNX_FILE).write_bytes(b"not the exported graph")
    card = json.loads((folder / CARD).read_text())
    card["runtimes"] = {
        "onnx": {
            "file": onnx_runtime.ONNX_FILE,
            "sha256": "0" * 64,
            "weights_sha256": card["files"][card["weights"]],
        }
    }
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    return folder


def test_export_records_the_file_and_reseals_the_card(exported: Path) -> None:
    """The card gains runtimes.onnx (sha256, opset, converter, differences) and is re-sealed (what
    serves is part of the identity); the export is not one of its files."""
    from ml_core.classifier import sha256_file, verify_files

    card = json.loads((exported / CARD).read_text())
    entry = card["runtimes"]["onnx"]
    assert entry["sha256"] == sha256_file(exported / onnx_runtime.ONNX_FILE)
    assert entry["opset"] == onnx_runtime.OPSET and "tf2onnx" in entry["converter"]
    assert entry["max_abs_diff_logit"] <= TOL and entry["max_abs_diff_cam"] <= TOL
    assert onnx_runtime.ONNX_FILE not in card["files"]
    verify_files(exported, card)


def test_onnx_and_tf_runtimes_agree(exported: Path) -> None:
    """Same logits, CAMs, probabilities, labels and heatmaps within the tolerance; the runtime is named."""
    tf_clf = Classifier.load(exported, runtime="tf")
    ort_clf = Classifier.load(exported, runtime="onnx")
    auto = Classifier.load(exported)
    assert (tf_clf.runtime, ort_clf.runtime, auto.runtime) == (
        "tensorflow",
        "onnxruntime",
        "onnxruntime",
    )
    assert ort_clf.info == tf_clf.info
    slices = _slices()
    boxes = tf_clf.boxes(slices)
    lt, ct = tf_clf.logits_and_cams(slices, boxes)
    lo, co = ort_clf.logits_and_cams(slices, boxes)
    np.testing.assert_allclose(lo, lt, atol=TOL)
    np.testing.assert_allclose(co, ct, atol=TOL)
    for a, b in zip(tf_clf.predict(slices), ort_clf.predict(slices), strict=True):
        assert a.label == b.label and a.probability == pytest.approx(b.probability, abs=TOL)


def test_tampered_export_falls_back_to_tf_on_auto_and_is_refused_on_onnx(tmp_path: Path) -> None:
    """classifier.onnx failing its sha256: "auto" serves through TensorFlow, "onnx" raises ModelLoadError."""
    pytest.importorskip("onnxruntime")
    folder = _with_fake_export(tmp_path)
    assert Classifier.load(folder).runtime == "tensorflow"
    with pytest.raises(ModelLoadError, match="sha256"):
        Classifier.load(folder, runtime="onnx")


def test_export_of_other_weights_is_refused(exported: Path, tmp_path: Path) -> None:
    """An export recorded for other weights (weights_sha256) is stale: refused on "onnx"."""
    folder = _copy(exported, tmp_path)
    card = json.loads((folder / CARD).read_text())
    card["runtimes"]["onnx"]["weights_sha256"] = "f" * 64
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    with pytest.raises(ModelLoadError, match="other weights"):
        Classifier.load(folder, runtime="onnx")
    assert Classifier.load(folder).runtime == "tensorflow"


@pytest.mark.parametrize(("key", "value"), [("score_stride", None), ("output_stride", 16)])
def test_export_made_for_another_forward_is_refused(
    exported: Path, tmp_path: Path, key: str, value: int | None
) -> None:
    """A card edited after the export (e.g. score_stride) would make ONNX Runtime serve the old
    logits: the export is refused on "onnx" and "auto" serves the card's forward in TensorFlow."""
    folder = _copy(exported, tmp_path)
    card = json.loads((folder / CARD).read_text())
    assert card["input"].get(key) != value
    card["input"][key] = value
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    with pytest.raises(ModelLoadError, match="another forward"):
        Classifier.load(folder, runtime="onnx")
    assert Classifier.load(folder).runtime == "tensorflow"


def test_onnx_runtime_without_onnxruntime_is_a_clear_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runtime="onnx" with onnxruntime not importable: ModelLoadError naming it; "auto" uses TensorFlow."""
    folder = _with_fake_export(tmp_path)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(ModelLoadError, match="needs onnxruntime"):
        Classifier.load(folder, runtime="onnx")
    assert Classifier.load(folder).runtime == "tensorflow"


def test_no_export_means_tensorflow(tmp_path: Path) -> None:
    """A folder without an export: "auto" is TensorFlow, "onnx" refuses, unknown runtimes are errors."""
    folder = write_untrained_artifact(tmp_path / "plain")
    assert Classifier.load(folder).runtime == "tensorflow"
    with pytest.raises(ModelLoadError, match="runtimes.onnx"):
        Classifier.load(folder, runtime="onnx")
    with pytest.raises(ValueError, match="unknown runtime"):
        Classifier.load(folder, runtime="torch")


# --------------------------------------------------------------------------- localiser and gate


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_export_writes_the_localiser_and_gate_files_beside_their_weights(exported: Path) -> None:
    """runtimes.onnx_localiser / onnx_gate name files in localiser/ and gate/, made from the verified weights."""
    from ml_core.classifier import sha256_file, verify_files

    card = json.loads((exported / CARD).read_text())
    for part, weights in (
        ("localiser", "localiser/localiser.weights.h5"),
        ("gate", "gate/gate.weights.h5"),
    ):
        entry = onnx_runtime.onnx_entry(card, part)
        assert entry is not None and entry["file"] == f"{part}/{part}.onnx"
        assert entry["sha256"] == sha256_file(exported / entry["file"])
        assert entry["weights_sha256"] == card["files"][weights]
        assert entry["max_abs_diff_probability"] <= TOL
        assert entry["file"] not in card["files"]
    verify_files(exported, card)


def test_onnx_localiser_and_gate_agree_with_tensorflow(exported: Path) -> None:
    """Localiser maps, masks (away from the threshold), P_cnn and gate scores equal TF's within the tolerance."""
    tf_clf = Classifier.load(exported, runtime="tf")
    ort_clf = Classifier.load(exported, runtime="onnx")
    tg, og = tf_clf.gate(), ort_clf.gate()
    assert (tf_clf._localiser.runtime, tg.runtime) == ("tensorflow", "tensorflow")
    assert (ort_clf._localiser.runtime, og.runtime) == ("onnxruntime", "onnxruntime")
    assert og.localiser is ort_clf._localiser  # one localiser per artifact, as before
    slices = _slices()
    p_t, a_t = tg.score_parts(slices)
    p_o, a_o = og.score_parts(slices)
    np.testing.assert_allclose(p_o, p_t, atol=TOL)
    np.testing.assert_allclose(og.score(slices), tg.score(slices), atol=TOL)
    loc_t, loc_o = tf_clf._localiser, ort_clf._localiser
    for s, pt, po in zip(
        slices, loc_t.probabilities(slices), loc_o.probabilities(slices), strict=True
    ):
        assert po.shape == s.shape
        np.testing.assert_allclose(po, pt, atol=TOL)
        sure = np.abs(pt - loc_t.threshold) > TOL  # a pixel at the threshold may go either way
        np.testing.assert_array_equal((po >= loc_o.threshold)[sure], (pt >= loc_t.threshold)[sure])


def test_onnx_gate_then_classifier_still_runs_the_localiser_once(exported: Path) -> None:
    """With ONNX Runtime the gate runs both sessions and leaves the U-Net's map for the classifier's crop."""
    clf = Classifier.load(exported, runtime="onnx")
    gate = clf.gate()
    (s,) = _slices()[:1]
    before = clf._localiser.runs
    gate.score([s])
    clf.predict([s.copy()])
    assert clf._localiser.runs - before == 1


@pytest.mark.parametrize("part", ["localiser", "gate"])
def test_tampered_localiser_or_gate_export_falls_back_on_auto_and_is_refused_on_onnx(
    exported: Path, tmp_path: Path, part: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A localiser.onnx / gate.onnx failing its sha256: "auto" serves that part through TensorFlow
    with a warning (the other parts stay on ONNX Runtime); "onnx" raises ModelLoadError."""
    folder = _copy(exported, tmp_path)
    _corrupt(folder / part / f"{part}.onnx")
    with caplog.at_level("WARNING", logger="ml_core.onnx_runtime"):
        clf = Classifier.load(folder)
        gate = clf.gate()
    runtimes = {"localiser": clf._localiser.runtime, "gate": gate.runtime}
    assert runtimes[part] == "tensorflow"
    assert runtimes[{"localiser": "gate", "gate": "localiser"}[part]] == "onnxruntime"
    assert clf.runtime == "onnxruntime"
    assert any(f"serving the {part} through TensorFlow" in r.message for r in caplog.records)
    assert len(gate.score(_slices())) == 3  # mixed runtimes still score
    with pytest.raises(ModelLoadError, match="sha256"):
        Classifier.load(folder, runtime="onnx").gate()


def test_localiser_and_gate_folders_alone_pick_their_runtime_from_the_artifact_card(
    exported: Path, tmp_path: Path
) -> None:
    """Localiser.load / LiverGate.load read the exports from ../model_card.json; without one,
    "auto" is TensorFlow and "onnx" refuses."""
    from ml_core.gate import LiverGate
    from ml_core.localiser import Localiser

    assert Localiser.load(exported / "localiser").runtime == "onnxruntime"
    assert Localiser.load(exported / "localiser", runtime="tf").runtime == "tensorflow"
    gate = LiverGate.load(exported / "gate", runtime="onnx")
    assert (gate.runtime, gate.localiser.runtime) == ("onnxruntime", "onnxruntime")
    alone = tmp_path / "localiser"
    shutil.copytree(exported / "localiser", alone)
    assert Localiser.load(alone).runtime == "tensorflow"
    with pytest.raises(ModelLoadError, match="runtimes.onnx_localiser"):
        Localiser.load(alone, runtime="onnx")


@pytest.mark.integration
def test_shipped_onnx_export_equals_tensorflow_on_real_slices(data_dir: Path) -> None:
    """The shipped classifier.onnx against TensorFlow on 12 real 3Dircadb1.7 slices: logits, CAMs, labels."""
    pytest.importorskip("onnxruntime")
    from ml_core.preprocessing import window

    folder = default_model_path()
    if onnx_runtime.onnx_entry(json.loads((folder / CARD).read_text())) is None:
        pytest.skip("the shipped model has no ONNX export")
    tf_clf = Classifier.load(folder, runtime="tf")
    ort_clf = Classifier.load(folder, runtime="onnx")
    with np.load(data_dir / "ircadb" / "3Dircadb1.7.npz") as z:
        hu, liver = z["ct_hu"], z["liver"]
    zs = np.nonzero(liver.reshape(len(liver), -1).any(axis=1))[0]
    slices = [window(hu[k]) for k in zs[np.linspace(0, len(zs) - 1, 12).round().astype(int)]]
    boxes = tf_clf.boxes(slices)
    lt, ct = tf_clf.logits_and_cams(slices, boxes)
    lo, co = ort_clf.logits_and_cams(slices, boxes)
    np.testing.assert_allclose(lo, lt, atol=TOL)
    np.testing.assert_allclose(co, ct, atol=TOL)
    labels = [[p.label for p in c.predict(slices)] for c in (tf_clf, ort_clf)]
    assert labels[0] == labels[1]


@pytest.mark.integration
def test_shipped_localiser_and_gate_exports_equal_tensorflow_on_real_slices(data_dir: Path) -> None:
    """The shipped localiser.onnx and gate.onnx against TensorFlow on 16 slices of held-out
    3Dircadb1.1 (liver and far from it), a generated document and brain: probabilities, decisions, masks."""
    pytest.importorskip("onnxruntime")
    from ml_core import gate as G
    from ml_core import localiser as L
    from ml_core.preprocessing import window

    folder = default_model_path()
    card = json.loads((folder / CARD).read_text())
    if onnx_runtime.onnx_entry(card, "localiser") is None:
        pytest.skip("the shipped model has no localiser/gate ONNX export")
    tg = Classifier.load(folder, runtime="tf").gate()
    og = Classifier.load(folder, runtime="onnx").gate()
    with np.load(data_dir / "ircadb" / "3Dircadb1.1.npz") as z:
        hu = z["ct_hu"]
    slices = [window(hu[k]) for k in np.linspace(0, len(hu) - 1, 16).round().astype(int)]
    rng = np.random.default_rng(0)
    slices += [G.gen_document(rng), G.gen_brain(rng)]
    # An EitherGate (gate_either/): each of its two gates, CNN and liver area, TF against ONNX.
    pairs = [(tg.first, og.first), (tg.other, og.other)] if hasattr(tg, "first") else [(tg, og)]
    for gt, go in pairs:
        p_t, a_t = gt.score_parts(slices)
        p_o, a_o = go.score_parts(slices)
        np.testing.assert_allclose(p_o, p_t, atol=TOL)
    np.testing.assert_allclose(og.score(slices), tg.score(slices), atol=1e-4)
    keys = [L.slice_key(s) for s in slices]
    for mt, mo in zip(tg.localiser.cached(keys), og.localiser.cached(keys), strict=True):
        np.testing.assert_allclose(mo, mt, atol=TOL)
    assert tg.accepts(slices) == og.accepts(slices)
    assert any(tg.accepts(slices)) and not all(tg.accepts(slices))  # both kinds are there
    for pt, po in zip(
        tg.localiser.probabilities(slices), og.localiser.probabilities(slices), strict=True
    ):
        mt, mo = L.keep_main_components(pt >= 0.5), L.keep_main_components(po >= 0.5)
        assert np.all(np.abs(pt[mt != mo] - 0.5) <= TOL)  # only threshold flips, if any


def test_a_leftover_second_localiser_folder_is_not_exported(exported: Path, tmp_path: Path) -> None:
    """A localiser_second/ the gate does not count (its card names none) is not a served part:
    the default export leaves it out; asking for it is a clear load error, not a crash."""
    from ml_core import gate as G

    folder = _copy(exported, tmp_path)
    shutil.copytree(folder / "localiser", folder / G.SECOND_LOCALISER_DIR)
    (folder / G.SECOND_LOCALISER_DIR / "localiser.onnx").unlink()
    entries = onnx_runtime.export(folder, parts=("localiser", "gate"))
    assert set(entries) == {"localiser", "gate"}
    assert not onnx_runtime._serves(folder, "localiser_second")
    with pytest.raises(ModelLoadError, match="no second localiser"):
        onnx_runtime.export(folder, parts=("localiser_second",))
    assert not (folder / G.SECOND_LOCALISER_DIR / "localiser.onnx").exists()


def test_an_either_gate_exports_and_serves_its_second_gate_through_onnx(
    exported: Path, tmp_path: Path
) -> None:
    """gate_either/ is its own ONNX part: exported beside its weights, served under `onnx`, and
    the union's scores equal TensorFlow's; an artifact without it has nothing to export."""
    from ml_core import gate as G
    from ml_core.localiser import sha256_file

    folder = _copy(exported, tmp_path)
    with pytest.raises(ModelLoadError, match="no gate_either"):
        onnx_runtime.export(folder, parts=("gate_either",))
    either = folder / G.EITHER_GATE_DIR
    either.mkdir()
    for name in (G.CARD_NAME, G.WEIGHTS_NAME):
        shutil.copy2(folder / "gate" / name, either / name)
    gcard = json.loads((either / G.CARD_NAME).read_text())
    (either / G.CARD_NAME).write_text(json.dumps({**gcard, "threshold": 0.9}))
    card = json.loads((folder / CARD).read_text())
    card["files"].update(
        {f"{G.EITHER_GATE_DIR}/{n}": sha256_file(either / n) for n in (G.CARD_NAME, G.WEIGHTS_NAME)}
    )
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    assert onnx_runtime._serves(folder, "gate_either")
    entries = onnx_runtime.export(folder, parts=("gate_either",))
    assert set(entries) == {"gate_either"} and (either / "gate.onnx").is_file()
    tg = Classifier.load(folder, runtime="tf").gate()
    og = Classifier.load(folder, runtime="onnx").gate()
    assert isinstance(og, G.EitherGate) and og.other.runtime == "onnxruntime"
    assert og.runtime == "onnxruntime"
    np.testing.assert_allclose(og.score(_slices()), tg.score(_slices()), atol=TOL)
