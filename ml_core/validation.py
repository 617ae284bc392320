"""Strict, layered validation of one upload: cheapest checks first, the first failure decides.

``validate(data, gate=..., limits=...)`` never raises on bad input: every outcome is a
``ValidationReport`` listing the checks that ran (name, passed, detail) and, when one failed,
its stable ``reason_code``. Details never contain PHI (only sizes, codes and our own keywords).
The reason codes and limits are documented in docs/validation.md.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ml_core.errors import MLCoreError
from ml_core.types import Check, DecodedImage, ValidationReport

log = logging.getLogger(__name__)

#: Every reason code the validator can return, in layer order, with the check that sets it.
#: Stable: clients branch on these; docs/validation.md renders this table.
REASON_CODES: dict[str, tuple[str, str]] = {
    "empty_file": ("file_size", "the upload has zero bytes"),
    "too_large": ("file_size_limit", "the upload exceeds the byte limit"),
    "unsupported_format": ("format", "magic bytes are not PNG, JPEG or DICOM"),
    "undecodable": ("header / decodable", "truncated, corrupt or unparseable container or pixels"),
    "pixel_limit": ("pixel_limit", "the header announces too many pixels (decompression bomb)"),
    "unsupported_modality": (
        "dicom_modality",
        "DICOM Modality is not CT or MR (CR, DX, US, NM, OT, SEG…)",
    ),
    "wrong_body_part": (
        "dicom_body_part",
        "header names head/neck, an extremity or the chest, and no abdominal word",
    ),
    "unsupported_image_type": ("dicom_image_type", "ImageType is a localizer/scout, not a slice"),
    "not_axial": (
        "dicom_orientation",
        "ImageOrientationPatient is not axial (tilt over ~37 degrees)",
    ),
    "burned_in_annotation": (
        "dicom_burned_in_annotation",
        "BurnedInAnnotation YES: pixels may show PHI",
    ),
    "no_pixel_data": ("dicom_pixel_data", "DICOM has no PixelData element"),
    "multi_frame": ("dicom_frames", "DICOM holds more than one frame; send one slice per file"),
    "unsupported_transfer_syntax": (
        "dicom_transfer_syntax",
        "no installed decoder for the transfer syntax",
    ),
    "bad_aspect": ("aspect_ratio", "width/height outside 0.5–2.0"),
    "too_small": ("min_dimensions", "a side shorter than 128 px"),
    "too_large_dims": ("max_dimensions", "a side longer than 4096 px"),
    "not_grayscale": (
        "dicom_photometric / grayscale",
        "colour image, colour overlay or colour DICOM",
    ),
    "implausible_hu": ("hu_range", "CT values are not plausible Hounsfield units (bad rescale)"),
    "blank_image": ("not_blank", "constant or nearly constant image"),
    "low_dynamic_range": (
        "dynamic_range",
        "grey levels span too little (washed-out or nearly blank)",
    ),
    "not_liver_ct": ("content", "the learned gate does not see an axial liver CT/MR slice"),
}


class ContentGate(Protocol):
    """A learned gate: probability that each uint8 (H, W) slice is an axial liver CT/MR slice."""

    threshold: float

    def score(self, slices_u8: list[np.ndarray]) -> list[float]:
        """Return P(liver slice) in [0, 1] for each slice, in order."""
        ...


@dataclass(frozen=True)
class ValidationLimits:
    """Every threshold the rule layers use (defaults documented in docs/validation.md)."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    min_side: int = 128
    max_side: int = 4096
    min_aspect: float = 0.5  # width / height
    max_aspect: float = 2.0
    allowed_formats: tuple[str, ...] = ("png", "jpeg", "dicom")
    allowed_modalities: tuple[str, ...] = ("CT", "MR")
    blank_spread: int = 4  # slice_u8 p0.5..p99.5 spread at or below this: blank
    min_dynamic_range: int = 40  # slice_u8 p1..p99 spread below this: low dynamic range
    ct_median_hu: tuple[float, float] = (-1100.0, 400.0)
    ct_min_soft_tissue: float = 0.03  # fraction of pixels in [-150, 250] HU
    min_axial_normal_z: float = 0.8  # |z| of the slice normal; 0.8 allows ~37 degree tilt
    forbidden_image_types: tuple[str, ...] = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW")


# Words that rule a slice out when they appear as whole tokens in BodyPartExamined,
# StudyDescription or SeriesDescription (English, German, French, Spanish, common codes).
_HEAD_NECK = {
    "HEAD",
    "BRAIN",
    "SKULL",
    "CRANIUM",
    "CRANIAL",
    "NECK",
    "CSPINE",
    "ORBIT",
    "ORBITS",
    "SINUS",
    "SINUSES",
    "FACE",
    "FACIAL",
    "DENTAL",
    "TEETH",
    "MANDIBLE",
    "IAC",
    "TEMPORAL",
    "PETROUS",
    "NEURO",
    "CEREBRAL",
    "KOPF",
    "SCHAEDEL",
    "SCHADEL",
    "HALS",
    "CRANE",
    "TETE",
    "CABEZA",
    "CEREBRO",
    "CQ500",
    "CAROTID",
    "CAROTIDS",
    "THYROID",
    "LARYNX",
}
_EXTREMITY = {
    "EXTREMITY",
    "EXTREMITIES",
    "ARM",
    "HAND",
    "HANDS",
    "WRIST",
    "ELBOW",
    "SHOULDER",
    "HUMERUS",
    "FOREARM",
    "FINGER",
    "FINGERS",
    "LEG",
    "KNEE",
    "KNEES",
    "ANKLE",
    "FOOT",
    "FEET",
    "TOE",
    "TOES",
    "FEMUR",
    "TIBIA",
    "FIBULA",
    "HIP",
    "HIPS",
    "THIGH",
    "CALF",
    "KNIE",
    "SCHULTER",
}
_CHEST = {
    "CHEST",
    "THORAX",
    "LUNG",
    "LUNGS",
    "CARDIAC",
    "HEART",
    "CORONARY",
    "CTA_CHEST",
    "PULMONARY",
    "THORAX_",
    "TORAX",
    "BREAST",
    "MAMMO",
}
_ABDOMEN = {
    "ABDOMEN",
    "ABD",
    "ABDO",
    "ABDOMINAL",
    "LIVER",
    "HEPATIC",
    "HEPAR",
    "LEBER",
    "FOIE",
    "HIGADO",
    "PANCREAS",
    "UPPERABD",
    "TRUNK",
    "BODY",
    "WHOLEBODY",
    "CAP",
    "TAP",
    "ABDPEL",
    "CHESTABDOMEN",
    "CHESTABDPELVIS",
    "ABDOMENPELVIS",
    "TORSO",
    "KIDNEY",
    "RENAL",
    "SPLEEN",
    "PARTIALBODY",
    "MULTIPHASE",
    "TRIPHASIC",
    "ABDOMEN_",
    "BAUCH",
    "OBERBAUCH",
}
_TOKEN = re.compile(r"[A-Z0-9]+")

_NOT_RUN = "content gate not run (gate=None: rule layers only)"


@dataclass
class _Run:
    """Accumulates checks; ``fail`` records the first failure and its reason code."""

    checks: list[Check] = field(default_factory=list)
    reason_code: str | None = None

    def ok(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))

    def fail(self, name: str, code: str, detail: str) -> None:
        self.checks.append(Check(name, False, detail))
        self.reason_code = code


class _Stop(Exception):
    """Internal: a check failed, stop the layers."""


def _require(run: _Run, name: str, passed: bool, code: str, detail: str) -> None:
    if passed:
        run.ok(name, detail)
    else:
        run.fail(name, code, detail)
        raise _Stop


def _attempt(run: _Run, name: str, fn: Callable[[], Any], ok_detail: Callable[[Any], str]) -> Any:
    """Run ``fn``; an MLCoreError becomes a failed check with the error's code."""
    try:
        value = fn()
    except MLCoreError as exc:
        run.fail(name, exc.code, str(exc))
        raise _Stop from None
    run.ok(name, ok_detail(value))
    return value


def _percentile_u8(hist_cum: np.ndarray, total: int, q: float) -> int:
    return int(np.searchsorted(hist_cum, total * q / 100.0, side="left"))


def _tokens(*values: Any) -> set[str]:
    out: set[str] = set()
    for v in values:
        if v is None:
            continue
        text = " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)
        upper = text.upper()
        out.update(_TOKEN.findall(upper))
        out.add(re.sub(r"[^A-Z0-9]", "", upper))  # "Chest/Abdomen" → CHESTABDOMEN
    out.discard("")
    return out


def body_part_verdict(ds: Any) -> tuple[bool, str]:
    """Decide from BodyPartExamined/Study/SeriesDescription whether the body part rules it out."""
    from ml_core.deid import header_value

    fields = {
        "BodyPartExamined": header_value(ds, "BodyPartExamined"),
        "StudyDescription": header_value(ds, "StudyDescription"),
        "SeriesDescription": header_value(ds, "SeriesDescription"),
    }
    tokens = _tokens(*fields.values())
    abdomen = sorted(tokens & _ABDOMEN)
    if abdomen:  # multi-region series (neck-to-pelvis, runoff) include the liver: the gate decides
        return True, f"header names abdomen ({abdomen[0].lower()})"
    for words, label in (
        (_HEAD_NECK, "head/neck"),
        (_EXTREMITY, "extremity"),
        (_CHEST, "chest only"),
    ):
        hit = sorted(tokens & words)
        if hit:
            return False, f"header names {label} ({hit[0].lower()})"
    return True, "no body part ruled out by the header"


def _dicom_header_checks(run: _Run, ds: Any, limits: ValidationLimits) -> None:
    from ml_core.decoding import axial_normal_z, check_transfer_syntax
    from ml_core.deid import MODALITY_TERMS, PHOTOMETRIC_TERMS, code_string, header_value

    raw_modality = header_value(ds, "Modality")
    modality = code_string(raw_modality)
    if modality in MODALITY_TERMS:
        shown = f"Modality {modality}"
    else:  # never repeat free text found in the field (it may be a name)
        shown = "Modality is not a DICOM modality code" if raw_modality else "Modality missing"
    _require(
        run,
        "dicom_modality",
        modality in limits.allowed_modalities,
        "unsupported_modality",
        f"{shown}; allowed {', '.join(limits.allowed_modalities)}",
    )
    passed, detail = body_part_verdict(ds)
    _require(run, "dicom_body_part", passed, "wrong_body_part", detail)
    image_type = _tokens(header_value(ds, "ImageType"))
    bad = sorted(image_type & set(limits.forbidden_image_types))
    _require(
        run,
        "dicom_image_type",
        not bad,
        "unsupported_image_type",
        f"ImageType is {bad[0]} (not a cross-sectional slice)" if bad else "ImageType accepted",
    )
    nz = axial_normal_z(ds)
    _require(
        run,
        "dicom_orientation",
        nz is None or nz >= limits.min_axial_normal_z,
        "not_axial",
        "no ImageOrientationPatient"
        if nz is None
        else f"slice normal |z| = {nz:.2f} (axial needs >= {limits.min_axial_normal_z})",
    )
    raw_burned = header_value(ds, "BurnedInAnnotation")
    burned = code_string(raw_burned)
    if burned == "YES":
        burned_detail = "BurnedInAnnotation YES: pixels may show patient data"
    elif burned == "NO" or not raw_burned:
        burned_detail = f"BurnedInAnnotation {burned or 'absent'}"
    else:
        burned_detail = "BurnedInAnnotation is neither YES nor NO"
    _require(
        run, "dicom_burned_in_annotation", burned != "YES", "burned_in_annotation", burned_detail
    )
    has_pixels = "PixelData" in ds
    _require(
        run,
        "dicom_pixel_data",
        has_pixels,
        "no_pixel_data",
        "PixelData present" if has_pixels else "no PixelData element",
    )
    try:
        frames = int(header_value(ds, "NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 0
    _require(
        run, "dicom_frames", frames == 1, "multi_frame", f"{frames} frame(s); one slice per file"
    )
    photometric = code_string(header_value(ds, "PhotometricInterpretation")) or "MONOCHROME2"
    grey = photometric in ("MONOCHROME1", "MONOCHROME2")
    _require(
        run,
        "dicom_photometric",
        grey,
        "not_grayscale",
        f"PhotometricInterpretation {photometric}"
        if photometric in PHOTOMETRIC_TERMS
        else "PhotometricInterpretation is not a DICOM defined term",
    )
    _attempt(
        run,
        "dicom_transfer_syntax",
        lambda: check_transfer_syntax(ds),
        lambda uid: f"transfer syntax {uid} decodable",
    )


def _signal_checks(
    run: _Run,
    image: DecodedImage,
    slice_u8: np.ndarray,
    colour_fraction: float,
    limits: ValidationLimits,
) -> None:
    _require(
        run,
        "grayscale",
        not image.was_color,
        "not_grayscale",
        f"{colour_fraction:.2%} of pixels coloured"
        + (" (colour image or colour overlay)" if image.was_color else ""),
    )
    if image.is_hu:
        hu = image.pixels[::2, ::2]
        median = float(np.median(hu))
        soft = float(np.count_nonzero((hu >= -150) & (hu <= 250))) / float(hu.size)
        lo, hi = limits.ct_median_hu
        plausible = lo <= median <= hi and soft >= limits.ct_min_soft_tissue
        _require(
            run,
            "hu_range",
            plausible,
            "implausible_hu",
            f"median {median:.0f} HU, soft tissue {soft:.1%} of pixels",
        )
    cum = np.cumsum(np.bincount(slice_u8.ravel(), minlength=256))
    total = int(cum[-1])
    spread_blank = _percentile_u8(cum, total, 99.5) - _percentile_u8(cum, total, 0.5)
    _require(
        run,
        "not_blank",
        spread_blank > limits.blank_spread,
        "blank_image",
        f"grey spread p0.5..p99.5 = {spread_blank} (blank at <= {limits.blank_spread})",
    )
    spread = _percentile_u8(cum, total, 99.0) - _percentile_u8(cum, total, 1.0)
    _require(
        run,
        "dynamic_range",
        spread >= limits.min_dynamic_range,
        "low_dynamic_range",
        f"grey spread p1..p99 = {spread} (needs >= {limits.min_dynamic_range})",
    )


def _content_check(
    run: _Run, slice_u8: np.ndarray, gate: ContentGate | None
) -> tuple[float | None, float | None, bool]:
    """Score the slice with the gate; returns (score, threshold, passed) and records the check."""
    if gate is None:
        run.ok("content", _NOT_RUN)
        return None, None, True
    threshold = float(gate.threshold)
    margins = getattr(gate, "margins", None)
    if margins is not None:  # an EitherGate: one call gives the score and both gates' parts
        m = np.asarray(margins([slice_u8]), np.float64)
        score = gate.union(m)[0]  # type: ignore[attr-defined]
        either = f"; passes when either gate accepts: {gate.describe(m[0])}"  # type: ignore[attr-defined]
    else:
        score, either = float(gate.score([slice_u8])[0]), ""
    passed = bool(np.isfinite(score)) and score >= threshold
    detail = f"liver-slice score {score:.3f} (threshold {threshold:.3f}{either})"
    if passed:
        run.ok("content", detail)
    else:
        run.fail("content", "not_liver_ct", detail)
    return score, threshold, passed


def _geometry_checks(run: _Run, width: int, height: int, limits: ValidationLimits) -> None:
    aspect = width / height if height else 0.0
    _require(
        run,
        "aspect_ratio",
        limits.min_aspect <= aspect <= limits.max_aspect,
        "bad_aspect",
        f"width/height = {aspect:.2f} (allowed {limits.min_aspect}-{limits.max_aspect})",
    )
    short, long = min(width, height), max(width, height)
    dims = f"{width}x{height} (allowed {limits.min_side}-{limits.max_side} px a side)"
    _require(run, "min_dimensions", short >= limits.min_side, "too_small", dims)
    _require(run, "max_dimensions", long <= limits.max_side, "too_large_dims", dims)


def validate_image(
    image: DecodedImage, *, gate: ContentGate | None, limits: ValidationLimits | None = None
) -> ValidationReport:
    """Run the geometry, signal and content layers on an already decoded slice (e.g. NIfTI).

    For volumes on the command line and batch paths, where there are no upload bytes; the
    container and DICOM header layers do not apply. Never raises on bad pixels.
    """
    from ml_core.preprocessing import to_slice_u8

    limits = limits or ValidationLimits()
    run = _Run()
    slice_u8: np.ndarray | None = None
    score: float | None = None
    threshold: float | None = None
    try:
        _geometry_checks(run, image.width, image.height, limits)
        _require(
            run,
            "decodable",
            bool(np.all(np.isfinite(image.pixels))),
            "undecodable",
            f"{image.format} slice, modality {image.modality or 'unknown'}",
        )
        slice_u8 = to_slice_u8(image)
        _signal_checks(run, image, slice_u8, 0.0, limits)
    except _Stop:
        pass
    if run.reason_code is None and slice_u8 is not None:
        score, threshold, _ = _content_check(run, slice_u8, gate)
    return ValidationReport(
        passed=run.reason_code is None,
        reason_code=run.reason_code,
        checks=run.checks,
        image=image,
        slice_u8=slice_u8,
        gate_score=score,
        gate_threshold=threshold,
    )


def validate(
    data: bytes, *, gate: ContentGate | None, limits: ValidationLimits | None = None
) -> ValidationReport:
    """Run every layer on ``data`` (upload bytes); never raises on bad input.

    ``gate=None`` skips the content layer (reported as not run) — for tests and the CLI's
    ``--no-gate``; the worker always passes the model's gate.
    """
    from ml_core import decoding
    from ml_core.preprocessing import to_slice_u8

    limits = limits or ValidationLimits()
    run = _Run()
    image: DecodedImage | None = None
    slice_u8: np.ndarray | None = None
    score: float | None = None
    threshold: float | None = None
    try:
        size = len(data)
        _require(run, "file_size", size > 0, "empty_file", f"{size} bytes")
        _require(
            run,
            "file_size_limit",
            size <= limits.max_bytes,
            "too_large",
            f"{size} bytes (limit {limits.max_bytes})",
        )
        fmt = decoding.sniff_format(data)
        _require(
            run,
            "format",
            fmt in limits.allowed_formats,
            "unsupported_format",
            f"{fmt} by magic bytes" if fmt else "not PNG, JPEG or DICOM by magic bytes",
        )
        probe = _attempt(
            run,
            "header",
            lambda: decoding.probe(data),
            lambda p: f"{p.width}x{p.height}, {p.frames} frame(s), {p.channels} channel(s)",
        )
        _attempt(
            run,
            "pixel_limit",
            lambda: decoding.check_pixel_limit(probe, limits.max_pixels),
            lambda _: f"{probe.pixel_count} pixels (limit {limits.max_pixels})",
        )
        if probe.format == "dicom":
            _dicom_header_checks(run, probe.dataset, limits)
        _geometry_checks(run, probe.width, probe.height, limits)
        image, colour = _attempt(
            run,
            "decodable",
            lambda: decoding.decode_probed(data, probe, allow_color=True),
            lambda r: (
                f"{r[0].format} decoded" + (f", modality {r[0].modality}" if r[0].modality else "")
            ),
        )
        slice_u8 = to_slice_u8(image)
        _signal_checks(run, image, slice_u8, colour, limits)
    except _Stop:
        pass
    except MLCoreError as exc:
        run.fail("decodable", exc.code, str(exc))
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - hostile input must end as a reason code
        # Last line of defence: a third-party parser failing on hostile input is "undecodable".
        log.warning("validation hit %s on a %d-byte upload", type(exc).__name__, len(data))
        run.fail("decodable", "undecodable", f"input could not be parsed ({type(exc).__name__})")
    if run.reason_code is None and slice_u8 is not None:
        # Outside the guard above: a failing gate is a service fault, not bad input.
        score, threshold, _ = _content_check(run, slice_u8, gate)
    passed = run.reason_code is None
    return ValidationReport(
        passed=passed,
        reason_code=run.reason_code,
        checks=run.checks,
        image=image,
        slice_u8=slice_u8,
        gate_score=score,
        gate_threshold=threshold,
    )
