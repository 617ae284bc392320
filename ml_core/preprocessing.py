"""Preprocessing shared by training and serving, and training augmentations (pure numpy/cv2).

``to_slice_u8`` is THE single entry from a decoded image to the 8-bit slice that the gate,
the classifier, training and overlays all see:
- CT in Hounsfield units → abdominal window W400/L50;
- PNG/JPEG → taken as already windowed grey (the clinic's export window);
- MR (and NIfTI MR) raw values → robust percentile stretch (1st–99th percentile).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ml_core.types import DecodedImage

WINDOW_WIDTH = 400.0
WINDOW_LEVEL = 50.0
MR_PERCENTILES = (1.0, 99.0)


def window(
    hu: np.ndarray, *, width: float = WINDOW_WIDTH, level: float = WINDOW_LEVEL
) -> np.ndarray:
    """Window HU values to uint8 (H, W): level - width/2 → 0, level + width/2 → 255."""
    lo = level - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def stretch(
    values: np.ndarray, *, low: float = MR_PERCENTILES[0], high: float = MR_PERCENTILES[1]
) -> np.ndarray:
    """Map the [low, high] percentiles of raw values (H, W) linearly onto uint8 0..255."""
    v = np.asarray(values, dtype=np.float32)
    sample = v[::2, ::2] if v.size > 65536 else v
    lo, hi = np.percentile(sample, [low, high])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(v.shape, dtype=np.uint8)
    scaled = (v - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_slice_u8(image: DecodedImage) -> np.ndarray:
    """Return the model's 8-bit slice, uint8 (H, W), for any decoded image (see module doc)."""
    if image.is_hu:
        return window(image.pixels)
    if image.format in ("dicom", "nifti"):
        return stretch(image.pixels)
    return np.clip(np.rint(image.pixels), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Letterbox:
    """How a (height, width) image was scaled and padded into a square of side ``size``."""

    height: int
    width: int
    size: int
    scale: float
    top: int
    left: int

    @property
    def inner(self) -> tuple[int, int]:
        """Return the (height, width) of the scaled image inside the square."""
        return (max(1, round(self.height * self.scale)), max(1, round(self.width * self.scale)))


def letterbox(image: np.ndarray, size: int, *, pad_value: int = 0) -> tuple[np.ndarray, Letterbox]:
    """Resize (H, W[, C]) keeping the aspect ratio and pad to (size, size[, C]); returns the box."""
    import cv2

    h, w = image.shape[:2]
    scale = size / float(max(h, w))
    box = Letterbox(h, w, size, scale, 0, 0)
    ih, iw = box.inner
    top, left = (size - ih) // 2, (size - iw) // 2
    box = Letterbox(h, w, size, scale, top, left)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (iw, ih), interpolation=interp)
    out = np.full((size, size) + image.shape[2:], pad_value, dtype=image.dtype)
    out[top : top + ih, left : left + iw] = resized
    return out, box


def unletterbox(values: np.ndarray, box: Letterbox) -> np.ndarray:
    """Map a (size, size) or coarser map (e.g. a heatmap) back onto the original (H, W) image."""
    import cv2

    v: np.ndarray = np.asarray(values, dtype=np.float32)
    if v.shape[:2] != (box.size, box.size):
        v = cv2.resize(v, (box.size, box.size), interpolation=cv2.INTER_LINEAR)
    ih, iw = box.inner
    inner = v[box.top : box.top + ih, box.left : box.left + iw]
    return cv2.resize(inner, (box.width, box.height), interpolation=cv2.INTER_LINEAR)


def to_model_input(slices_u8: list[np.ndarray], size: int, *, channels: int = 3) -> np.ndarray:
    """Stack uint8 (H, W) slices into float32 (N, size, size, channels) in 0..255, letterboxed."""
    batch = np.zeros((len(slices_u8), size, size, channels), dtype=np.float32)
    for i, s in enumerate(slices_u8):
        boxed, _ = letterbox(np.asarray(s, dtype=np.uint8), size)
        batch[i] = boxed[..., None].astype(np.float32)
    return batch


# --- training augmentations: pure functions of (array, rng) ---------------------------------


def random_flip(image: np.ndarray, rng: np.random.Generator, *, p: float = 0.5) -> np.ndarray:
    """Flip (H, W) left-right with probability ``p`` (mirrored exports exist in the data)."""
    return image[:, ::-1].copy() if rng.random() < p else image


def random_rotate_scale(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    max_degrees: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    border_value: float | None = None,
) -> np.ndarray:
    """Rotate by ±max_degrees and scale about the centre; shape and dtype kept."""
    import cv2

    h, w = image.shape[:2]
    angle = float(rng.uniform(-max_degrees, max_degrees))
    scale = float(rng.uniform(*scale_range))
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, scale)
    fill = float(image.min()) if border_value is None else border_value
    return cv2.warpAffine(
        image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=fill
    )


def jitter_window(
    hu: np.ndarray,
    rng: np.random.Generator,
    *,
    width_range: tuple[float, float] = (300.0, 450.0),
    level_range: tuple[float, float] = (30.0, 70.0),
) -> np.ndarray:
    """Window HU (H, W) with a random abdominal window (W 300–450, L 30–70) → uint8 (H, W)."""
    return window(
        hu, width=float(rng.uniform(*width_range)), level=float(rng.uniform(*level_range))
    )


def add_noise(
    image_u8: np.ndarray, rng: np.random.Generator, *, max_sigma: float = 6.0
) -> np.ndarray:
    """Add Gaussian noise of random sigma in [0, max_sigma] grey levels → uint8 (H, W)."""
    sigma = float(rng.uniform(0.0, max_sigma))
    noisy = image_u8.astype(np.float32) + rng.normal(0.0, sigma, image_u8.shape).astype(np.float32)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def random_blur(
    image_u8: np.ndarray, rng: np.random.Generator, *, max_sigma: float = 1.2
) -> np.ndarray:
    """Gaussian blur of random sigma in [0.3, max_sigma] → uint8 (H, W)."""
    import cv2

    sigma = float(rng.uniform(0.3, max_sigma))
    return cv2.GaussianBlur(image_u8, (0, 0), sigmaX=sigma)


def jpeg_recompress(
    image_u8: np.ndarray, rng: np.random.Generator, *, quality_range: tuple[int, int] = (60, 95)
) -> np.ndarray:
    """Round-trip through JPEG at a random quality (export artefacts) → uint8 (H, W)."""
    import cv2

    quality = int(rng.integers(quality_range[0], quality_range[1] + 1))
    ok, buf = cv2.imencode(".jpg", image_u8, [cv2.IMWRITE_JPEG_QUALITY, quality])
    decoded = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else None
    return image_u8 if decoded is None else decoded


def augment(
    image: np.ndarray, rng: np.random.Generator, *, is_hu: bool, p: float = 0.5
) -> np.ndarray:
    """Apply the training augmentations to HU (is_hu) or uint8 (H, W) → uint8 (H, W).

    Geometry (flip, rotation/scale) first, then the window (jittered for HU), then noise,
    blur and JPEG re-compression, each with probability ``p``.
    """
    x = random_flip(image, rng)
    if rng.random() < p:
        x = random_rotate_scale(x.astype(np.float32), rng)
    x = jitter_window(x, rng) if is_hu else np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if rng.random() < p:
        x = add_noise(x, rng)
    if rng.random() < p:
        x = random_blur(x, rng)
    if rng.random() < p:
        x = jpeg_recompress(x, rng)
    return x
