"""ONNX Runtime against TensorFlow for the content gate and the liver localiser, on held-out data.

Loads the artifact twice (``Classifier.load(runtime="tf")`` and ``runtime="onnx"``) and, on the
gate's held-out groups of ``bench/ml_gate.py`` (test split + 3Dircadb1.1) in batches of 32,
with every localiser cache emptied, compares per slice: P_cnn, the localiser's letterboxed
probability map (96 px), the gate score and its accept/reject decision, and the liver mask
of ``Localiser.segment`` at the slice's full resolution; for a gate that counts a second
localiser (``localiser_second/``, e.g. 0.5.4) its map and full-resolution mask are compared
the same way (``.../second`` lines). For an artifact with ``gate_either/`` (an EitherGate) those
lines are its first gate's, and the union's scores and decisions are compared too (``.../either``). Then the files of
``bench/ml_gate.validator_files`` (held-out liver slices as CT DICOM, real DICOM, the negative
files) go through the whole ``validate`` with each gate: decisions and reason codes.

Prints JSON lines {"name", "value", "unit", "config"}; the decision rule is in
docs/model_gate.md, "ONNX Runtime for the localiser and the gate".

Usage: python bench/ml_gate_onnx.py [--models DIR (default ml_core/models/CURRENT)] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ml_gate import heldout_groups, validator_files  # noqa: E402

log = logging.getLogger("bench.ml_gate_onnx")


def emit(name: str, value: float, unit: str, config: dict[str, Any]) -> None:
    """Print one JSON line; the value unrounded (differences are ~1e-7)."""
    line = {"name": name, "value": float(value), "unit": unit, "config": config}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


class Tally:
    """Running maxima and counts of the differences between the two runtimes."""

    def __init__(self) -> None:
        self.d_cnn = self.d_loc = self.d_score_same_mask = self.d_score_other_mask = 0.0
        self.slices = self.decisions_differ = self.small_masks_differ = 0
        self.masks = {"first": _MaskTally(), "second": _MaskTally()}

    def add(self, tf_gate: Any, ort_gate: Any, slices: list[np.ndarray]) -> None:
        """Compare one batch of uint8 (H, W) slices."""
        from ml_core import gate as G
        from ml_core import localiser as L

        tl, ol = tf_gate.localiser, ort_gate.localiser
        tf_gate.clear_caches()
        ort_gate.clear_caches()
        p_t, a_t = tf_gate.score_parts(slices)
        p_o, a_o = ort_gate.score_parts(slices)
        keys = [L.slice_key(s) for s in slices]
        m_t, m_o = tl.cached(keys), ol.cached(keys)
        s_t = p_t * G.area_ramp(a_t, tf_gate.area_ramp)
        s_o = p_o * G.area_ramp(a_o, ort_gate.area_ramp)
        thr, lthr = tf_gate.threshold, tl.threshold
        self.slices += len(slices)
        self.d_cnn = max(self.d_cnn, float(np.abs(p_t - p_o).max()))
        self.decisions_differ += int(((s_t >= thr) != (s_o >= thr)).sum())
        for i, (a, b) in enumerate(zip(m_t, m_o, strict=True)):
            assert a is not None and b is not None
            self.d_loc = max(self.d_loc, float(np.abs(a - b).max()))
            d = abs(float(s_t[i] - s_o[i]))
            if np.array_equal(a >= lthr, b >= lthr):
                self.d_score_same_mask = max(self.d_score_same_mask, d)
            else:
                self.small_masks_differ += 1
                self.d_score_other_mask = max(self.d_score_other_mask, d)
        self.masks["first"].add(tl, ol, slices)
        if tf_gate.second is not None:
            self.masks["second"].add(tf_gate.second, ort_gate.second, slices)

    def emit(self, cfg: dict[str, Any]) -> None:
        """Print the tallies as JSON lines."""
        c = {**cfg, "slices": self.slices}
        emit("onnx_max_abs_diff_p_cnn", self.d_cnn, "probability", c)
        emit("onnx_max_abs_diff_localiser_probability", self.d_loc, "probability", c)
        emit("onnx_gate_decisions_differ", self.decisions_differ, "slices", c)
        emit("onnx_max_abs_diff_gate_score/same_mask", self.d_score_same_mask, "probability", c)
        emit("onnx_small_masks_differ", self.small_masks_differ, "slices", c)
        emit("onnx_max_abs_diff_gate_score/other_mask", self.d_score_other_mask, "probability", c)
        for which, m in self.masks.items():
            if m.slices:
                m.emit("" if which == "first" else "/second", c)


class _MaskTally:
    """One localiser's differences between the runtimes: its 96 px map and full-res mask."""

    def __init__(self) -> None:
        self.slices = self.pixels = self.pixels_differ = 0
        self.d_map = 0.0
        self.flip_max_dist = 0.0  # largest |p_tf - threshold| over the differing full-res pixels

    def add(self, tl: Any, ol: Any, slices: list[np.ndarray]) -> None:
        """Compare ``tl`` (TensorFlow) and ``ol`` (ONNX Runtime) on one batch."""
        from ml_core import localiser as L

        lthr = tl.threshold
        keys = [L.slice_key(s) for s in slices]
        for a, b in zip(
            tl.small_probabilities(slices, keys), ol.small_probabilities(slices, keys), strict=True
        ):
            self.d_map = max(self.d_map, float(np.abs(a - b).max()))
        for s, pt, po in zip(
            slices, tl.probabilities(slices), ol.probabilities(slices), strict=True
        ):
            mt = L.keep_main_components(pt >= lthr)
            mo = L.keep_main_components(po >= lthr)
            diff = mt != mo
            self.slices += 1
            self.pixels += mt.size
            self.pixels_differ += int(diff.sum())
            if diff.any():
                self.flip_max_dist = max(self.flip_max_dist, float(np.abs(pt[diff] - lthr).max()))
            assert mt.shape == np.shape(s)[:2]

    def emit(self, suffix: str, c: dict[str, Any]) -> None:
        """Print this localiser's lines (``suffix`` "" for the first, "/second" for the second)."""
        if suffix:
            emit(f"onnx_max_abs_diff_localiser_probability{suffix}", self.d_map, "probability", c)
        emit(
            f"onnx_full_mask_pixels_differ{suffix}",
            self.pixels_differ / max(self.pixels, 1),
            "fraction",
            {**c, "pixels": self.pixels, "differ": self.pixels_differ},
        )
        emit(
            f"onnx_full_mask_flip_max_distance_to_threshold{suffix}",
            self.flip_max_dist,
            "probability",
            c,
        )


def main(argv: list[str] | None = None) -> int:
    """Compare the two runtimes and print JSON lines."""
    parser = argparse.ArgumentParser(prog="bench/ml_gate_onnx.py")
    parser.add_argument("--models", type=Path, default=None, help="artifact folder")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from ml_core.classifier import Classifier, default_model_path
    from ml_core.errors import ModelLoadError
    from ml_core.validation import validate

    folder = args.models or default_model_path()
    tf_union = Classifier.load(folder, runtime="tf").gate()
    try:
        ort_union = Classifier.load(folder, runtime="onnx").gate()
    except ModelLoadError as exc:  # `make bench` runs every bench/ml_*.py: skip, do not fail
        log.warning("bench/ml_gate_onnx.py skipped: %s", exc)
        return 0
    # An EitherGate: the per-part tallies are its first gate's; the union's scores and
    # decisions (its second gate included) are compared below and by the whole validate.
    tf_gate, ort_gate = getattr(tf_union, "first", tf_union), getattr(ort_union, "first", ort_union)
    assert (tf_gate.runtime, tf_gate.localiser.runtime) == ("tensorflow", "tensorflow")
    assert (ort_gate.runtime, ort_gate.localiser.runtime) == ("onnxruntime", "onnxruntime")
    if tf_gate.second is not None:
        assert (tf_gate.second.runtime, ort_gate.second.runtime) == ("tensorflow", "onnxruntime")
    cfg = {"models": str(folder), "threshold": round(tf_gate.threshold, 4)}

    groups = heldout_groups(tf_gate.localiser)
    tally = Tally()
    for imgs in groups.values():
        for i in range(0, len(imgs), args.batch):
            tally.add(tf_gate, ort_gate, list(imgs[i : i + args.batch]))
    tally.emit({**cfg, "data": "gate held-out groups (test split + 3Dircadb1.1)"})
    if tf_union is not tf_gate:
        d_union, differ, n = 0.0, 0, 0
        for imgs in groups.values():
            for i in range(0, len(imgs), args.batch):
                batch = list(imgs[i : i + args.batch])
                tf_union.clear_caches()
                ort_union.clear_caches()
                s_t, s_o = np.asarray(tf_union.score(batch)), np.asarray(ort_union.score(batch))
                d_union = max(d_union, float(np.abs(s_t - s_o).max()))
                differ += int(((s_t >= 0.5) != (s_o >= 0.5)).sum())
                n += len(batch)
        c = {**cfg, "slices": n, "gate": "either (union)"}
        emit("onnx_max_abs_diff_gate_score/either", d_union, "probability", c)
        emit("onnx_gate_decisions_differ/either", differ, "slices", c)

    for kind, files in validator_files().items():
        differ = []
        d_score = 0.0
        for name, data in files:
            tf_union.clear_caches()
            ort_union.clear_caches()
            a, b = validate(data, gate=tf_union), validate(data, gate=ort_union)
            if (a.passed, a.reason_code) != (b.passed, b.reason_code):
                differ.append(name)
            if a.gate_score is not None and b.gate_score is not None:
                d_score = max(d_score, abs(a.gate_score - b.gate_score))
        c = {**cfg, "files": kind, "n": len(files), "differ": differ}
        emit(f"onnx_validate_decisions_differ/{kind}", len(differ), "files", c)
        emit(f"onnx_validate_max_abs_diff_gate_score/{kind}", d_score, "probability", c)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
