"""The classifier's forward through ONNX Runtime: equal to TensorFlow, verified, with a clear fallback.

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
    atrous scored on its stride-16 cells (random weights, real files and sha256s)."""
    import keras

    from ml_core.classifier import WEIGHTS, build_network, combined_sha256, sha256_file

    write_untrained_artifact(folder)
    keras.utils.set_random_seed(4)
    build_network(64, "lite0", head="max", output_stride=16).save_weights(str(folder / WEIGHTS))
    card = json.loads((folder / CARD).read_text())
    card["backbone"] = "lite0"
    card["input"].update(size=64, head="max", output_stride=8, score_stride=16)
    card["files"] = {k: sha256_file(folder / k) for k in card["files"]}
    card["sha256"] = combined_sha256(card["files"])
    (folder / CARD).write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Lite0 artifact with classifier.onnx exported into it."""
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
    (folder / CARD).write_text(json.dumps(card))
    return folder


def test_export_records_the_file_and_keeps_the_artifact_identity(exported: Path) -> None:
    """The card gains runtimes.onnx (sha256, opset, converter, differences); its files/sha256 do not change."""
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
    (folder / CARD).write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="other weights"):
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
