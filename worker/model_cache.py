"""One classifier per worker process, loaded lazily (after fork) and reused for every job."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from api.domain.settings import get_settings

if TYPE_CHECKING:
    from ml_core.classifier import Classifier

log = logging.getLogger(__name__)

_lock = threading.Lock()
_classifier: Classifier | None = None


def model_path() -> Path:
    """The artifact folder this process serves: the configured path or ml_core's shipped model."""
    configured = get_settings().model_path
    if configured is not None:
        return configured
    from ml_core.classifier import default_model_path

    return default_model_path()


def get_classifier() -> Classifier:
    """Return this process's classifier, loading it on first use (raises ml_core ModelLoadError)."""
    global _classifier
    if _classifier is None:
        with _lock:
            if _classifier is None:
                from ml_core.classifier import Classifier

                path = model_path()
                log.info("loading model from %s", path)
                _classifier = Classifier.load(path)
                log.info("model %s loaded", _classifier.info)
    return _classifier


def preload() -> None:
    """Load the model now if possible; a failure is logged and surfaces on the first job instead."""
    try:
        get_classifier()
    except Exception:  # the job that needs the model records the error code; the worker stays up
        log.exception("model preload failed")


def reset() -> None:
    """Forget the loaded model (tests and hot reload)."""
    global _classifier
    with _lock:
        _classifier = None
