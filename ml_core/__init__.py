"""Pixels and models for liverscan: decoding, validation, preprocessing, the classifier, overlays.

Importing ``ml_core`` is cheap: no TensorFlow, OpenCV or pydicom at import time; the modules
that need them import them when they are used.
"""

from ml_core.errors import MLCoreError
from ml_core.types import Check, DecodedImage, ModelInfo, Prediction, ValidationReport

__all__ = ["Check", "DecodedImage", "MLCoreError", "ModelInfo", "Prediction", "ValidationReport"]
