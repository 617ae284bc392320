"""One classifier per worker process, loaded lazily (after fork) and reused for every job."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from api.domain.settings import Settings, get_settings

if TYPE_CHECKING:
    from ml_core.classifier import Classifier

log = logging.getLogger(__name__)

_lock = threading.Lock()
_classifier: Classifier | None = None


def model_path(settings: Settings) -> Path:
    """The artifact folder to serve: LIVERSCAN_MODEL_PATH or ml_core's shipped model."""
    configured = settings.model_path
    if configured is not None:
        return configured
    from ml_core.classifier import default_model_path

    return default_model_path()


def get_classifier(settings: Settings | None = None) -> Classifier:
    """Return this process's classifier, loading it on first use (raises ml_core ModelLoadError)."""
    global _classifier
    if _classifier is None:
        with _lock:
            if _classifier is None:
                from ml_core.classifier import Classifier

                path = model_path(settings or get_settings())
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


def set_classifier(classifier: Classifier | None) -> None:
    """Serve this classifier from now on (tests; None forgets it so the next job loads again)."""
    global _classifier
    with _lock:
        _classifier = classifier
