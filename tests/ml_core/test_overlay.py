"""Overlays: colour-mapped heatmaps and blends as PNG bytes a browser can show."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ml_core.overlay import encode_png, heatmap_png, overlay_png


def _decode(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None
    return img


def test_encode_png_round_trips_the_slice() -> None:
    s = np.arange(256 * 256, dtype=np.uint32).reshape(256, 256).astype(np.uint8)
    assert np.array_equal(_decode(encode_png(s)), s)


def test_heatmap_png_is_colour_and_hot_where_high() -> None:
    h = np.zeros((64, 64), np.float32)
    h[20:30, 40:50] = 1.0
    img = _decode(heatmap_png(h))
    assert img.shape == (64, 64, 3)
    hot, cold = img[25, 45].astype(int), img[5, 5].astype(int)
    assert hot[2] > hot[0]  # turbo: high values red (BGR: R last)
    assert cold[0] > cold[2]  # low values blue


def test_overlay_keeps_slice_where_heatmap_is_cold() -> None:
    s = np.full((100, 120), 90, np.uint8)
    h = np.zeros((100, 120), np.float32)
    h[40:60, 50:70] = 1.0
    img = _decode(overlay_png(s, h, alpha=0.5))
    assert img.shape == (100, 120, 3)
    assert np.array_equal(img[5, 5], [90, 90, 90])
    assert not np.array_equal(img[50, 60], [90, 90, 90])


@pytest.mark.parametrize(
    "heat", [np.zeros((32, 32)), np.full((32, 32), np.nan)], ids=["zeros", "nan"]
)
def test_flat_or_nan_heatmap_gives_a_valid_image(heat: np.ndarray) -> None:
    s = np.full((64, 64), 50, np.uint8)
    img = _decode(overlay_png(s, heat))  # heatmap resized to the slice
    assert img.shape == (64, 64, 3)
    assert np.array_equal(img[10, 10], [50, 50, 50])
    assert _decode(heatmap_png(heat)).shape == (32, 32, 3)


def test_wrong_shape_is_a_render_error() -> None:
    from ml_core.errors import MLCoreError

    with pytest.raises(MLCoreError) as info:
        encode_png(np.zeros((4, 4, 4, 4), np.uint8))
    assert info.value.code == "render_error"
