"""Where the model runs (LIVERSCAN_DEVICE): cpu, gpu (memory growth on), or auto.

Called once per worker process before the model loads, i.e. before TensorFlow runs any op
(visible devices and memory growth cannot change afterwards). One worker process per GPU:
a process sees and uses only the first visible GPU, so a host with several GPUs runs one
worker per GPU, each with its own CUDA_VISIBLE_DEVICES (infra/k8s/worker-gpu.yaml asks for
one `nvidia.com/gpu` per pod; docker-compose's `gpu` profile pins one device per service).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ml_core.errors import ModelLoadError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_configured: str | None = None


def plan(device: str, gpus: list[Any]) -> tuple[str, list[Any]]:
    """(device actually used, GPUs to enable) for the setting and the GPUs TensorFlow lists."""
    if device == "cpu":
        return "cpu", []
    if device == "gpu" and not gpus:
        raise ModelLoadError("LIVERSCAN_DEVICE=gpu but TensorFlow sees no GPU")
    if not gpus:
        return "cpu", []
    return "gpu", gpus[:1]  # one process per GPU


def configure(device: str) -> str:
    """Apply LIVERSCAN_DEVICE to TensorFlow in this process once; returns "cpu" or "gpu"."""
    global _configured
    with _lock:
        if _configured is not None:
            return _configured
        import tensorflow as tf

        used, enable = plan(device, tf.config.list_physical_devices("GPU"))
        try:
            if used == "cpu":
                tf.config.set_visible_devices([], "GPU")
            else:
                tf.config.set_visible_devices(enable, "GPU")
                for gpu in enable:
                    # Grow GPU memory as needed instead of reserving all of it at start.
                    tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as exc:  # TensorFlow already initialised (e.g. a test loaded a model)
            log.warning("device setting not applied, TensorFlow is initialised: %s", exc)
        _configured = used
        log.info("model device: %s (LIVERSCAN_DEVICE=%s)", used, device)
        return used
