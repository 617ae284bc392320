"""Plain typed results passed between ml_core and its callers (frozen dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DecodedImage:
    """A decoded slice: ``pixels`` float32 (H, W), HU when ``is_hu`` else 0..255 grey (MR: raw)."""

    pixels: np.ndarray
    format: str  # "png" | "jpeg" | "dicom" | "nifti"
    width: int
    height: int
    modality: str | None  # "CT" | "MR" | None (also the raw DICOM value when not CT/MR)
    is_hu: bool
    spacing_mm: tuple[float, float] | None
    was_color: bool
    dicom: dict[str, Any] | None  # de-identified header summary (no PHI), DICOM only


@dataclass(frozen=True)
class Check:
    """One named validation check with its outcome and a short PHI-free detail."""

    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form ``{"name", "passed", "detail"}``."""
        return {"name": self.name, "passed": self.passed, "detail": self.detail}


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of ``validate``: every check that ran, the first failure's reason code."""

    passed: bool
    reason_code: str | None
    checks: list[Check] = field(default_factory=list)
    image: DecodedImage | None = None
    slice_u8: np.ndarray | None = None  # uint8 (H, W), windowed
    gate_score: float | None = None
    gate_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the job JSON ``validation`` block (no pixels, no PHI)."""
        gate = None
        if self.gate_score is not None or self.gate_threshold is not None:
            gate = {"score": self.gate_score, "threshold": self.gate_threshold}
        return {
            "passed": self.passed,
            "reason_code": self.reason_code,
            "checks": [c.to_dict() for c in self.checks],
            "gate": gate,
        }


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a model artifact, recorded with every result."""

    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class Prediction:
    """Classifier output for one slice; ``heatmap`` float32 (H, W) in [0, 1] of the full slice."""

    probability: float
    label: str  # "tumor" | "normal"
    threshold: float
    logit: float
    heatmap: np.ndarray
