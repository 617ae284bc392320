"""Localiser candidates scored on validation for what the classifier and the content gate need.

For each candidate (a localiser folder or a bare ``.weights.h5`` of the U-Net) on the **val**
split only: the patient-mean Dice (``localiser.evaluate``), the smallest liver area it finds on
the val liver slices of at least 3000 px (the gate's counted positive groups, every window and
format) and the largest it finds on the val slices more than 25 mm from the liver (the gate's
far slices). Eligible for the gate: at most 1 % of those liver slices under its full ramp
(600 px at 512 scale; the gate's ≥ 0.99 target) and every far slice at most half the ramp's
start (75 px) (docs/model_gate.md, "Localiser v3", amendment; "Localiser v2 and gate v9").

Usage: python -m ml_core.tools.localiser_scan --candidate shipped=ml_core/models/CURRENT/localiser
       --candidate e2=/work/checkpoints/loc3/epoch_002.weights.h5 [--input-size 96 --base-filters 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIN_TIP_PX = 600.0  # the gate's full area ramp at 512 scale
MAX_FAR_PX = 75.0  # half the ramp's start
MAX_SHARE_UNDER_TIP = 0.01  # the gate's own target: at least 99 % of liver slices accepted


def _load(path: Path, input_size: int, base_filters: int) -> Any:
    from ml_core.localiser import Localiser, build_unet

    if path.is_dir():
        return Localiser.load(path, runtime="tf")
    model = build_unet(input_size, base_filters)
    model.load_weights(str(path))
    return Localiser(model, input_size=input_size, threshold=0.5)


def areas_px512(loc: Any, images: list[np.ndarray]) -> np.ndarray:
    """Localised liver area of each image, in pixels at 512 x 512 (as the gate measures it)."""
    from ml_core.gate import _liver_px_512

    out: list[float] = []
    for i in range(0, len(images), 32):
        out += [_liver_px_512(m) for m in loc.segment(images[i : i + 32])]
    return np.asarray(out)


def scan(
    candidates: dict[str, Path], input_size: int = 96, base_filters: int = 8, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Validation figures and eligibility of each candidate."""
    from ml_core import datasets as D
    from ml_core import gate as G
    from ml_core.localiser import evaluate

    groups = G.evaluation_set(G.GatePools("val", None), seed=seed)
    positives = [x for g, v in groups.items() if G._counted_positive(g) for x in v]
    far = groups.get("neg/far_slices", [])
    samples = {"val": [s for s in D.iter_mask_slices("val") if s[1] is not None]}
    out = {}
    for name, path in candidates.items():
        loc = _load(path, input_size, base_filters)
        dice = evaluate(loc, ("val",), samples=samples)["val"]
        tips = areas_px512(loc, positives)
        far_px = areas_px512(loc, far) if far else np.zeros(1)
        out[name] = {
            "val_dice_patient_mean": round(float(dice["dice_patient_mean"]), 4),
            "val_dice_slice_mean": round(float(dice["dice_slice_mean"]), 4),
            "min_px_on_liver_slices": round(float(tips.min()), 1),
            "liver_slices_under_600px": int((tips < MIN_TIP_PX).sum()),
            "n_liver_slices": len(positives),
            "max_px_on_far_slices": round(float(far_px.max()), 1),
            "n_far_slices": len(far),
            "eligible": bool(
                (tips < MIN_TIP_PX).mean() <= MAX_SHARE_UNDER_TIP and far_px.max() <= MAX_FAR_PX
            ),
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print one line per candidate and a JSON line."""
    parser = argparse.ArgumentParser(prog="python -m ml_core.tools.localiser_scan")
    parser.add_argument("--candidate", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--input-size", type=int, default=96)
    parser.add_argument("--base-filters", type=int, default=8)
    args = parser.parse_args(argv)
    candidates = {c.split("=", 1)[0]: Path(c.split("=", 1)[1]) for c in args.candidate}
    res = scan(candidates, args.input_size, args.base_filters)
    for name, r in res.items():
        print(
            f"{name:10s} val Dice {r['val_dice_patient_mean']:.4f} (slice {r['val_dice_slice_mean']:.4f})"
            f"  min liver {r['min_px_on_liver_slices']:7.0f} px ({r['liver_slices_under_600px']} < 600)"
            f"  max far {r['max_px_on_far_slices']:6.0f} px  {'eligible' if r['eligible'] else '-'}"
        )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
