"""Synthetic liver lesions painted into tumor-free slices, after Hu et al., CVPR 2023.

A 2-D adaptation of "Label-Free Liver Tumor Segmentation" (notes/synthetic_tumors.md):
an elastic-warped, noise-lobulated ellipse placed inside the (eroded) liver mask, a salt-noise
texture, an intensity change *subtracted* from the slice (so the liver's own noise and
anatomy stay visible), a blurred edge, a floor at water density so no lesion becomes a cyst,
an optional small mass effect, and 1-3 lesions per slice. Mostly hypodense at realistic
contrast (real lesions are 10-25 grey levels darker than liver at W400), some hyperdense,
some with a modest enhancing rim. Works in Hounsfield units (``is_hu=True``) or on 8-bit
slices (the HU change is scaled by 255 / window width, W400 assumed); 8-bit sources without
spacing are assumed to be 0.7-0.8 mm/px. Everything is drawn from the caller's
``np.random.Generator`` so lesions are generated on the fly and reproducibly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# (probability, min diameter mm, max diameter mm): the tiny class matters most for small
# lesions (Hu et al. ablation), the large class is rarer on a single slice.
SIZE_CLASSES: tuple[tuple[float, float, float], ...] = (
    (0.30, 5.0, 10.0),
    (0.30, 10.0, 20.0),
    (0.25, 20.0, 35.0),
    (0.15, 35.0, 50.0),
)
ASSUMED_SPACING_MM = (0.7, 0.8)  # 8-bit exports without spacing: typical 512^2 abdominal slice


@dataclass(frozen=True)
class LesionParams:
    """Ranges for one synthetic lesion's appearance (HU unless stated)."""

    p_hyper: float = 0.15
    p_rim: float = 0.10
    hypo_hu: tuple[float, float] = (15.0, 70.0)  # mean darkening: 10-45 grey levels at W400
    hyper_hu: tuple[float, float] = (15.0, 50.0)
    rim_hu: tuple[float, float] = (15.0, 40.0)
    edge_sigma_px: tuple[float, float] = (1.0, 2.5)
    water_floor_hu: float = 20.0  # keep lesions above cyst density
    p_mass_effect: float = 0.5


DEFAULT_PARAMS = LesionParams()


def _cv2():  # type: ignore[no-untyped-def]
    import cv2

    return cv2


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a float32 array (sigma in px)."""
    if sigma <= 0:
        return a
    return _cv2().GaussianBlur(a, (0, 0), sigmaX=float(sigma), borderType=4)


def _lesion_shape(r_px: float, rng: np.random.Generator) -> np.ndarray:
    """Binary lobulated, elastic-warped ellipse centred in a square patch (float32 0/1)."""
    cv2 = _cv2()
    half = int(np.ceil(1.6 * r_px)) + 3
    size = 2 * half + 1
    a = r_px * rng.uniform(0.75, 1.25)
    b = r_px * rng.uniform(0.75, 1.25)
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    xr = xx * np.cos(theta) + yy * np.sin(theta)
    yr = -xx * np.sin(theta) + yy * np.cos(theta)
    rho = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    # Low-frequency noise on the radius field lobulates the outline (noise-thresholded shape).
    lob = _blur(rng.standard_normal((size, size)).astype(np.float32), max(1.0, r_px / 3))
    lob /= float(lob.std()) + 1e-6
    shape = (rho + rng.uniform(0.08, 0.25) * lob < 1.0).astype(np.float32)
    # Elastic warp: 3x3 control grid with normal displacements, smoothly interpolated.
    sigma = rng.uniform(0.08, 0.2) * r_px
    dx = cv2.resize(
        rng.normal(0, sigma, (3, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    dy = cv2.resize(
        rng.normal(0, sigma, (3, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC
    )
    gx = (xx + half + dx).astype(np.float32)
    gy = (yy + half + dy).astype(np.float32)
    return cv2.remap(shape, gx, gy, interpolation=cv2.INTER_NEAREST, borderValue=0)


def _texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Salt-noise texture (Hu et al. 2.3) normalised to mean 1 over the patch, float32."""
    sa = rng.uniform(2.0, 8.0)
    sb = rng.uniform(2.0, 4.0)
    p = _blur(rng.random(shape, dtype=np.float32), sa)
    p = (p - p.min()) / (float(np.ptp(p)) + 1e-6)
    p = 0.05 + 0.20 * p
    dots = (rng.random(shape, dtype=np.float32) < p).astype(np.float32)
    tex = _blur(dots, sb)
    tex = tex / (float(tex.mean()) + 1e-6)
    # Blend towards flat: real lesions are only mildly textured.
    w = rng.uniform(0.3, 0.8)
    return (1.0 - w) + w * tex


def _mass_effect(
    region: np.ndarray, cy: float, cx: float, radius: float, strength: float
) -> np.ndarray:
    """Radial push-out warp (Pixel2Cancer style) around (cy, cx) inside ``radius`` px."""
    cv2 = _cv2()
    h, w = region.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    d2 = dx * dx + dy * dy
    k = np.where(d2 < radius * radius, 1.0 - strength * (1.0 - d2 / (radius * radius)), 1.0).astype(
        np.float32
    )
    return cv2.remap(
        region,
        cx + dx * k,
        cy + dy * k,
        interpolation=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT,
    )


def _pick_diameter_mm(rng: np.random.Generator) -> float:
    """Draw a lesion diameter (mm) from the size classes."""
    probs = np.array([c[0] for c in SIZE_CLASSES])
    c = SIZE_CLASSES[int(rng.choice(len(SIZE_CLASSES), p=probs / probs.sum()))]
    return float(rng.uniform(c[1], c[2]))


def insert_lesions(
    image: np.ndarray,
    liver_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    is_hu: bool,
    spacing_mm: float | None = None,
    window_width: float = 400.0,
    n_lesions: int | None = None,
    diameter_mm: tuple[float, float] | None = None,
    params: LesionParams = DEFAULT_PARAMS,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint 1-3 synthetic lesions inside the liver.

    image: (H, W) HU (``is_hu``) or 0..255 grey; liver_mask: bool (H, W).
    Returns (image, lesion_mask): the image in the input's dtype (uint8 stays uint8) and a
    bool (H, W) mask of lesion pixels, always inside ``liver_mask``. A liver too small for
    any lesion returns the image unchanged and an empty mask.
    """
    cv2 = _cv2()
    liver = liver_mask.astype(bool)
    out = image.astype(np.float32).copy()
    lesion = np.zeros(liver.shape, dtype=bool)
    if liver.sum() < 50:
        return image.copy(), lesion
    spacing = float(spacing_mm) if spacing_mm else float(rng.uniform(*ASSUMED_SPACING_MM))
    hu_to_px = 1.0 if is_hu else 255.0 / window_width
    # Distance to the liver edge: lesion centres sit inside, not on the capsule.
    dist = cv2.distanceTransform(liver.astype(np.uint8), cv2.DIST_L2, 5)
    n = int(n_lesions) if n_lesions is not None else int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
    h, w = liver.shape
    for _ in range(n):
        d_mm = float(rng.uniform(*diameter_mm)) if diameter_mm else _pick_diameter_mm(rng)
        r_px = max(2.0, 0.5 * d_mm / spacing)
        # Shrink a lesion that cannot fit (a thin liver tip) rather than cut it to a sliver.
        r_px = min(r_px, max(2.0, float(dist.max()) * 0.9))
        need = min(0.6 * r_px, float(dist.max()) * 0.8)
        ys, xs = np.nonzero(dist >= max(need, 2.0))
        if len(ys) == 0:
            ys, xs = np.nonzero(liver)
        i = int(rng.integers(len(ys)))
        cy, cx = int(ys[i]), int(xs[i])
        shape = _lesion_shape(r_px, rng)
        half = shape.shape[0] // 2
        pad = half + int(np.ceil(0.5 * r_px)) + 4  # room for the mass-effect ring
        y0, y1 = max(0, cy - pad), min(h, cy + pad + 1)
        x0, x1 = max(0, cx - pad), min(w, cx + pad + 1)
        m = np.zeros((y1 - y0, x1 - x0), np.float32)
        sy0, sx0 = cy - half - y0, cx - half - x0
        ay0, ax0 = max(0, sy0), max(0, sx0)
        ay1 = min(m.shape[0], sy0 + shape.shape[0])
        ax1 = min(m.shape[1], sx0 + shape.shape[1])
        m[ay0:ay1, ax0:ax1] = shape[ay0 - sy0 : ay1 - sy0, ax0 - sx0 : ax1 - sx0]
        liv = liver[y0:y1, x0:x1]
        m *= liv
        if m.sum() < 3:
            continue
        region = out[y0:y1, x0:x1]
        if rng.random() < params.p_mass_effect and r_px >= 6:
            region = _mass_effect(
                region, cy - y0, cx - x0, 1.3 * r_px, float(rng.uniform(0.1, 0.25))
            )
        g = _blur(m, float(rng.uniform(*params.edge_sigma_px)) * max(1.0, r_px / 20)) * liv
        tex = _texture(m.shape, rng)
        kind = rng.random()
        if kind < params.p_hyper:
            change = -float(rng.uniform(*params.hyper_hu))  # brighter (arterial-phase HCC)
        else:
            change = float(rng.uniform(*params.hypo_hu))
        new = region - change * hu_to_px * tex * g
        if params.p_hyper <= kind < params.p_hyper + params.p_rim:
            ring = _blur(((g > 0.35) & (g < 0.75)).astype(np.float32), 0.8) * liv
            new = new + float(rng.uniform(*params.rim_hu)) * hu_to_px * ring
        if change > 0:
            # Water floor: never darker than ~20 HU (cyst density) unless the liver already was.
            floor = (params.water_floor_hu if is_hu else _grey_floor(region, liv)) * np.ones_like(
                region
            )
            new = np.where(g > 0, np.maximum(new, np.minimum(region, floor)), new)
        out[y0:y1, x0:x1] = new
        lesion[y0:y1, x0:x1] |= m > 0.5
    if image.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8), lesion & liver
    return out.astype(image.dtype, copy=False), lesion & liver


def _grey_floor(region: np.ndarray, liv: np.ndarray) -> float:
    """On 8-bit slices, the grey level ~90 HU below the liver median (about water at W400)."""
    vals = region[liv > 0]
    med = float(np.median(vals)) if vals.size else 128.0
    return med - 90.0 * 255.0 / 400.0


def pair(
    image: np.ndarray,
    liver_mask: np.ndarray,
    rng: np.random.Generator,
    **kwargs: object,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (clean, with_lesion, lesion_mask): the same slice without and with lesions."""
    lesioned, mask = insert_lesions(image, liver_mask, rng, **kwargs)  # type: ignore[arg-type]
    return image.copy(), lesioned, mask
