"""Loaders for the real data in ``../shared/data`` with patient-level splits (``ml_core/splits.json``).

Every loader yields ``(slice_u8, liver_mask, meta)``: ``slice_u8`` uint8 (H, W) in the standard
radiological view, ``liver_mask`` bool (H, W) or ``None`` where the source has no liver mask,
and ``meta`` a ``SliceMeta`` dict ``{source, patient, z, has_liver, spacing_mm}``.

Splits are by patient (volume), never by slice. 3Dircadb1.1 is held out entirely (split
``holdout``): it is the tumor classifier's only real tumor test patient. All KiTS19 slices sit in
one split because the exporter's KiTS19 patient ids are not guaranteed to be distinct people.
Sources with Hounsfield units are windowed with ``ml_core.preprocessing.window``; the 8-bit
sources are harmonised towards a W400/L50 look (fat ~32, liver ~140 grey).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

log = logging.getLogger(__name__)

SPLITS_PATH = Path(__file__).with_name("splits.json")
SPLIT_SEED = 20261128
SPLITS = ("train", "val", "test", "holdout")

#: Harmonisation anchors for the 8-bit sources: the grey levels that fat and liver take at W400/L50.
FAT_U8 = 32.0
LIVER_U8 = 140.0
#: Per-source defaults (fat grey, liver grey) measured on the exported slices; a slice with a liver
#: mask uses its own liver median instead.
_SOURCE_ANCHORS: dict[str, tuple[float, float] | None] = {
    "CHAOS-CT": (140.0, 170.0),  # wide (lung-like) window: fat and liver 30 grey levels apart
    "AMOS22": (135.0, 162.0),  # same SAM-Med2D wide window
    "CURVAS": (45.0, 105.0),  # narrow soft-tissue window (window_note: fat ~45, liver ~80-115)
    "KiTS19": None,  # already soft-tissue-like: kept as exported
    "MSD-Task09-Spleen": None,
}

SLICES_8BIT_SOURCES = tuple(_SOURCE_ANCHORS)
ALL_SOURCES = (
    "ircadb",
    "hcc_tace_seg",
    "msd_liver",
    *SLICES_8BIT_SOURCES,
    "totalseg",
    "pydicom_abdomen",
)


class SliceMeta(TypedDict):
    """Where a slice comes from: source, patient id, index in its volume, liver presence, spacing."""

    source: str
    patient: str
    z: int
    has_liver: bool | None
    spacing_mm: tuple[float, float] | None


Sample = tuple[np.ndarray, np.ndarray | None, SliceMeta]


#: Liver z-extent (first, last slice index) of volumes without a liver mask, checked by eye on a
#: W400/L50 montage (HCC_006: lower tip near z=36, dome near z=100; 2.5 mm slices).
LIVER_Z_EXTENT_BY_EYE: dict[str, tuple[int, int]] = {"hcc_tace_seg:HCC_006": (36, 100)}


@dataclass(frozen=True)
class HUVolume:
    """A CT volume in Hounsfield units (Z, H, W) int16 with an optional liver mask (Z, H, W) bool."""

    source: str
    patient: str
    hu: np.ndarray
    liver: np.ndarray | None
    spacing_mm: tuple[float, float, float]  # (z, y, x)

    def liver_distance_mm(self) -> np.ndarray | None:
        """Return float (Z,): 0 inside the liver's z-extent, else the distance in mm to it."""
        if self.liver is not None:
            z_has = self.liver.reshape(self.liver.shape[0], -1).any(axis=1)
            if not z_has.any():
                return None
            idx = np.nonzero(z_has)[0]
            first, last = int(idx[0]), int(idx[-1])
        elif patient_key(self.source, self.patient) in LIVER_Z_EXTENT_BY_EYE:
            first, last = LIVER_Z_EXTENT_BY_EYE[patient_key(self.source, self.patient)]
        else:
            return None
        z = np.arange(self.hu.shape[0])
        below = np.clip(first - z, 0, None)
        above = np.clip(z - last, 0, None)
        return (below + above).astype(np.float32) * float(self.spacing_mm[0])


def default_root() -> Path:
    """Return the shared data folder: ``<repo>/../shared/data``."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _root(root: str | Path | None) -> Path:
    return Path(root) if root is not None else default_root()


def window_u8(hu: np.ndarray, width: float = 400.0, level: float = 50.0) -> np.ndarray:
    """Window HU (H, W) to uint8 (H, W) through ``ml_core.preprocessing.window``."""
    try:
        from ml_core.preprocessing import window
    except ImportError:  # preprocessing not written yet: same formula as its contract
        lo = level - width / 2.0
        out = (hu.astype(np.float32) - lo) * (255.0 / width)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return window(hu, width=width, level=level)


def harmonise_u8(img: np.ndarray, source: str, liver: np.ndarray | None = None) -> np.ndarray:
    """Map an 8-bit slice (H, W) of ``source`` linearly so that fat ~32 and liver ~140 grey."""
    anchors = _SOURCE_ANCHORS.get(source)
    if anchors is None:
        return img
    fat, liv = anchors
    if liver is not None and liver.sum() > 500:
        measured = float(np.median(img[liver]))
        fat, liv = fat + (measured - liv), measured  # same window width, slice's own level
    scale = (LIVER_U8 - FAT_U8) / max(liv - fat, 1.0)
    out = (img.astype(np.float32) - fat) * scale + FAT_U8
    # Pixels that were black in the export (air / outside the field of view) stay black.
    out[img <= 2] = 0.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- patients and splits


def patient_key(source: str, patient: str) -> str:
    """Return the split manifest key of a patient: ``"<source>:<patient>"``."""
    return f"{source}:{patient}"


def _slices8_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "slices_8bit" / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


#: np.rot90 turns that bring an MSD slice to the radiological view (anterior up, the patient's
#: right on the image left). The exporter wrote every slice turned a quarter: "flipped" ones with
#: the spine on the left and the liver at the top, "mirrored" ones with the spine on the right and
#: the liver at the bottom (checked on all 643: after these turns the liver mask lies left of the
#: body centre on every slice inspected; tests/ml_core/test_datasets.py).
MSD_TO_RADIOLOGICAL = {"flipped": 1, "mirrored": 3}


def _msd_rows(root: Path) -> list[dict[str, str]]:
    with open(root / "msd_liver_slices" / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def list_patients(root: str | Path | None = None) -> dict[str, list[str]]:
    """Return every patient id per source found under ``root`` (sorted)."""
    r = _root(root)
    out: dict[str, set[str]] = {s: set() for s in ALL_SOURCES}
    out["ircadb"] = {p.stem for p in (r / "ircadb").glob("*.npz")}
    out["hcc_tace_seg"] = {p.stem for p in (r / "hcc_tace_seg").glob("*.npz")}
    out["msd_liver"] = {row["volume_index_10000plus"] for row in _msd_rows(r)}
    for row in _slices8_rows(r):
        out[row["source"]].add(row["patient_id"])
    # The TotalSegmentator CT files (NIfTI and DICOM series) are one subject; the MR another.
    out["totalseg"] = {"ct", "mr"}
    out["pydicom_abdomen"] = {p.stem.split("__")[0] for p in (r / "pydicom_abdomen").glob("*.dcm")}
    return {s: sorted(v) for s, v in out.items()}


def _split_group(
    names: Sequence[str], rng: random.Random, val: float, test: float
) -> dict[str, str]:
    names = sorted(names)
    rng.shuffle(names)
    n = len(names)
    n_val = max(1, round(n * val)) if n >= 3 else 0
    n_test = max(1, round(n * test)) if n >= 2 else 0
    out = {}
    for i, name in enumerate(names):
        out[name] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def negative_files(root: str | Path | None = None) -> list[str]:
    """Return every file under ``negatives/`` as a path relative to it (sorted)."""
    neg = _root(root) / "negatives"
    return sorted(str(p.relative_to(neg)) for p in neg.rglob("*") if p.is_file())


def build_splits(root: str | Path | None = None, seed: int = SPLIT_SEED) -> dict[str, Any]:
    """Assign every patient and negative file to train/val/test/holdout (deterministic in ``seed``)."""
    r = _root(root)
    rng = random.Random(seed)
    pats = list_patients(r)
    assign: dict[str, str] = {}
    fixed = {
        "ircadb:3Dircadb1.1": "holdout",  # the classifier's real tumor test patient
        "ircadb:3Dircadb1.7": "train",  # the only HU volume with a full liver mask besides TotalSeg
        "hcc_tace_seg:HCC_006": "val",  # far-slice negatives for the gate threshold (liver extent by the localiser)
        "totalseg:ct": "val",
        "totalseg:mr": "train",  # the only MR volume: the gate must see MR
    }
    for source in ALL_SOURCES:
        names = pats[source]
        if source == "KiTS19":
            for n in names:
                assign[patient_key(source, n)] = "train"
            continue
        free = [n for n in names if patient_key(source, n) not in fixed]
        if source == "pydicom_abdomen":
            for n in free:
                assign[patient_key(source, n)] = "test"
            continue
        for n, split in _split_group(free, rng, 0.2, 0.2).items():
            assign[patient_key(source, n)] = split
    assign.update(
        {k: v for k, v in fixed.items() if k.split(":", 1)[1] in pats[k.split(":", 1)[0]]}
    )
    negs = _split_group(negative_files(r), rng, 0.25, 0.35)
    return {
        "seed": seed,
        "rule": "patient-level (MSD by volume_index_10000plus, flipped/mirrored share a volume); "
        "3Dircadb1.1 held out; all KiTS19 in train; negatives split by file",
        "command": "python -m ml_core.datasets --write-splits",
        "patients": dict(sorted(assign.items())),
        "negatives": negs,
    }


def write_splits(path: str | Path = SPLITS_PATH, root: str | Path | None = None) -> dict[str, Any]:
    """Build the split manifest and write it as JSON to ``path``."""
    splits = build_splits(root)
    Path(path).write_text(json.dumps(splits, indent=1, sort_keys=False) + "\n")
    return splits


def load_splits(path: str | Path = SPLITS_PATH) -> dict[str, Any]:
    """Read the split manifest (``ml_core/splits.json`` by default)."""
    return json.loads(Path(path).read_text())


def split_of(source: str, patient: str, splits: dict[str, Any] | None = None) -> str:
    """Return the split of a patient; unknown patients raise KeyError."""
    s = splits if splits is not None else load_splits()
    return str(s["patients"][patient_key(source, patient)])


def _wanted(split: str | Sequence[str] | None) -> set[str] | None:
    if split is None:
        return None
    return {split} if isinstance(split, str) else set(split)


# --------------------------------------------------------------------------- HU volumes


def _nifti_axial(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Load a NIfTI as (Z, H, W) radiological-view axial slices and (z, y, x) spacing."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))  # RAS+
    data = np.asarray(img.dataobj)
    zooms = img.header.get_zooms()
    # RAS: x grows to the patient's left->right, y posterior->anterior; radiological view puts
    # the patient's right on the image left and anterior at the top.
    vol = np.transpose(data, (2, 1, 0))[:, ::-1, ::-1]
    return np.ascontiguousarray(vol), (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def load_hu_volume(source: str, patient: str, root: str | Path | None = None) -> HUVolume:
    """Load one HU volume (ircadb, hcc_tace_seg or totalseg ``ct``) with its liver mask if any."""
    r = _root(root)
    if source == "ircadb":
        d = np.load(r / "ircadb" / f"{patient}.npz")
        sp = tuple(float(x) for x in d["spacing_mm"])
        return HUVolume(source, patient, d["ct_hu"], d["liver"].astype(bool), sp)  # type: ignore[arg-type]
    if source == "hcc_tace_seg":
        d = np.load(r / "hcc_tace_seg" / f"{patient}.npz")
        sp = tuple(float(x) for x in d["spacing_mm"])
        return HUVolume(source, patient, d["ct_hu"], None, sp)  # type: ignore[arg-type]
    if source == "totalseg" and patient == "ct":
        hu, sp = _nifti_axial(r / "totalsegmentator" / "example_ct_sm.nii.gz")
        liver, _ = _nifti_axial(r / "totalsegmentator" / "example_seg_fast" / "liver.nii.gz")
        return HUVolume(source, patient, hu.astype(np.int16), liver > 0, sp)
    raise KeyError(f"no HU volume for {source}:{patient}")


def iter_hu_volumes(
    split: str | Sequence[str] | None = None,
    *,
    root: str | Path | None = None,
    splits: dict[str, Any] | None = None,
) -> Iterator[HUVolume]:
    """Yield the HU volumes (ircadb, HCC_006, TotalSegmentator CT) of the given split(s)."""
    s = splits if splits is not None else load_splits()
    want = _wanted(split)
    pats = list_patients(root)
    todo = [("ircadb", p) for p in pats["ircadb"]] + [
        ("hcc_tace_seg", p) for p in pats["hcc_tace_seg"]
    ]
    todo.append(("totalseg", "ct"))
    for source, patient in todo:
        if want is not None and s["patients"].get(patient_key(source, patient)) not in want:
            continue
        yield load_hu_volume(source, patient, root)


# --------------------------------------------------------------------------- slice iterators


def iter_ircadb(
    split: str | Sequence[str] | None = None,
    *,
    root: str | Path | None = None,
    splits: dict[str, Any] | None = None,
    width: float = 400.0,
    level: float = 50.0,
) -> Iterator[Sample]:
    """Yield every ircadb slice of the split(s), windowed (default W400/L50), with its liver mask."""
    for vol in iter_hu_volumes(split, root=root, splits=splits):
        if vol.source != "ircadb":
            continue
        yield from _iter_volume(vol, width, level)


def _iter_volume(vol: HUVolume, width: float, level: float) -> Iterator[Sample]:
    for z in range(vol.hu.shape[0]):
        mask = vol.liver[z] if vol.liver is not None else None
        meta: SliceMeta = {
            "source": vol.source,
            "patient": vol.patient,
            "z": z,
            "has_liver": bool(mask.any()) if mask is not None else None,
            "spacing_mm": (vol.spacing_mm[1], vol.spacing_mm[2]),
        }
        yield window_u8(vol.hu[z], width, level), mask, meta


def iter_hcc(
    split: str | Sequence[str] | None = None,
    *,
    root: str | Path | None = None,
    splits: dict[str, Any] | None = None,
    width: float = 400.0,
    level: float = 50.0,
) -> Iterator[Sample]:
    """Yield HCC_006 slices (no liver mask: ``has_liver`` None), windowed."""
    for vol in iter_hu_volumes(split, root=root, splits=splits):
        if vol.source == "hcc_tace_seg":
            yield from _iter_volume(vol, width, level)


def iter_slices_8bit(
    split: str | Sequence[str] | None = None,
    *,
    root: str | Path | None = None,
    splits: dict[str, Any] | None = None,
    harmonise: bool = True,
    sources: Iterable[str] | None = None,
) -> Iterator[Sample]:
    """Yield the 8-bit slices (CHAOS, CURVAS, AMOS with masks; KiTS19, Spleen without)."""
    r = _root(root)
    s = splits if splits is not None else load_splits()
    want = _wanted(split)
    only = set(sources) if sources is not None else None
    rows = _slices8_rows(r)
    files = sorted({(row["source"], row["patient_id"], row["npz_file"]) for row in rows})
    for source, patient, fname in files:
        if only is not None and source not in only:
            continue
        if want is not None and s["patients"].get(patient_key(source, patient)) not in want:
            continue
        d = np.load(r / "slices_8bit" / fname)
        imgs = d["img_u8"]
        livers = d["liver"].astype(bool) if "liver" in d.files else None
        for z in range(imgs.shape[0]):
            mask = livers[z] if livers is not None else None
            img = harmonise_u8(imgs[z], source, mask) if harmonise else imgs[z]
            meta: SliceMeta = {
                "source": source,
                "patient": patient,
                "z": z,
                "has_liver": bool(mask.any()) if mask is not None else None,
                "spacing_mm": None,
            }
            yield img, mask, meta


def iter_msd(
    split: str | Sequence[str] | None = None,
    *,
    root: str | Path | None = None,
    splits: dict[str, Any] | None = None,
) -> Iterator[Sample]:
    """Yield MSD Task03 liver slices (256x256, clipped 0-255 HU) with masks, turned to the
    radiological view (``MSD_TO_RADIOLOGICAL``); every one has liver."""
    import cv2

    r = _root(root) / "msd_liver_slices"
    s = splits if splits is not None else load_splits()
    want = _wanted(split)
    for row in _msd_rows(r.parent):
        patient = row["volume_index_10000plus"]
        if want is not None and s["patients"].get(patient_key("msd_liver", patient)) not in want:
            continue
        img = cv2.imread(str(r / "images" / row["file"]), cv2.IMREAD_GRAYSCALE)
        m = cv2.imread(str(r / "masks" / row["file"]), cv2.IMREAD_GRAYSCALE)
        if img is None or m is None:
            log.warning("msd slice %s unreadable, skipped", row["file"])
            continue
        turns = MSD_TO_RADIOLOGICAL[row["augmentation"]]
        img = np.ascontiguousarray(np.rot90(img, turns))
        mask = np.ascontiguousarray(np.rot90(m > 127, turns))
        meta: SliceMeta = {
            "source": "msd_liver",
            "patient": patient,
            "z": int(row["slice_index_in_resampled_volume"]),
            "has_liver": bool(mask.any()),
            "spacing_mm": None,
        }
        yield img, mask, meta


def dicom_hu(path: Path) -> tuple[np.ndarray, str, tuple[float, float] | None]:
    """Read a DICOM file of the data folder: (rescaled values (H, W) in the radiological view, Modality, PixelSpacing)."""
    import pydicom

    ds = pydicom.dcmread(str(path), force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # Old files without a meta header are implicit VR little endian by the standard's default.
        ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    from ml_core.decoding import to_radiological_view

    px = ds.pixel_array.astype(np.float32)
    if px.ndim == 2:  # as the upload path shows it: patient's right on the left, anterior up
        px = to_radiological_view(px, ds)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    inter = float(ds.get("RescaleIntercept", 0) or 0)
    sp = ds.get("PixelSpacing")
    spacing = (float(sp[0]), float(sp[1])) if sp is not None else None
    return px * slope + inter, str(ds.get("Modality", "")), spacing


def mr_to_u8(img: np.ndarray) -> np.ndarray:
    """Scale an MR slice (H, W) of any range to uint8 by its 1st-99.5th percentiles."""
    lo, hi = np.percentile(img, [1.0, 99.5])
    out = (img.astype(np.float32) - lo) * (255.0 / max(float(hi - lo), 1e-3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def iter_small_examples(
    split: str | Sequence[str] | None = None,
    *,
    root: str | Path | None = None,
    splits: dict[str, Any] | None = None,
    width: float = 400.0,
    level: float = 50.0,
) -> Iterator[Sample]:
    """Yield TotalSegmentator CT (NIfTI + mask, DICOM series) and MR slices and pydicom_abdomen."""
    r = _root(root)
    s = splits if splits is not None else load_splits()
    want = _wanted(split)

    def ok(source: str, patient: str) -> bool:
        return want is None or s["patients"].get(patient_key(source, patient)) in want

    if ok("totalseg", "ct"):
        yield from _iter_volume(load_hu_volume("totalseg", "ct", r), width, level)
        for z, f in enumerate(sorted((r / "totalsegmentator" / "example_ct_dicom").iterdir())):
            hu, _, sp = dicom_hu(f)
            meta: SliceMeta = {
                "source": "totalseg_dicom",
                "patient": "ct",
                "z": z,
                "has_liver": True,  # checked by eye: all 20 slices cross the liver
                "spacing_mm": sp,
            }
            yield window_u8(hu, width, level), None, meta
    if ok("totalseg", "mr"):
        mr, sp3 = _nifti_axial(r / "totalsegmentator" / "example_mr_sm.nii.gz")
        for z in range(mr.shape[0]):
            meta = {
                "source": "totalseg_mr",
                "patient": "mr",
                "z": z,
                "has_liver": True,  # checked by eye: all 20 slices cross the liver
                "spacing_mm": (sp3[1], sp3[2]),
            }
            yield mr_to_u8(mr[z]), None, meta
    for f in sorted((r / "pydicom_abdomen").glob("*.dcm")):
        patient = f.stem.split("__")[0]
        if not ok("pydicom_abdomen", patient):
            continue
        px, modality, sp = dicom_hu(f)
        img = window_u8(px, width, level) if modality == "CT" else mr_to_u8(px)
        meta = {
            "source": "pydicom_abdomen",
            "patient": patient,
            "z": 0,
            "has_liver": True,
            "spacing_mm": sp,
        }
        yield img, None, meta


def iter_mask_slices(
    split: str | Sequence[str] | None = None,
    *,
    root: str | Path | None = None,
    splits: dict[str, Any] | None = None,
) -> Iterator[Sample]:
    """Yield every slice that has a liver mask (ircadb, MSD, CHAOS/CURVAS/AMOS, TotalSeg CT)."""
    yield from iter_ircadb(split, root=root, splits=splits)
    yield from iter_msd(split, root=root, splits=splits)
    yield from iter_slices_8bit(
        split, root=root, splits=splits, sources=("CHAOS-CT", "CURVAS", "AMOS22")
    )
    for img, mask, meta in iter_small_examples(split, root=root, splits=splits):
        if mask is not None:
            yield img, mask, meta


def iter_all(
    split: str | Sequence[str] | None = None,
    *,
    root: str | Path | None = None,
    splits: dict[str, Any] | None = None,
) -> Iterator[Sample]:
    """Yield every slice of every source in the split(s), at W400/L50 for HU sources."""
    yield from iter_ircadb(split, root=root, splits=splits)
    yield from iter_hcc(split, root=root, splits=splits)
    yield from iter_msd(split, root=root, splits=splits)
    yield from iter_slices_8bit(split, root=root, splits=splits)
    yield from iter_small_examples(split, root=root, splits=splits)


# --------------------------------------------------------------------------- negatives


def load_negative(rel: str, root: str | Path | None = None) -> np.ndarray | None:
    """Load one file of ``negatives/`` as grey uint8 (H, W) (colour averaged); None if undecodable."""
    import cv2

    path = _root(root) / "negatives" / rel
    if path.suffix.lower() == ".dcm":
        try:
            px, modality, _ = dicom_hu(path)
        except Exception as exc:  # pydicom raises many types for exotic files
            log.warning("negative %s undecodable: %s", rel, exc)
            return None
        if px.ndim == 4 or (px.ndim == 3 and px.shape[-1] not in (3, 4)):
            px = px[0]
        if px.ndim == 3:
            px = px[..., :3].mean(axis=-1)
        return window_u8(px) if modality == "CT" else mr_to_u8(px)
    data = np.frombuffer(path.read_bytes(), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    if img is None:  # e.g. GIF: fall back to Pillow
        from PIL import Image

        try:
            img = np.asarray(Image.open(path).convert("L"))
        except Exception as exc:
            log.warning("negative %s undecodable: %s", rel, exc)
            return None
    return img


def iter_negatives(
    split: str | Sequence[str] | None = None,
    *,
    root: str | Path | None = None,
    splits: dict[str, Any] | None = None,
) -> Iterator[tuple[np.ndarray, str]]:
    """Yield ``(grey uint8 (H, W), relative path)`` for the negative files of the split(s)."""
    s = splits if splits is not None else load_splits()
    want = _wanted(split)
    for rel, sp in sorted(s["negatives"].items()):
        if want is not None and sp not in want:
            continue
        img = load_negative(rel, root)
        if img is not None:
            yield img, rel


def main(argv: Sequence[str] | None = None) -> int:
    """Write or summarise the split manifest (``python -m ml_core.datasets --write-splits``)."""
    p = argparse.ArgumentParser(prog="python -m ml_core.datasets")
    p.add_argument("--write-splits", action="store_true", help="rebuild ml_core/splits.json")
    p.add_argument("--root", default=None, help="data folder (default ../shared/data)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = write_splits(root=args.root) if args.write_splits else load_splits()
    counts: dict[str, int] = {}
    for sp in splits["patients"].values():
        counts[sp] = counts.get(sp, 0) + 1
    log.info("patients per split: %s", json.dumps(counts, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
