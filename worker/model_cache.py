"""One classifier per worker process, loaded lazily (after fork) and reused for every job."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from api.domain.settings import Settings, get_settings
from worker.batching import MicroBatcher, Reservation

if TYPE_CHECKING:
    from ml_core.classifier import Classifier
    from ml_core.types import Prediction

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


def model_runtime(setting: str, device: str) -> str:
    """Classifier.load's runtime for LIVERSCAN_MODEL_RUNTIME: "auto" on a GPU is TensorFlow (ORT runs on the CPU here)."""
    return "tf" if setting == "auto" and device == "gpu" else setting


def get_classifier(settings: Settings | None = None) -> Classifier:
    """Return this process's classifier, loading it on first use (raises ml_core ModelLoadError)."""
    global _classifier
    if _classifier is None:
        with _lock:
            if _classifier is None:
                from ml_core.classifier import Classifier
                from worker import device

                settings = settings or get_settings()
                used = device.configure(settings.device)  # before the first TensorFlow op
                path = model_path(settings)
                runtime = model_runtime(settings.model_runtime, used)
                log.info("loading model from %s (runtime %s)", path, runtime)
                _classifier = Classifier.load(path, runtime=runtime)
                log.info("model %s loaded, forward on %s", _classifier.info, _classifier.runtime)
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


class BatchedGate:
    """The content gate seen by one job: its `score` joins the process's batched gate call.

    With an EitherGate the batched call returns each slice's two margins, and this object offers
    `margins`, `union` and `describe` as the EitherGate does, so the job's content check names
    both gates.
    """

    def __init__(self, runner: ModelRunner, reservation: Reservation[Any, Any]) -> None:
        self.threshold = runner.gate_threshold
        self._reservation = reservation
        self.seconds = 0.0  # time this job spent in (and waiting for) the gate
        gate = runner.gate()
        #: the EitherGate behind the batched call (it returns margins then), else None
        self._either = gate if hasattr(gate, "margins") else None
        if self._either is not None:
            self.margins, self.describe, self.union = self._margins, gate.describe, gate.union

    def _submit(self, slices_u8: list[np.ndarray]) -> list[Any]:
        start = time.perf_counter()
        try:
            return [self._reservation.submit(s) for s in slices_u8]
        finally:
            self.seconds += time.perf_counter() - start

    def _margins(self, slices_u8: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self._submit(slices_u8), np.float64).reshape(len(slices_u8), -1)

    def score(self, slices_u8: list[np.ndarray]) -> list[float]:
        """P(liver slice) per slice (ml_core ContentGate), scored in a shared batch."""
        if self._either is not None:
            return self._either.union(self._margins(slices_u8))
        return [float(v) for v in self._submit(slices_u8)]


class ModelRunner:
    """The process's classifier and content gate behind two micro-batchers (gate, classifier)."""

    def __init__(self, classifier: Classifier, settings: Settings) -> None:
        from worker import metrics

        self.classifier = classifier
        self._gate: Any = None
        self._gate_lock = threading.Lock()
        size, wait = settings.worker_batch_size, settings.worker_batch_wait_ms / 1000.0
        self.gate_batcher: MicroBatcher[np.ndarray, Any] = MicroBatcher(
            self._score, max_size=size, max_wait_s=wait, name="gate", on_batch=metrics.observe_batch
        )
        self.predict_batcher: MicroBatcher[np.ndarray, Prediction] = MicroBatcher(
            classifier.predict,
            max_size=size,
            max_wait_s=wait,
            name="classifier",
            on_batch=metrics.observe_batch,
        )

    def gate(self) -> Any:
        """The shipped content gate (raises ml_core ModelLoadError when the artifact has none)."""
        if self._gate is None:
            with self._gate_lock:
                if self._gate is None:
                    self._gate = self.classifier.gate()
        return self._gate

    @property
    def gate_threshold(self) -> float:
        """The gate's acceptance threshold."""
        return float(self.gate().threshold)

    def _score(self, slices_u8: list[np.ndarray]) -> list[Any]:
        """One batched gate call: scores, or each slice's margins for an EitherGate."""
        gate = self.gate()
        if hasattr(gate, "margins"):
            return list(gate.margins(slices_u8))
        return list(gate.score(slices_u8))


_runner: ModelRunner | None = None


def get_runner(settings: Settings | None = None) -> ModelRunner:
    """This process's model runner (batchers around the current classifier)."""
    global _runner
    settings = settings or get_settings()
    classifier = get_classifier(settings)
    runner = _runner
    if runner is None or runner.classifier is not classifier:
        with _lock:
            if _runner is None or _runner.classifier is not classifier:
                _runner = ModelRunner(classifier, settings)
            runner = _runner
    return runner
