"""Validation sets on which the evaluation fits calibration and threshold (val patients only).

Two sets, both built only from patients of the "val" split of ml_core/splits.json (never the
holdout 3Dircadb1.1, never the test split), deterministic for a seed:

``synthetic`` (the old set, ``evaluation.validation_slices``): each val background clean and
with 1-3 synthetic lesions of the training distribution (5-50 mm, 15-70 HU), twice.

``realistic`` (this module, ``realistic_set``): real tumor-free liver slices of every val
source that has a liver mask or whose liver we can locate and that is known to be free of
liver tumors — CHAOS-CT sarah103 (healthy liver donor), CURVAS sarah10009/10012 (routine
CT, no liver tumors labelled; val's sarah10013 has no slice with >= MIN_LIVER_PX of liver),
and the TotalSegmentator example CT series (HU DICOM, 0.98 mm, patient ``totalseg:ct``;
every second of its 20 slices; no liver lesion seen on a W400/L50 montage; liver mask from
the artifact's own localiser, eroded) — each once as a
negative, plus ``COPIES`` lesioned copies of each with ONE synthetic lesion drawn from a
balanced 3 x 3 design:

* diameter: small 5-15 mm, medium 15-30 mm, large 30-50 mm;
* contrast (|HU| difference to the liver): faint 3-15, moderate 15-40, strong 40-70;
* each background gets every one of the 9 strata once; inside a stratum the diameter and
  contrast are uniform; 20 % of lesions are brighter than the liver (hyperdense), the rest
  darker; no enhancing rim (training's 15-40 HU rim would outshine a faint lesion) and no
  mass effect (its warp can change the slice more than a faint lesion does), so the drawn
  contrast is the lesion's only cue; shape, texture, edge blur and water floor as in training
  (ml_core/synthesis.py). The mean change inside the lesion mask is 0.35-1.0x the nominal
  contrast (median 0.85x: blurred edge, texture).

Why: the training distribution (15-70 HU, 1-3 lesions) never shows the faint small lesions
that real small tumors are (on the real tumors measured so far, small tumor cross-sections
differ from the liver by ~8 HU, larger ones by ~40 HU, and some small ones are brighter),
so the old set's positives are easier than real ones and its calibration and threshold do not
transfer; a third of the positives here are faint and a third small. Excluded val patients:
MSD/LiTS liver volumes and HCC_006 contain real liver tumors without a tumor mask (MSD's masks
merge liver and tumor), and the MSD spleen val patients were treated for liver metastases and
have no liver mask, so none can serve as a tumor-free negative or a known background.

Negatives are real slices, positives synthetic; each negative carries weight ``COPIES`` so the
weighted set is balanced (prevalence 0.5, as the old set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ml_core.synthesis import LesionParams, insert_lesions
from ml_core.training import DATA_DIR, MIN_LIVER_PX, Background, load_backgrounds, split

log = logging.getLogger(__name__)

SIZE_CLASSES_MM: tuple[tuple[float, float], ...] = ((5.0, 15.0), (15.0, 30.0), (30.0, 50.0))
CONTRAST_CLASSES_HU: tuple[tuple[float, float], ...] = ((3.0, 15.0), (15.0, 40.0), (40.0, 70.0))
P_HYPERDENSE = 0.2
COPIES = len(SIZE_CLASSES_MM) * len(CONTRAST_CLASSES_HU)
DEFAULT_SEED = 2026
TOTALSEG_KEY = "totalseg:ct"
TOTALSEG_STEP = 2  # every second slice of the 2 mm series: neighbours are near copies
LIVER_ERODE_PX = 5  # the localiser's mask may touch the ribs: keep lesions off its edge
NAMES = ("realistic", "synthetic")

LiverMasks = Callable[[list[np.ndarray]], Sequence[np.ndarray | None]]


@dataclass
class ValidationSet:
    """Full-size uint8 W400/L50 slices with labels, fitting weights and what each slice is.

    slices: uint8 (H, W) each; labels float32 (N,) 0/1; weights int (N,) >= 1 (how many times
    a slice counts in the fits); meta: one dict per slice (source, patient, kind and, for
    lesioned slices, diameter_mm, contrast_hu, hyperdense, size_class, contrast_class);
    masks: one bool (H, W) lesion mask per slice, None for clean slices (empty when the set
    keeps none), for the validation pointing game.
    """

    name: str
    slices: list[np.ndarray]
    labels: np.ndarray
    weights: np.ndarray
    meta: list[dict[str, Any]] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)

    def expand(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, labels) with each slice repeated ``weight`` times, for the unweighted fits."""
        return np.repeat(values, self.weights), np.repeat(self.labels, self.weights)

    def summary(self) -> dict[str, Any]:
        """Counts per class and per patient: what the set is made of."""
        neg = [m for m in self.meta if m["kind"] == "clean"]
        return {
            "name": self.name,
            "slices": len(self.slices),
            "negatives": len(neg),
            "positives": int(self.labels.sum()),
            "weighted_prevalence": float(
                (self.labels * self.weights).sum() / max(1, self.weights.sum())
            ),
            "negative_patients": sorted({f"{m['source']}:{m['patient']}" for m in neg}),
        }


def render_w400(img: np.ndarray, is_hu: bool) -> np.ndarray:
    """A background (HU, or harmonised grey) as the uint8 W400/L50 slice a clinic would upload."""
    from ml_core.training import _window

    return _window(img, is_hu, 400, 50).astype(np.uint8)


def totalseg_backgrounds(liver_masks: LiverMasks, data_dir: Path = DATA_DIR) -> list[Background]:
    """Every TOTALSEG_STEP-th slice of the TotalSegmentator example CT series (HU) with an eroded localiser liver mask."""
    import cv2

    from ml_core.datasets import dicom_hu, load_splits

    part = load_splits()["patients"][TOTALSEG_KEY]
    files = sorted((data_dir / "totalsegmentator" / "example_ct_dicom").iterdir())[::TOTALSEG_STEP]
    hus, spacings = [], []
    for f in files:
        hu, modality, sp = dicom_hu(f)
        assert modality == "CT", f
        hus.append(hu.astype(np.float32))
        spacings.append(float(sp[0]) if sp else None)
    masks = liver_masks([render_w400(h, True) for h in hus])
    kernel = np.ones((2 * LIVER_ERODE_PX + 1,) * 2, np.uint8)
    out = []
    for hu, sp, m in zip(hus, spacings, masks, strict=True):
        if m is None:
            continue
        liver = cv2.erode(m.astype(np.uint8), kernel).astype(bool)
        if liver.sum() >= MIN_LIVER_PX:
            out.append(Background(hu, liver, True, sp, "ct", "totalseg_dicom", part))
    return out


def realistic_backgrounds(
    liver_masks: LiverMasks | None, backgrounds: list[Background] | None = None
) -> list[Background]:
    """Tumor-free val backgrounds: the 8-bit val slices with liver masks and, given a liver masker, the TotalSegmentator series."""
    bgs = split(backgrounds if backgrounds is not None else load_backgrounds(), "val")
    bgs = [b for b in bgs if b.source in ("CHAOS-CT", "CURVAS", "AMOS22")]
    if liver_masks is not None:
        bgs += [b for b in totalseg_backgrounds(liver_masks) if b.split == "val"]
    return bgs


def lesion_draw(seed: int, bg_index: int, stratum: int) -> dict[str, Any]:
    """The nominal lesion of one lesioned copy: its stratum, diameter (mm), contrast (HU) and polarity."""
    rng = np.random.default_rng([seed, bg_index, stratum, 0])
    si, ci = divmod(stratum, len(CONTRAST_CLASSES_HU))
    return {
        "size_class": si,
        "contrast_class": ci,
        "diameter_mm": float(rng.uniform(*SIZE_CLASSES_MM[si])),
        "contrast_hu": float(rng.uniform(*CONTRAST_CLASSES_HU[ci])),
        "hyperdense": bool(rng.random() < P_HYPERDENSE),
    }


def paint(
    bg: Background, draw: dict[str, Any], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic lesion of exactly the drawn diameter, contrast and polarity: (image, lesion mask)."""
    d, c = draw["diameter_mm"], draw["contrast_hu"]
    # No enhancing rim (15-40 HU would outshine a faint lesion) and no mass effect (its warp can
    # move more than a faint lesion changes): the stratum's contrast is the lesion's only cue.
    params = LesionParams(
        p_hyper=1.0 if draw["hyperdense"] else 0.0,
        p_rim=0.0,
        p_mass_effect=0.0,
        hypo_hu=(c, c),
        hyper_hu=(c, c),
    )
    return insert_lesions(
        bg.image,
        bg.liver,
        rng,
        is_hu=bg.is_hu,
        spacing_mm=bg.spacing_mm,
        n_lesions=1,
        diameter_mm=(d, d),
        params=params,
    )


def realistic_set(
    liver_masks: LiverMasks | None = None,
    *,
    seed: int = DEFAULT_SEED,
    backgrounds: list[Background] | None = None,
) -> ValidationSet:
    """The realistic validation set (module docstring): real val negatives + one-lesion copies over the 3 x 3 design."""
    bgs = realistic_backgrounds(liver_masks, backgrounds)
    slices, labels, weights, meta = [], [], [], []
    masks: list[np.ndarray | None] = []
    for i, bg in enumerate(bgs):
        who = {"source": bg.source, "patient": bg.patient, "split": bg.split}
        slices.append(render_w400(bg.image, bg.is_hu))
        labels.append(0.0)
        weights.append(COPIES)
        meta.append({**who, "kind": "clean"})
        masks.append(None)
        for s in range(COPIES):
            draw = lesion_draw(seed, i, s)
            for attempt in range(5):  # a thin liver can swallow a lesion: draw its place again
                img, mask = paint(bg, draw, np.random.default_rng([seed, i, s, 1, attempt]))
                if mask.sum() >= 3:
                    break
            else:
                log.warning("no lesion fits %s:%s, stratum %d skipped", bg.source, bg.patient, s)
                continue
            slices.append(render_w400(img, bg.is_hu))
            labels.append(1.0)
            weights.append(1)
            meta.append({**who, "kind": "lesion", **draw, "lesion_px": int(mask.sum())})
            masks.append(np.asarray(mask, bool))
    return ValidationSet(
        "realistic",
        slices,
        np.asarray(labels, np.float32),
        np.asarray(weights, np.int64),
        meta,
        masks,
    )
