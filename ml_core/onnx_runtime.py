"""The classifier's forward through ONNX Runtime: export (tf2onnx) and a verified session.

``export`` converts the compiled forward of ``ml_core.gradcam.make_forward`` (images float32
(N, S, S, 3) 0..255 -> logits (N,), CAM (N, h, w) in [0, 1], one call, dynamic batch) into
``classifier.onnx`` in the artifact folder, checks ONNX Runtime against TensorFlow on
``check`` inputs, and records the file's sha256 and the differences in the card under
``runtimes.onnx``. The card's top-level ``files``/``sha256`` (the artifact identity every job
records) are not changed: the ONNX file is a derived, verified copy of the same weights.

``load_forward`` opens a session only when the file matches that sha256 (else ModelLoadError).
onnxruntime is the serving dependency (the ``ml`` extra); tf2onnx and onnx are needed by
``export`` only (the ``onnx-export`` extra). Both are imported lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ml_core.errors import ModelLoadError

log = logging.getLogger(__name__)

ONNX_FILE = "classifier.onnx"
OPSET = 17
#: Largest |ONNX Runtime - TensorFlow| accepted on the check inputs, for logits and for CAMs.
TOLERANCE = 1e-3
DEFAULT_THREADS = 2


def available() -> bool:
    """True when onnxruntime imports."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_entry(card: dict[str, Any]) -> dict[str, Any] | None:
    """The card's ``runtimes.onnx`` entry, or None."""
    entry = (card.get("runtimes") or {}).get("onnx")
    return entry if isinstance(entry, dict) else None


class OnnxForward:
    """Callable images float32 (N, S, S, 3) -> (logits (N,), CAM (N, h, w)), like make_forward's."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name

    def __call__(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(np.asarray(images, np.float32))
        logits, cams = self._session.run(None, {self._input: x})
        return logits, cams


def load_forward(folder: Path, card: dict[str, Any], threads: int = DEFAULT_THREADS) -> OnnxForward:
    """ONNX Runtime session of <folder>/classifier.onnx after its sha256 check; ModelLoadError if not."""
    from ml_core.classifier import WEIGHTS, sha256_file

    try:
        import onnxruntime  # noqa: F401  (a clear error before anything else)
    except ImportError as exc:
        raise ModelLoadError(
            "runtime 'onnx' needs onnxruntime (pip install onnxruntime, in the 'ml' extra)"
        ) from exc
    entry = onnx_entry(card)
    if entry is None:
        raise ModelLoadError(f"model card has no runtimes.onnx entry ({ONNX_FILE} not exported)")
    path = folder / str(entry.get("file", ONNX_FILE))
    if not path.is_file():
        raise ModelLoadError(f"model file missing: {path.name}")
    if sha256_file(path) != entry.get("sha256"):
        raise ModelLoadError(f"model file fails its sha256 check: {path.name}")
    weights = str(card.get("weights", WEIGHTS))
    if entry.get("weights_sha256") != card["files"].get(weights):
        raise ModelLoadError(f"{path.name} was exported from other weights than {weights}")
    try:
        session = open_session(path, threads)
    except Exception as exc:  # noqa: BLE001 - any ORT failure is a load failure
        raise ModelLoadError(
            f"{path.name} does not load in onnxruntime: {type(exc).__name__}"
        ) from exc
    return OnnxForward(session)


def open_session(path: Path, threads: int = DEFAULT_THREADS) -> Any:
    """An ONNX Runtime CPU session of ``path`` (no checks): ``threads`` intra-op, full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def convert(clf: Any, path: Path, opset: int = OPSET) -> None:
    """Convert a TensorFlow-served Classifier's compiled forward (logits + CAM, dynamic batch) to ``path``."""
    import tensorflow as tf
    import tf2onnx

    size = clf.input_size
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="image"),)
    tf2onnx.convert.from_function(
        clf._forward, input_signature=spec, opset=opset, output_path=str(path)
    )


def check_inputs(clf: Any, volume: Path | None = None, n: int = 16, seed: int = 0) -> np.ndarray:
    """Inputs float32 (n, S, S, 3) for the export check: noise 0..255, or liver crops of ``volume``.

    ``volume``: an .npz with ``ct_hu`` (Z, H, W) HU and ``liver`` (Z, H, W) bool (3D-IRCADb as
    stored under ../shared/data/ircadb); ``n`` slices spread over the liver, windowed W400/L50,
    cropped by the card's rule (margin, crop floor) around the reference liver mask.
    """
    size = clf.input_size
    if volume is None:
        rng = np.random.default_rng(seed)
        return rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    from ml_core.classifier import crop, square_box, to_model_input
    from ml_core.preprocessing import window

    with np.load(volume) as d:
        hu, liver = d["ct_hu"], d["liver"]
    zs = np.nonzero(liver.reshape(len(liver), -1).any(axis=1))[0]
    picks = zs[np.linspace(0, len(zs) - 1, n).round().astype(int)]
    crops = []
    for z in picks:
        box = square_box(liver[z], clf._spec.margin, clf._spec.min_side_frac)
        assert box is not None  # z has liver
        crops.append(crop(window(hu[z]), box, size))
    return to_model_input(crops)


def export(
    folder: str | Path,
    *,
    opset: int = OPSET,
    volume: Path | None = None,
    threads: int = DEFAULT_THREADS,
) -> dict[str, Any]:
    """Write <folder>/classifier.onnx, check it against TensorFlow, record it in the card; returns the entry.

    Raises ModelLoadError, leaving the folder as it was, when the export does not run in ONNX
    Runtime or its outputs differ from TensorFlow's by more than TOLERANCE.
    """
    import tensorflow as tf
    import tf2onnx

    from ml_core.classifier import CARD, WEIGHTS, Classifier, read_card, sha256_file

    folder = Path(folder)
    clf = Classifier.load(folder, runtime="tf")
    path = folder / ONNX_FILE
    tmp = path.with_suffix(".onnx.tmp")
    t0 = time.perf_counter()
    try:
        convert(clf, tmp, opset)
    except Exception as exc:  # noqa: BLE001 - an op tf2onnx cannot convert, at this opset
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"tf2onnx cannot convert the forward: {type(exc).__name__}: {exc}"
        ) from exc
    seconds = time.perf_counter() - t0
    card = read_card(folder)
    digest = sha256_file(tmp)
    weights = str(card.get("weights", WEIGHTS))
    entry: dict[str, Any] = {
        "file": ONNX_FILE,
        "sha256": digest,
        "weights_sha256": card["files"].get(weights),
    }
    # Check the new file under its temporary name: a failed export leaves any previous one intact.
    probe = {
        **card,
        "runtimes": {**(card.get("runtimes") or {}), "onnx": {**entry, "file": tmp.name}},
    }
    try:
        forward = load_forward(folder, probe, threads)
        x = check_inputs(clf, volume)
        tf_logits, tf_cams = (np.asarray(t) for t in clf._forward(tf.constant(x)))
        ort_logits, ort_cams = forward(x)
    except ModelLoadError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a graph input tf2onnx left unbound
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"the ONNX export does not run in onnxruntime: {type(exc).__name__}: {exc}"
        ) from exc
    d_logit = float(np.abs(tf_logits - ort_logits).max())
    d_cam = float(np.abs(tf_cams - ort_cams).max())
    if not (d_logit <= TOLERANCE and d_cam <= TOLERANCE):
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"ONNX export differs from TensorFlow: max |dlogit| {d_logit:.2e}, "
            f"max |dCAM| {d_cam:.2e} (tolerance {TOLERANCE:g})"
        )
    tmp.replace(path)
    import onnx
    import onnxruntime

    entry.update(
        {
            "opset": opset,
            "converter": {
                "tf2onnx": tf2onnx.__version__,
                "onnx": onnx.__version__,
                "tensorflow": tf.__version__,
            },
            "checked_with": {"onnxruntime": onnxruntime.__version__},
            "check_inputs": (
                f"{len(x)} liver crops of {Path(volume).name} (W400/L50)"
                if volume
                else f"{len(x)} uniform-noise images 0..255 (seed 0)"
            ),
            "max_abs_diff_logit": d_logit,
            "max_abs_diff_cam": d_cam,
            "tolerance": TOLERANCE,
            "size_bytes": path.stat().st_size,
            "note": f"derived from {weights} (weights_sha256); not part of the card's sha256",
        }
    )
    card.setdefault("runtimes", {})["onnx"] = entry
    (folder / CARD).write_text(json.dumps(card, indent=2))
    log.info(
        "wrote %s (%.1f MB, %.0f s): max |dlogit| %.2e, max |dCAM| %.2e",
        path,
        entry["size_bytes"] / 1e6,
        seconds,
        d_logit,
        d_cam,
    )
    return entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m ml_core export-onnx``."""
    parser.add_argument("--model", required=True, metavar="DIR", help="model artifact folder")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument(
        "--volume",
        type=Path,
        default=None,
        help="check on liver crops of this .npz (ct_hu, liver), e.g. ../shared/data/ircadb/3Dircadb1.7.npz; default noise",
    )


def run(args: argparse.Namespace) -> int:
    """Export and print the card entry as JSON; 0 on success, 1 when it fails, 2 without tf2onnx/onnx."""
    try:
        entry = export(args.model, opset=args.opset, volume=args.volume)
    except ModuleNotFoundError as exc:
        if exc.name not in ("tf2onnx", "onnx", "onnxruntime"):
            raise
        log.error("export-onnx needs %s: pip install -e '.[ml,onnx-export]'", exc.name)
        return 2
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(entry, indent=2))
    return 0
