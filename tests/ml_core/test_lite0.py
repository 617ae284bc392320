"""The Keras EfficientNet-Lite0 port: same ImageNet logits as the original torch model, strict loading."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml_core.errors import MLCoreError
from ml_core.tools.convert_lite0 import SKIMAGE_DIR, reference_input

pytest.importorskip("tensorflow")

from ml_core import lite0  # noqa: E402  (after the TensorFlow skip)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).parent / "fixtures" / "lite0_reference.json"
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference() -> dict:
    """The torch model's recorded logits on the reference photos."""
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def imagenet_model():
    """The Keras Lite0 with the shipped ImageNet weights (full model, logits)."""
    return lite0.build_lite0(weights_path="imagenet")


@pytest.fixture(scope="module")
def reference_batch(reference: dict) -> np.ndarray:
    """uint8 RGB (4, 224, 224, 3): the reference photos exactly as the torch model saw them."""
    return np.stack([reference_input(SKIMAGE_DIR / img["file"]) for img in reference["images"]])


def _logits(model, rgb_u8: np.ndarray) -> np.ndarray:
    return np.asarray(model(rgb_u8.astype(np.float32), training=False))


def test_same_pixels_as_the_torch_reference(reference: dict, reference_batch: np.ndarray) -> None:
    """The test feeds the very pixels the torch model was run on (else the comparison is moot)."""
    for img, rgb in zip(reference["images"], reference_batch, strict=True):
        assert hashlib.sha256(rgb.tobytes()).hexdigest() == img["input_sha256"], img["file"]


def test_imagenet_logits_match_the_original_torch_model(
    imagenet_model, reference: dict, reference_batch: np.ndarray
) -> None:
    """On a cat, an espresso, an astronaut and a motorbike the port gives the torch logits."""
    logits = _logits(imagenet_model, reference_batch)
    assert logits.shape == (len(reference["images"]), 1000)
    for img, got in zip(reference["images"], logits, strict=True):
        want = np.asarray(img["logits"], dtype=np.float32)
        assert np.max(np.abs(got - want)) <= TOLERANCE, img["file"]
        assert int(np.argmax(got)) == img["top5"][0], img["file"]
    # The photos are recognised for what they are: a cat, an espresso.
    top1 = {
        img["file"]: int(np.argmax(row))
        for img, row in zip(reference["images"], logits, strict=True)
    }
    assert top1["chelsea.png"] in {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert top1["coffee.png"] == 967  # espresso


def test_feature_extractor_ends_in_the_1280_channel_map(imagenet_model) -> None:
    """include_top=False gives the ReLU6 1280-channel map; pooling it + the fc gives the logits."""
    features = lite0.build_lite0(include_top=False, weights_path="imagenet")
    assert features.layers[-1].name == lite0.FEATURE_LAYER
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(2, 193, 161, 3), dtype=np.uint8)
    fmap = np.asarray(features(rgb.astype(np.float32), training=False))
    assert fmap.shape == (2, 7, 6, 1280)  # ceil(193/32), ceil(161/32): TF 'same' padding
    assert fmap.min() >= 0.0 and fmap.max() <= 6.0  # ReLU6
    kernel, bias = imagenet_model.get_layer(lite0.LOGITS_LAYER).get_weights()
    via_features = fmap.mean(axis=(1, 2)) @ kernel + bias
    np.testing.assert_allclose(via_features, _logits(imagenet_model, rgb), atol=1e-4)


@pytest.mark.parametrize("size", [64, 48])
def test_atrous_stride_8_holds_the_stride_16_map_as_its_odd_subgrid(size: int) -> None:
    """output_stride=8 runs the stride-16 weights atrous: the stride-16 map is its [1::2, 1::2] subgrid.

    Exact at every position, borders included (TensorFlow 'SAME' padding of an even map centres a
    stride-2 window at 2i + 1; the dilated windows at odd positions read only odd positions and
    pad with zeros exactly where the stride-16 network does), so the tolerance is float rounding.
    """
    os16 = lite0.build_lite0(
        (size, size, 3), include_top=False, weights_path="imagenet", output_stride=16
    )
    os8 = lite0.build_lite0(
        (size, size, 3), include_top=False, weights_path="imagenet", output_stride=8
    )
    assert os8.count_params() == os16.count_params()
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    coarse = np.asarray(os16(x, training=False))
    fine = np.asarray(os8(x, training=False))
    assert coarse.shape == (2, size // 16, size // 16, 1280)
    assert fine.shape == (2, size // 8, size // 8, 1280)
    assert coarse.std() > 0.1  # not a saturated or dead map
    np.testing.assert_allclose(fine[:, 1::2, 1::2], coarse, rtol=0, atol=1e-5)
    # The other positions are new cells, not copies of the stride-16 ones.
    assert np.abs(fine[:, ::2, ::2] - coarse).max() > 0.1
    dilated = {
        layer.name for layer in os8.layers if getattr(layer, "dilation_rate", (1, 1)) == (2, 2)
    }
    assert dilated == {f"{b}_dwconv" for b in lite0.BLOCK_NAMES if b >= "block4b"}
    assert os8.get_layer("block4a_dwconv").strides == (1, 1)
    assert all(getattr(layer, "dilation_rate", (1, 1)) == (1, 1) for layer in os16.layers)


def test_output_stride_other_than_8_16_32_is_refused() -> None:
    """Only the three documented strides build."""
    with pytest.raises(ValueError):
        lite0.build_lite0((64, 64, 3), include_top=False, output_stride=4)


def test_random_init_without_weights_is_untrained(
    imagenet_model, reference: dict, reference_batch: np.ndarray
) -> None:
    """weights_path=None builds the same architecture, untrained (for a from-scratch baseline)."""
    model = lite0.build_lite0(input_shape=(224, 224, 3))
    assert model.count_params() == imagenet_model.count_params() == 4_694_024
    want = np.asarray(reference["images"][0]["logits"], dtype=np.float32)
    assert np.max(np.abs(_logits(model, reference_batch[:1])[0] - want)) > 1.0


def test_missing_weights_file_is_a_model_load_error(tmp_path: Path) -> None:
    """A weights path that does not exist fails loudly, never a silent random init."""
    with pytest.raises(MLCoreError) as err:
        lite0.build_lite0(weights_path=tmp_path / "nope.weights.h5")
    assert err.value.code == "model_load_error"


def test_corrupted_weights_fail_the_sha256_check(tmp_path: Path) -> None:
    """One flipped byte in the shipped weights is caught by the sha256 check before loading."""
    bad = tmp_path / "lite0.weights.h5"
    shutil.copyfile(lite0.PRETRAINED_WEIGHTS, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    expected = lite0.pretrained_provenance()["sha256"]
    with pytest.raises(MLCoreError) as err:
        lite0.build_lite0(weights_path=bad, weights_sha256=expected)
    assert err.value.code == "model_load_error"
    assert "sha256" in str(err.value)


def test_truncated_weights_without_a_checksum_still_fail(tmp_path: Path) -> None:
    """A file that is not a readable weights file fails at load even without a sha256 given."""
    bad = tmp_path / "lite0.weights.h5"
    bad.write_bytes(lite0.PRETRAINED_WEIGHTS.read_bytes()[:4096])
    with pytest.raises(MLCoreError) as err:
        lite0.build_lite0(weights_path=bad)
    assert err.value.code == "model_load_error"


def test_wrong_shape_weights_are_a_model_load_error(tmp_path: Path) -> None:
    """Weights whose classifier has the wrong shape are refused, not partially loaded."""
    import h5py

    bad = tmp_path / "lite0.weights.h5"
    shutil.copyfile(lite0.PRETRAINED_WEIGHTS, bad)
    with h5py.File(bad, "r+") as fh:
        kernels = [n for n in _datasets(fh) if n.startswith("layers/dense") and n.endswith("0")]
        assert len(kernels) == 1
        del fh[kernels[0]]
        fh.create_dataset(kernels[0], data=np.zeros((1280, 10), dtype=np.float32))
    with pytest.raises(MLCoreError) as err:
        lite0.build_lite0(weights_path=bad)
    assert err.value.code == "model_load_error"


def test_weights_of_another_architecture_are_a_model_load_error(tmp_path: Path) -> None:
    """A weights file of some other Keras model is refused."""
    import keras

    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "other.weights.h5"
    other.save_weights(path)
    with pytest.raises(MLCoreError) as err:
        lite0.build_lite0(weights_path=path)
    assert err.value.code == "model_load_error"


def _datasets(fh) -> list[str]:
    import h5py

    names: list[str] = []
    fh.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _torch_python() -> str | None:
    """An interpreter that has torch and the source packages: this one, or LIVERSCAN_TORCH_PYTHON."""
    if importlib.util.find_spec("torch") and importlib.util.find_spec("efficientnet_lite_pytorch"):
        return sys.executable
    candidate = os.environ.get("LIVERSCAN_TORCH_PYTHON", "")
    return candidate if candidate and Path(candidate).is_file() else None


@pytest.mark.slow
def test_live_torch_comparison_at_any_size(imagenet_model, tmp_path: Path) -> None:
    """Against the running torch original (when installed): equal logits at odd sizes too."""
    python = _torch_python()
    if python is None:
        pytest.skip("torch + efficientnet_lite_pytorch not installed (set LIVERSCAN_TORCH_PYTHON)")
    rng = np.random.default_rng(8)
    for shape, dynamic in (((2, 224, 224, 3), False), ((2, 193, 161, 3), True)):
        rgb = rng.integers(0, 256, size=shape, dtype=np.uint8)
        inp, out = tmp_path / "in.npy", tmp_path / "out.npy"
        np.save(inp, rgb)
        cmd = [python, "-m", "ml_core.tools.convert_lite0", "logits", "--input", str(inp)]
        cmd += ["--out", str(out)] + (["--dynamic"] if dynamic else [])
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        subprocess.run(cmd, check=True, cwd=REPO_ROOT, env=env, timeout=300)
        want = np.load(out)
        got = _logits(imagenet_model, rgb)
        assert np.max(np.abs(got - want)) <= TOLERANCE, shape
        assert (got.argmax(axis=1) == want.argmax(axis=1)).all(), shape
