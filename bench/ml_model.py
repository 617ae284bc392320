"""Benchmark of the tumor classifier: forward img/s at batch 1/8/32 per runtime, CAM cost, ml_core end to end.

Runtimes: TensorFlow (the compiled function) always; ONNX Runtime too when onnxruntime imports
and the artifact ships a verified classifier.onnx (``config.runtime`` names each line's); the end
to end figure is run for each. Prints JSON lines {"name", "value", "unit", "config"}. Timings
here vary up to 2x from run to run (shared 2-core machine): compare numbers from the same run
only. Uses the shipped model (ml_core/models/CURRENT) when present, else random weights of the
same architecture.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("bench.ml_model")


def emit(name: str, value: float, unit: str, config: dict[str, Any]) -> None:
    """Print one JSON line."""
    sys.stdout.write(
        json.dumps({"name": name, "value": round(value, 3), "unit": unit, "config": config}) + "\n"
    )
    sys.stdout.flush()


def rate(fn: Any, n_items: int, min_s: float = 3.0) -> float:
    """Items per second of ``fn`` after one warm-up call, over at least ``min_s`` seconds."""
    fn()
    t0, k = time.perf_counter(), 0
    while True:
        fn()
        k += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return k * n_items / dt


def main() -> int:
    """Measure each --model (default: the shipped one) in this one run; print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="artifact folder; repeat to compare models within one run (default: CURRENT)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for folder in args.model or [None]:
        measure(folder)
    return 0


def load_classifier(folder: str | None, runtime: str = "tf") -> tuple[Any, str]:
    """The artifact at ``folder`` (default CURRENT) and its name; random B0 weights if none ships."""
    from ml_core.classifier import Classifier, default_model_path

    try:
        clf = Classifier.load(folder or default_model_path(), runtime=runtime)
        return clf, f"{clf.info.name}-{clf.info.version}"
    except Exception as exc:  # no shipped model in this checkout: measure the architecture
        if folder:
            raise
        log.warning("no shipped model (%s); random weights", exc)
        return Classifier.build_untrained(input_size=128), "b0-random-128"


def measure(folder: str | None) -> None:
    """Forward, forward+CAM at batch 1/8/32 (each runtime) and ml_core end to end for one model."""
    import tensorflow as tf

    from ml_core.decoding import decode
    from ml_core.evaluation import load_test, window_u8
    from ml_core.onnx_runtime import DEFAULT_THREADS
    from ml_core.overlay import encode_png, overlay_png
    from ml_core.preprocessing import to_slice_u8

    clf, model = load_classifier(folder)
    runtimes = [clf]
    try:  # the ONNX Runtime forward of the same artifact, when it ships one
        from ml_core.classifier import Classifier, default_model_path

        runtimes.append(Classifier.load(folder or default_model_path(), runtime="onnx"))
    except Exception as exc:  # noqa: BLE001 - no onnxruntime or no export: TensorFlow only
        log.warning("no ONNX Runtime figures: %s", exc)
    size = clf._spec.input_size
    net = clf._network
    cfg = {
        "model": model,
        "input": size,
        "runtime": "tensorflow tf.function",
        "threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }

    @tf.function(reduce_retracing=True)
    def logits_only(x: tf.Tensor) -> tf.Tensor:
        return net(x, training=False)[0]

    rng = np.random.default_rng(0)
    for b in (1, 8, 32):
        x = tf.constant(rng.uniform(0, 255, (b, size, size, 3)).astype(np.float32))
        fwd = rate(lambda x=x: logits_only(x).numpy(), b)
        cam = rate(lambda x=x: [t.numpy() for t in clf._forward(x)], b)
        emit("classifier_forward", fwd, "img/s", {**cfg, "batch": b})
        emit("classifier_forward_with_cam", cam, "img/s", {**cfg, "batch": b})
        emit("cam_cost_ratio", fwd / cam, "x forward", {**cfg, "batch": b})
        for other in runtimes[1:]:  # one call returns logits and CAM: no logits-only figure
            xn = x.numpy()
            ort = rate(lambda xn=xn, o=other: o._forward(xn), b)
            ocfg = {**cfg, "runtime": "onnxruntime CPU", "threads": DEFAULT_THREADS, "batch": b}
            emit("classifier_forward_with_cam", ort, "img/s", ocfg)
            rcfg = {**cfg, "runtime": "onnxruntime / tensorflow", "batch": b}
            emit("onnx_over_tf_forward_with_cam", ort / cam, "x", rcfg)

    import cv2

    t = load_test()
    pngs = [cv2.imencode(".png", window_u8(h, 400, 50))[1].tobytes() for h in t["hu"][:8]]

    def end_to_end(c: Any) -> None:
        if c._localiser is not None:  # every upload is a new slice: the U-Net runs each time
            c._localiser.clear_cache()
        slices = [to_slice_u8(decode(b)) for b in pngs]
        for s, p in zip(slices, c.predict(slices), strict=True):
            overlay_png(s, p.heatmap)
            encode_png(s)

    for c in runtimes:
        emit(
            "ml_core_end_to_end",
            rate(lambda c=c: end_to_end(c), len(pngs), 5.0),
            "img/s",
            {
                **cfg,
                "runtime": c.runtime,
                "localiser_runtime": getattr(c._localiser, "runtime", None),
                "batch": len(pngs),
                "steps": "decode PNG -> to_slice_u8 -> localise+crop -> predict+CAM -> overlay PNG",
            },
        )


if __name__ == "__main__":
    raise SystemExit(main())
