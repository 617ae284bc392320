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
- gate_rate/<group>: the rate per group (acceptance for liver groups, rejection otherwise);
- validate_ms/<format>: median wall time of the whole ``validate(data, gate=gate)`` (decode,
  rule layers, content gate with its localiser run) on one 512x512 liver slice as PNG, JPEG
  and DICOM, the localisers' caches emptied before each call (every upload is a new slice);
- upload_ms/<format>: validate + ``Classifier.predict`` on the validated slice (the worker's
  two ml_core calls), and upload_ms_localiser_twice/<format> the same with the cache emptied
  between the two calls (as before the localiser output was shared);
- validator_liver_accepted/dicom: held-out liver slices written as CT DICOM through the
  whole validator; validator_liver_accepted/real_dicom_<split>: the real DICOM liver slices
  (pydicom's abdomen CT and MR: test; TotalSegmentator's 20-slice CT series: val); validator_negatives_rejected: the files of ../shared/data/negatives
  through the whole validator (rules, then gate), test split and all files.
Runtimes vary up to 2x from run to run on this shared 2-core machine: compare within a run.
``--runtime`` (auto | tf | onnx, as ``Classifier.load``) picks what runs the gate CNN and the
localiser U-Net (and the classifier in upload_ms); every line's config names the runtimes used.

Usage: python bench/ml_gate.py [--models DIR (default: the shipped model, ml_core/models/CURRENT)] [--no-rates] [--runtime auto|tf|onnx]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

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


def median_ms(fn: Any, repeats: int = 30, before: Any = None) -> float:
    """Median ms of ``fn()`` over ``repeats`` calls after one warm-up (``before()`` untimed, each time)."""
    times = []
    for k in range(repeats + 1):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        if k:
            times.append(1000.0 * (time.perf_counter() - t0))
    return float(np.median(times))


def bench_validate(gate: Any, folder: Path, cfg: dict[str, Any], runtime: str = "auto") -> None:
    """Whole-validator and validate+predict cost per 512x512 upload (PNG, JPEG, DICOM)."""
    from ml_validation import ct_dicom, encode

    from ml_core import datasets as D
    from ml_core.classifier import Classifier
    from ml_core.validation import validate

    vol = D.load_hu_volume("ircadb", "3Dircadb1.1")
    z = int(np.argmax(vol.liver.reshape(vol.liver.shape[0], -1).sum(axis=1)))
    u8 = D.window_u8(vol.hu[z], 400, 50)
    uploads = {"png": encode("png", u8), "jpeg": encode("jpeg", u8), "dicom": ct_dicom(vol.hu[z])}
    loc = gate.localiser
    clf = None
    if (folder / "model_card.json").is_file():
        clf = Classifier.load(folder, runtime=runtime)
        gate = clf.gate()  # the worker's objects: one localiser shared by gate and classifier
        loc = gate.localiser
    for fmt, data in uploads.items():
        c = {**cfg, "format": fmt, "repeats": 30}
        emit(
            f"validate_ms/{fmt}",
            median_ms(lambda d=data: validate(d, gate=gate), before=gate.clear_caches),
            "ms",
            c,
        )
        if clf is None:
            continue

        def upload(d: bytes = data, twice: bool = False) -> None:
            report = validate(d, gate=gate)
            if twice:
                loc.clear_cache()
            clf.predict([report.slice_u8])

        emit(f"upload_ms/{fmt}", median_ms(upload, before=gate.clear_caches), "ms", c)
        emit(
            f"upload_ms_localiser_twice/{fmt}",
            median_ms(lambda: upload(twice=True), before=gate.clear_caches),
            "ms",
            c,
        )


def validator_files() -> dict[str, list[tuple[str, bytes]]]:
    """Files for the whole validator, as (name, bytes) by kind.

    "dicom": the held-out liver slices (test split + 3Dircadb1.1, liver >= MIN_EVAL_LIVER_PX_512
    at 512) written as CT DICOM at W400/L50's source HU; "real_dicom_test" / "real_dicom_val":
    the real DICOM liver slices (pydicom's abdomen CT and MR; TotalSegmentator's 20-slice CT
    series); "negatives": every file of ../shared/data/negatives (named by its relative path).
    """
    from ml_validation import ct_dicom

    from ml_core import datasets as D
    from ml_core import gate as G

    liver = []
    for split in ("test", "holdout"):
        for vol in D.iter_hu_volumes(split):
            if vol.liver is None:
                continue
            px = vol.liver.reshape(vol.liver.shape[0], -1).sum(axis=1) * (512.0 * 512.0)
            px /= vol.liver.shape[1] * vol.liver.shape[2]
            for zi in np.flatnonzero(px >= G.MIN_EVAL_LIVER_PX_512):
                liver.append((f"{vol.patient}#z={zi}", ct_dicom(vol.hu[zi])))
    root = D.default_root()
    real = {
        "test": sorted((root / "pydicom_abdomen").glob("*.dcm")),
        "val": sorted((root / "totalsegmentator" / "example_ct_dicom").iterdir()),
    }
    out = {"dicom": liver}
    for split, files in real.items():
        out[f"real_dicom_{split}"] = [(f.name, f.read_bytes()) for f in files]
    negatives = sorted(D.load_splits()["negatives"])
    out["negatives"] = [(rel, (root / "negatives" / rel).read_bytes()) for rel in negatives]
    return out


def bench_validator_rates(gate: Any, cfg: dict[str, Any]) -> None:
    """Held-out liver slices as CT DICOM, and the negative files, through the whole validator."""
    from ml_core import datasets as D
    from ml_core import gate as G
    from ml_core.validation import validate

    files = validator_files()
    liver = files["dicom"]
    ok = sum(validate(data, gate=gate).passed for _name, data in liver)
    emit(
        "validator_liver_accepted/dicom",
        ok / max(len(liver), 1),
        "fraction",
        {
            **cfg,
            "n": len(liver),
            "min_liver_px_512": G.MIN_EVAL_LIVER_PX_512,
            "window": "W400/L50",
        },
    )
    for split in ("test", "val"):
        real = files[f"real_dicom_{split}"]
        passed = [validate(data, gate=gate).passed for _name, data in real]
        emit(
            f"validator_liver_accepted/real_dicom_{split}",
            float(np.mean(passed)),
            "fraction",
            {
                **cfg,
                "n": len(real),
                "rejected": [name for (name, _d), ok in zip(real, passed, strict=True) if not ok],
            },
        )
    splits = D.load_splits()["negatives"]
    rejected: dict[str, list[bool]] = {"test": [], "all": []}
    passed_names = []
    for rel, data in files["negatives"]:
        r = validate(data, gate=gate)
        rejected["all"].append(not r.passed)
        if splits[rel] == "test":
            rejected["test"].append(not r.passed)
        if r.passed:
            passed_names.append(rel)
    for k, v in rejected.items():
        emit(
            f"validator_negatives_rejected/{k}",
            float(np.mean(v)),
            "fraction",
            {**cfg, "n": len(v), "passed": passed_names if k == "all" else None},
        )


def heldout_groups(loc: Any) -> dict[str, list[np.ndarray]]:
    """The gate's held-out slices by group (test split + 3Dircadb1.1), uint8 (H, W) each."""
    from ml_core import gate as G

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
    return groups


def main(argv: list[str] | None = None) -> int:
    """Run the gate/localiser benchmark and print JSON lines."""
    parser = argparse.ArgumentParser(prog="bench/ml_gate.py")
    parser.add_argument(
        "--models", type=Path, default=None, help="folder with localiser/ and gate/"
    )
    parser.add_argument("--no-rates", action="store_true", help="timings only")
    parser.add_argument(
        "--runtime",
        choices=("auto", "tf", "onnx"),
        default="auto",
        help="what runs the gate CNN, the localiser and the classifier (Classifier.load)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from ml_core import gate as G
    from ml_core import localiser as L
    from ml_core.classifier import default_model_path

    folder = args.models or default_model_path()
    gate = G.load_gate(folder, runtime=args.runtime)  # an EitherGate when gate_either/ is there
    loc = L.Localiser.load(folder / "localiser", runtime=args.runtime)
    cfg = {
        "models": str(folder),
        "threshold": round(gate.threshold, 4),
        "size": "512x512",
        "runtime": {"gate": gate.runtime, "localiser": loc.runtime},
    }

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (512, 512), dtype=np.uint8)
    for n in (1, 8, 32):
        batch = [base.copy() for _ in range(n)]

        def fresh_gate(b: list[np.ndarray] = batch) -> None:
            gate.clear_caches()
            gate.score(b)

        emit(f"gate_ms_per_slice/batch{n}", ms_per_item(fresh_gate, n), "ms", cfg)
    for n in (1, 8, 32):
        batch = [base.copy() for _ in range(n)]

        def fresh_segment(b: list[np.ndarray] = batch) -> None:
            loc.clear_cache()
            loc.segment(b)

        emit(f"localiser_ms_per_slice/batch{n}", ms_per_item(fresh_segment, n), "ms", cfg)
    bench_validate(gate, folder, cfg, args.runtime)
    if args.no_rates:
        return 0
    bench_validator_rates(gate, cfg)

    groups = heldout_groups(loc)
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
