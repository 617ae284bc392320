"""The worker's cheap PNG encoding shows the same picture as ml_core.overlay's."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ml_core.errors import RenderError
from ml_core.overlay import heatmap_and_overlay_png, heatmap_png, overlay_png


def _rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_heatmap_is_identical_and_overlay_within_one_grey_level(
    liver_slices: list[np.ndarray],
) -> None:
    """Decoded pixels: heatmap equal, overlay off by at most 1 (fixed-point blend); a smaller-size
    heatmap is resized onto the slice as ml_core does."""
    rng = np.random.default_rng(7)
    boxed = np.zeros((512, 512), np.float32)  # a CAM: hot inside its liver box, 0 elsewhere
    boxed[150:390, 60:330] = rng.random((240, 270))
    for slice_u8, heat in (
        (liver_slices[0], rng.random((512, 512)).astype(np.float32)),
        (liver_slices[3], boxed),
        (liver_slices[4], np.zeros((512, 512), np.float32)),
        (liver_slices[1], rng.random((16, 16)).astype(np.float32)),
        (liver_slices[2][:300, :400], np.full((300, 400), np.nan, np.float32)),
    ):
        fast_heat, fast_overlay = heatmap_and_overlay_png(slice_u8, heat)
        if heat.shape == slice_u8.shape:
            assert np.array_equal(_rgb(fast_heat), _rgb(heatmap_png(heat)))
        diff = np.abs(_rgb(fast_overlay) - _rgb(overlay_png(slice_u8, heat)))
        assert diff.max() <= 1
        assert _rgb(fast_overlay).shape == (*slice_u8.shape, 3)
        cold = ~(np.nan_to_num(heat) > 0) if heat.shape == slice_u8.shape else None
        if cold is not None:  # where the heatmap is cold the overlay is the plain slice
            assert np.array_equal(_rgb(fast_overlay)[cold], np.repeat(slice_u8[cold, None], 3, 1))


def test_a_slice_that_is_not_two_dimensional_is_a_render_error() -> None:
    """Wrong shapes raise ml_core's RenderError (the job fails with its code)."""
    with pytest.raises(RenderError):
        heatmap_and_overlay_png(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32))
