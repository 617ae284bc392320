"""Validator figures: rule-layer cost per 512x512 slice, and rule-layer accept/reject rates.

Prints one JSON line per figure: {"name", "value", "unit", "config"}. The content gate is not
run here (it is the model's cost, measured with the model); ``gate=None`` means rules only.

- validate_rules_ms/<format>: median wall time of ``validate(data, gate=None)``;
- decode_ms/<format>: median wall time of ``decode`` alone (the pixels must be decoded anyway);
- rule_overhead_ms/<format>: the difference, i.e. what validation adds on top of decoding;
- rules_accept_liver: share of real liver slices (3Dircadb1.1/1.7, liver >= 3000 px) that pass
  the rule layers as PNG and JPEG at W350-400/L40-60, and as DICOM;
- rules_reject_negatives: share of ../shared/data/negatives the rule layers alone reject
  (the rest — grey photos, head CT without a header hint — is the content gate's job).

Usage: python bench/ml_validation.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ml_core.decoding import decode
from ml_core.validation import validate

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WINDOWS = ((350, 40), (350, 60), (400, 40), (400, 50), (400, 60))

log = logging.getLogger("bench.ml_validation")


def emit(name: str, value: float, unit: str, config: dict[str, Any]) -> None:
    """Write one figure as a JSON line on stdout."""
    import sys

    sys.stdout.write(
        json.dumps({"name": name, "value": round(value, 4), "unit": unit, "config": config}) + "\n"
    )


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """Window HU to uint8 like a clinic's export."""
    lo = level - width / 2.0
    return np.clip((hu.astype(np.float32) - lo) / width * 255.0, 0, 255).round().astype(np.uint8)


def ct_dicom(hu: np.ndarray, transfer_syntax: str | None = None) -> bytes:
    """A single-frame CT DICOM of HU (stored +1024, intercept -1024)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = "CT", "ABDOMEN"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.RescaleSlope, ds.RescaleIntercept = [0.7, 0.7], 1, -1024
    stored = np.clip(hu.astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = stored.tobytes()
    if transfer_syntax:
        ds.compress(transfer_syntax, encoding_plugin="pylibjpeg")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode(fmt: str, u8: np.ndarray) -> bytes:
    """PNG or JPEG (quality 90) bytes of a uint8 slice."""
    ok, buf = cv2.imencode(
        ".png" if fmt == "png" else ".jpg",
        u8,
        [] if fmt == "png" else [cv2.IMWRITE_JPEG_QUALITY, 90],
    )
    assert ok
    return buf.tobytes()


def bench_speed(hu: np.ndarray, repeats: int) -> None:
    """Rule-layer cost per 512x512 slice in each upload format."""
    u8 = window(hu, 400, 50)
    uploads = {
        "png": encode("png", u8),
        "jpeg": encode("jpeg", u8),
        "dicom": ct_dicom(hu),
        "dicom_j2k": ct_dicom(hu, "1.2.840.10008.1.2.4.90"),
    }
    for fmt, data in uploads.items():
        cfg = {"format": fmt, "size": "512x512", "repeats": repeats, "gate": None}
        total = median_ms(functools.partial(validate, data, gate=None), repeats)
        dec = median_ms(functools.partial(decode, data, allow_color=True), repeats)
        emit(f"validate_rules_ms/{fmt}", total, "ms", cfg)
        emit(f"decode_ms/{fmt}", dec, "ms", cfg)
        emit(f"rule_overhead_ms/{fmt}", max(total - dec, 0.0), "ms", cfg)


def bench_rates() -> None:
    """Rule-layer accept rate on real liver slices and reject rate on the negatives."""
    accepted = total = 0
    dicom_ok = dicom_total = 0
    for name in ("3Dircadb1.1", "3Dircadb1.7"):
        with np.load(DATA / "ircadb" / f"{name}.npz") as z:
            hu_all, liver = z["ct_hu"], z["liver"]
        areas = liver.reshape(liver.shape[0], -1).sum(axis=1)
        for k in np.nonzero(areas >= 3000)[0][::3]:
            for width, level in WINDOWS:
                u8 = window(hu_all[k], width, level)
                for fmt in ("png", "jpeg"):
                    total += 1
                    accepted += validate(encode(fmt, u8), gate=None).passed
            dicom_total += 1
            dicom_ok += validate(ct_dicom(hu_all[k]), gate=None).passed
    emit(
        "rules_accept_liver/png_jpeg",
        accepted / total,
        "fraction",
        {"slices": total, "windows": [f"W{w}/L{lv}" for w, lv in WINDOWS], "min_liver_px": 3000},
    )
    emit("rules_accept_liver/dicom", dicom_ok / dicom_total, "fraction", {"slices": dicom_total})
    files = [p for p in sorted((DATA / "negatives").rglob("*")) if p.is_file()]
    rejected = sum(not validate(p.read_bytes(), gate=None).passed for p in files)
    emit(
        "rules_reject_negatives",
        rejected / len(files),
        "fraction",
        {"files": len(files), "note": "the rest is left to the content gate"},
    )


def main() -> int:
    """Run the validator benchmarks and print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with np.load(DATA / "ircadb" / "3Dircadb1.1.npz") as z:
        liver = z["liver"]
        k = int(np.argmax(liver.reshape(liver.shape[0], -1).sum(axis=1)))
        hu = np.asarray(z["ct_hu"][k])
    bench_speed(hu, args.repeats)
    bench_rates()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
