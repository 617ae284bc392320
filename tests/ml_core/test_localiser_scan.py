"""The localiser candidate scan's area measure (ml_core/tools/localiser_scan.py)."""

from __future__ import annotations

import numpy as np

from ml_core.tools.localiser_scan import areas_px512


class _Box:
    """A stand-in localiser that finds a fixed box (a quarter of the side each way)."""

    def segment(self, slices: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for s in slices:
            m = np.zeros(s.shape, bool)
            h, w = s.shape
            m[: h // 4, : w // 4] = True
            out.append(m)
        return out


def test_areas_are_in_pixels_at_512_whatever_the_input_size() -> None:
    images = [np.zeros((256, 256), np.uint8), np.zeros((512, 512), np.uint8)] * 20
    areas = areas_px512(_Box(), images)
    assert areas.shape == (40,)
    np.testing.assert_allclose(areas, 128 * 128)
