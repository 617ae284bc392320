"""Class activation maps from the same forward pass as the logit (exact Grad-CAM for this head).

Head "gap" is global average pooling -> dropout -> one linear unit, so d(logit)/dA_k(i, j) is
w_k / (H*W) at every position. Head "max" applies that linear unit at every cell and takes the
maximum, so d(logit)/dA_k is w_k at the winning cell and 0 elsewhere: its average over the
cells is again w_k / (H*W). Either way Grad-CAM's channel weights are the dense weights up to
a positive constant, and after normalisation Grad-CAM == CAM = relu(sum_k w_k * A_k).
No gradient tape, batched, one compiled call (tests/ml_core/test_gradcam.py proves the
equality against tf.GradientTape on the real EfficientNetB0 and Lite0 architectures).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_EPS = 1e-8


def cam_from_features(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """CAM per image: features float (N, h, w, K), weights (K,) or (K, 1) -> float32 (N, h, w) in [0, 1].

    Zeros (never NaN) where the map is flat or entirely negative.
    """
    w = np.asarray(weights, dtype=np.float32).reshape(-1)
    cam = np.maximum(np.einsum("nhwk,k->nhw", features.astype(np.float32), w), 0.0)
    peak = cam.reshape(cam.shape[0], -1).max(axis=1) if cam.size else np.zeros((0,), np.float32)
    out = np.zeros_like(cam, dtype=np.float32)
    ok = peak > _EPS
    out[ok] = cam[ok] / peak[ok, None, None]
    return out


def make_forward(model: Any) -> Any:
    """Compile one function images float32 (N, S, S, 3) 0..255 -> (logits (N,), cam (N, h, w) in [0, 1]).

    ``model`` is the two-output Keras model of ``classifier.build_network`` (logit, features).
    """
    import tensorflow as tf

    dense = model.get_layer("logit")
    kernel = dense.kernel

    @tf.function(reduce_retracing=True)
    def forward(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        logit, feats = model(images, training=False)
        cam = tf.nn.relu(tf.einsum("nhwk,k->nhw", feats, tf.reshape(kernel, [-1])))
        peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
        cam = tf.where(peak > _EPS, cam / tf.maximum(peak, _EPS), tf.zeros_like(cam))
        return tf.reshape(logit, [-1]), cam

    return forward


def gradient_tape_gradcam(model: Any, images: np.ndarray) -> np.ndarray:
    """Reference Grad-CAM by tf.GradientTape (keras-io recipe), normalised to [0, 1]: (N, h, w) float32.

    Slow (eager); used by tests and the bench only, to check the forward-pass CAM.
    """
    import tensorflow as tf

    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        logit, feats = model(x, training=False)
        tape.watch(feats)
        total = tf.reduce_sum(logit)
    grads = tape.gradient(total, feats)
    alpha = tf.reduce_mean(grads, axis=[1, 2])  # (N, K)
    cam = tf.nn.relu(tf.einsum("nhwk,nk->nhw", feats, alpha)).numpy()
    peak = cam.reshape(cam.shape[0], -1).max(axis=1)
    out = np.zeros_like(cam, dtype=np.float32)
    ok = peak > _EPS
    out[ok] = cam[ok] / peak[ok, None, None]
    return out


def cam_to_slice(
    cam: np.ndarray,
    box: tuple[int, int, int, int],
    shape: tuple[int, int],
    offset_cells: float = 0.0,
) -> np.ndarray:
    """Map one crop CAM (h, w) back onto the full slice: box (y0, x0, y1, x1) in slice px -> float32 (H, W) [0, 1].

    The box may extend past the slice (the square crop was zero-padded); outside the box is 0.
    Cell (i, j) stands for the tile i..i+1, j..j+1 (in cells) of the box, which is what training
    supervises (``training.cell_targets``); ``offset_cells`` moves every tile by that many cells
    in both axes (-0.5 for an atrous stride-8 map of stride-16 weights, whose cell j covers
    what a stride-16 tile centred at j * 8 px covers: ``input.cam_offset_cells`` in the card).
    """
    import cv2

    height, width = shape
    y0, x0, y1, x1 = box
    out = np.zeros((height, width), np.float32)
    bh, bw = y1 - y0, x1 - x0
    if bh <= 0 or bw <= 0:
        return out
    if offset_cells:
        dy = int(round(offset_cells * bh / cam.shape[0]))
        dx = int(round(offset_cells * bw / cam.shape[1]))
        y0, y1, x0, x1 = y0 + dy, y1 + dy, x0 + dx, x1 + dx
    # Zero-pad one cell before the bilinear upsampling so each cell's value peaks at the cell
    # centre and fades towards the box edge (plain resizing makes flat plateaus up to the box
    # edge, whose first pixel then wins every argmax: the pointing game would hit the border).
    ch, cw = cam.shape
    ph, pw = int(round(bh * (ch + 2) / ch)), int(round(bw * (cw + 2) / cw))
    padded = cv2.resize(np.pad(cam.astype(np.float32), 1), (pw, ph), interpolation=cv2.INTER_LINEAR)
    oy, ox = (ph - bh) // 2, (pw - bw) // 2
    up = padded[oy : oy + bh, ox : ox + bw]
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(height, y1), min(width, x1)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0:sy1, sx0:sx1] = up[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    out = np.nan_to_num(np.clip(out, 0.0, 1.0))
    peak = float(out.max())
    return out / peak if peak > _EPS else np.zeros_like(out)
