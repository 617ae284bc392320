"""Benchmark of the content gate and the liver localiser: cost per slice and held-out rates.

Prints JSON lines {"name", "value", "unit", "config"}:
- gate_ms_per_slice/batch<N>: wall time of ``LiverGate.score`` on 512x512 uint8 slices
  (letterbox + one compiled call), per slice;
- localiser_ms_per_slice/batch<N>: the same for ``Localiser.segment`` (mask back at 512x512);
- gate_liver_accepted, gate_negatives_rejected: on held-out data at the shipped threshold
  (test split of ml_core/splits.json + 3Dircadb1.1): liver slices (liver >= 1500 px at 512)
  as PNG and JPEG at W350-400/L40-60 and the 8-bit test sources; negatives = the test files of
  ../shared/data/negatives, slices > 25 mm from the liver, lung/bone windows, coronal/sagittal
  reformats, generated documents, textures, noise, montages and viewer screenshots;
- gate_rate/<group>: the rate per group (acceptance for liver groups, rejection otherwise).
Runtimes vary up to 2x from run to run on this shared 2-core machine: compare within a run.

Usage: python bench/ml_gate.py [--models ml_core/models/_staging] [--no-rates]
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

log = logging.getLogger("bench.ml_gate")


def emit(name: str, value: float, unit: str, config: dict[str, Any]) -> None:
    """Print one JSON line."""
    line = {"name": name, "value": round(float(value), 4), "unit": unit, "config": config}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def ms_per_item(fn: Any, n_items: int, min_s: float = 2.0) -> float:
    """Median-free mean ms per item of ``fn`` after one warm-up call, over at least ``min_s``."""
    fn()
    t0, k = time.perf_counter(), 0
    while True:
        fn()
        k += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return 1000.0 * dt / (k * n_items)


def main(argv: list[str] | None = None) -> int:
    """Run the gate/localiser benchmark and print JSON lines."""
    parser = argparse.ArgumentParser(prog="bench/ml_gate.py")
    parser.add_argument(
        "--models", type=Path, default=None, help="folder with localiser/ and gate/"
    )
    parser.add_argument("--no-rates", action="store_true", help="timings only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from ml_core import gate as G
    from ml_core import localiser as L

    folder = args.models or G.STAGING_DIR.parent
    gate = G.LiverGate.load(folder / "gate")
    loc = L.Localiser.load(folder / "localiser")
    cfg = {"models": str(folder), "threshold": round(gate.threshold, 4), "size": "512x512"}

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (512, 512), dtype=np.uint8)
    for n in (1, 8, 32):
        batch = [base.copy() for _ in range(n)]
        emit(
            f"gate_ms_per_slice/batch{n}", ms_per_item(lambda b=batch: gate.score(b), n), "ms", cfg
        )
    for n in (1, 8, 32):
        batch = [base.copy() for _ in range(n)]
        emit(
            f"localiser_ms_per_slice/batch{n}",
            ms_per_item(lambda b=batch: loc.segment(b), n),
            "ms",
            cfg,
        )
    if args.no_rates:
        return 0

    test = G.GatePools("test", loc, seed=2, shrink=4096)
    hold = G.GatePools("holdout", loc, seed=3, shrink=4096)
    groups = G.evaluation_set(test, seed=202)
    groups.update(
        {
            f"{g}@3Dircadb1.1": v
            for g, v in G.evaluation_set(hold, seed=303, n_generated=0).items()
            if g.startswith(("pos/hu", "neg/far", "neg/lung", "neg/reformat"))
        }
    )
    r = G.rates(G.score_groups(gate, groups), gate.threshold)
    rcfg = {
        **cfg,
        "split": "test + 3Dircadb1.1",
        "n_positive": r["n_positive"],
        "n_negative": r["n_negative"],
    }
    emit("gate_liver_accepted", r["liver_accepted"], "fraction", rcfg)
    emit("gate_negatives_rejected", r["negatives_rejected"], "fraction", rcfg)
    for g, v in r["by_group"].items():
        value = v.get("accepted", v.get("rejected"))
        emit(f"gate_rate/{g}", value, "fraction", {**cfg, "n": v["n"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
