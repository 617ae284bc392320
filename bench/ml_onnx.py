"""ONNX Runtime vs TensorFlow for the classifier's forward (logits + normalised CAM).

For each --model (default: ml_core/models/CURRENT): converts the compiled forward of
``ml_core.gradcam.make_forward`` (one call: logits (N,), CAM (N, h, w)) with tf2onnx at a
dynamic batch, then measures forward+CAM img/s (median of alternating rounds) at batch 1, 8, 16, 32 for TensorFlow (the
existing tf.function) and ONNX Runtime (CPU, intra-op threads --threads) on the same inputs:
real liver crops (``Classifier.boxes`` + ``crop``/``to_model_input``) of 3Dircadb1.7 slices
windowed W400/L50. Prints JSON lines {"name", "value", "unit", "config"}, including the max
abs difference of logits and CAMs and whether the labels agree. Runtimes on the shared 2-core
machine vary from run to run: compare numbers from the same run only.

    python bench/ml_onnx.py [--model DIR ...] [--threads 2] [--min-s 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.ml_model import rate  # noqa: E402  (items per second after a warm-up call)

log = logging.getLogger("bench.ml_onnx")

VOLUME = Path(__file__).resolve().parents[2] / "shared" / "data" / "ircadb" / "3Dircadb1.7.npz"
BATCHES = (1, 8, 16, 32)


def emit(name: str, value: float, unit: str, config: dict[str, Any]) -> None:
    """Print one JSON line."""
    sys.stdout.write(
        json.dumps({"name": name, "value": round(value, 6), "unit": unit, "config": config}) + "\n"
    )
    sys.stdout.flush()


def real_inputs(clf: Any, volume: Path, n: int) -> np.ndarray:
    """Model inputs float32 (n, S, S, 3): liver crops of ``n`` slices spread over the liver's extent."""
    from ml_core.classifier import crop, to_model_input
    from ml_core.preprocessing import window

    with np.load(volume) as d:
        hu, liver = d["ct_hu"], d["liver"]
    zs = np.nonzero(liver.reshape(len(liver), -1).any(axis=1))[0]
    picks = zs[np.linspace(0, len(zs) - 1, n).round().astype(int)]
    slices = [window(hu[z]) for z in picks]
    boxes = clf.boxes(slices)
    size = clf.input_size
    return to_model_input([crop(s, b, size) for s, b in zip(slices, boxes, strict=True)])


def measure(folder: Path, args: argparse.Namespace) -> None:
    """Convert, compare and time one artifact."""
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    from ml_core import onnx_runtime
    from ml_core.classifier import Classifier, calibrated_probability

    clf = Classifier.load(folder, runtime="tf")  # the TF function is what gets converted
    model = f"{clf.info.name}-{clf.info.version}"
    size = clf.input_size
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "classifier.onnx"
        onnx_runtime.convert(clf._forward, (None, size, size, 3), path, args.opset)
        convert_s = time.perf_counter() - t0
        onnx_mb = path.stat().st_size / 1e6
        sess = onnx_runtime.open_session(path, args.threads)
    in_name = sess.get_inputs()[0].name
    base = {
        "model": model,
        "input": size,
        "onnxruntime": ort.__version__,
        "tf2onnx": tf2onnx.__version__,
        "tensorflow": tf.__version__,
        "opset": args.opset,
    }
    emit("onnx_convert_seconds", convert_s, "s", base)
    emit("onnx_file_size", onnx_mb, "MB", base)

    x_all = real_inputs(clf, args.volume, args.n)
    tf_logits, tf_cams = (np.asarray(t) for t in clf._forward(tf.constant(x_all)))
    ort_logits, ort_cams = sess.run(None, {in_name: x_all})
    d_logit = float(np.abs(tf_logits - ort_logits).max())
    d_cam = float(np.abs(tf_cams - ort_cams).max())
    lab_tf = calibrated_probability(tf_logits, clf.temperature, clf.logit_offset) >= clf.threshold
    lab_ort = calibrated_probability(ort_logits, clf.temperature, clf.logit_offset) >= clf.threshold
    cfg = {**base, "inputs": f"{args.n} liver crops of 3Dircadb1.7 (W400/L50)"}
    emit("max_abs_diff_logit", d_logit, "logit", cfg)
    emit("max_abs_diff_cam", d_cam, "cam", cfg)
    emit("labels_equal", float((lab_tf == lab_ort).mean()), "fraction", cfg)

    tf_threads = tf.config.threading.get_intra_op_parallelism_threads()
    for b in BATCHES:
        x = x_all[np.arange(b) % len(x_all)]
        xt = tf.constant(x)
        runs: dict[str, list[float]] = {"tf": [], "onnx": []}
        for _ in range(args.rounds):  # alternate, so drifting machine load hits both runtimes
            runs["tf"].append(
                rate(lambda xt=xt: [t.numpy() for t in clf._forward(xt)], b, args.min_s)
            )
            runs["onnx"].append(rate(lambda x=x: sess.run(None, {in_name: x}), b, args.min_s))
        med = {rt: float(np.median(v)) for rt, v in runs.items()}
        for rt, label, threads in (
            ("tf", "tensorflow tf.function", tf_threads),
            ("onnx", "onnxruntime CPU", args.threads),
        ):
            emit(
                "classifier_forward_with_cam",
                med[rt],
                "img/s",
                {
                    **base,
                    "runtime": label,
                    "threads": threads,
                    "batch": b,
                    "rounds": [round(r, 2) for r in runs[rt]],
                },
            )
        emit("onnx_speedup", med["onnx"] / med["tf"], "x tf (medians)", {**base, "batch": b})


def main() -> int:
    """Measure each --model (default CURRENT) in this one run."""
    from ml_core.classifier import default_model_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None, help="artifact folder (repeat)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--volume", type=Path, default=VOLUME, help="ircadb .npz (ct_hu, liver)")
    parser.add_argument("--n", type=int, default=32, help="real crops compared")
    parser.add_argument("--min-s", type=float, default=3.0, help="seconds per timing")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating TF/ORT timings per batch"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for needed in ("onnxruntime", "tf2onnx"):
        try:
            importlib.import_module(needed)
        except ModuleNotFoundError:  # `make bench` runs every bench/ml_*.py: skip, do not fail
            log.warning(
                "bench/ml_onnx.py skipped: %s is not installed (the onnx-export extra)", needed
            )
            return 0
    for folder in args.model or [str(default_model_path())]:
        measure(Path(folder), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
