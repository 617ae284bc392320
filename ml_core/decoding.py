"""Decode uploads (PNG, JPEG, DICOM) and NIfTI volumes into typed ``DecodedImage`` results.

The format is sniffed from magic bytes only (the extension and the client's content type are
not trusted), and the pixel count announced by the header is checked *before* any pixel buffer
is allocated, so a decompression bomb costs a few header bytes. Every failure raises an
``MLCoreError`` subclass with a stable code.

Multi-frame DICOM is rejected (``multi_frame``): the service classifies one slice per job, and
silently picking a frame would classify a slice the sender never chose. Volumes go through
``decode_volume`` (NIfTI) on the command line and batch paths.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_core.errors import (
    MLCoreError,
    MultiFrame,
    NoPixelData,
    NotGrayscale,
    PixelLimit,
    Undecodable,
    UnsupportedFormat,
    UnsupportedTransferSyntax,
)
from ml_core.types import DecodedImage

if TYPE_CHECKING:
    import pydicom

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 4096 * 4096
#: A channel difference (0..255) above this counts as colour (JPEG chroma noise stays below).
COLOR_TOLERANCE = 12
#: More than this fraction of coloured pixels makes an image colour (catches thin overlays).
COLOR_FRACTION = 0.0005

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_DICOM_FIRST_GROUPS = {0x0002, 0x0008}


@dataclass(frozen=True)
class Probe:
    """What the header says before any pixel is decoded (cheap, bounded by the header size)."""

    format: str  # "png" | "jpeg" | "dicom"
    width: int
    height: int
    frames: int
    channels: int
    dataset: Any = None  # the parsed pydicom Dataset (original, not de-identified), DICOM only

    @property
    def pixel_count(self) -> int:
        """Return width x height x frames as announced by the header."""
        return self.width * self.height * max(self.frames, 1)


def sniff_format(data: bytes) -> str | None:
    """Return "png" | "jpeg" | "dicom" from magic bytes only, or None when unrecognised."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if _looks_like_raw_dicom(data):
        return "dicom"
    return None


def _looks_like_raw_dicom(data: bytes) -> bool:
    """Recognise a DICOM stream without preamble (implicit or explicit VR little endian)."""
    if len(data) < 12:
        return False
    group, element = struct.unpack_from("<HH", data, 0)
    if group not in _DICOM_FIRST_GROUPS or element > 0x0020:
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():
        return True
    (length,) = struct.unpack_from("<I", data, 4)
    return 0 < length < min(len(data), 1024)


def probe(data: bytes) -> Probe:
    """Read format, dimensions and frame count from the header without decoding pixels."""
    fmt = sniff_format(data)
    if fmt == "png":
        return _probe_png(data)
    if fmt == "jpeg":
        return _probe_jpeg(data)
    if fmt == "dicom":
        return _probe_dicom(data)
    raise UnsupportedFormat("not a PNG, JPEG or DICOM file (checked by magic bytes)")


def _probe_png(data: bytes) -> Probe:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise Undecodable("PNG without a valid IHDR chunk")
    width, height, bit_depth, color_type = struct.unpack_from(">IIBB", data, 16)
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(color_type)
    if channels is None or width == 0 or height == 0 or bit_depth not in (1, 2, 4, 8, 16):
        raise Undecodable("PNG header has an invalid size, bit depth or colour type")
    if data.rfind(b"IEND") < 33:
        raise Undecodable("PNG is truncated (no IEND chunk)")
    return Probe("png", width, height, 1, channels)


def _probe_jpeg(data: bytes) -> Probe:
    pos, n = 2, len(data)
    sof: tuple[int, int, int] | None = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise Undecodable("JPEG marker structure is corrupt")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            raise Undecodable("JPEG segment has an invalid length")
        if marker in _SOF_MARKERS and pos + 10 <= n:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            sof = (width, height, data[pos + 9])
        if marker == 0xDA:  # start of scan: the header is over
            if sof is None:
                raise Undecodable("JPEG has no frame header before its scan")
            if data.rfind(b"\xff\xd9") < pos:
                raise Undecodable("JPEG is truncated (no end-of-image marker)")
            width, height, channels = sof
            if width == 0 or height == 0:
                raise Undecodable("JPEG frame header has a zero dimension")
            return Probe("jpeg", width, height, 1, channels)
        pos += 2 + length
    raise Undecodable("JPEG is truncated before its first scan")


def _quiet_pydicom() -> None:
    """Stop pydicom echoing malformed header values (which may be PHI) into warnings and logs."""
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)


def _read_dicom(data: bytes) -> pydicom.Dataset:
    import pydicom

    _quiet_pydicom()

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise Undecodable(f"DICOM header could not be parsed ({type(exc).__name__})") from None
    if any("End of file reached" in str(w.message) for w in caught):
        raise Undecodable("DICOM is truncated (end of file inside an element)")
    if len(ds) == 0:
        raise Undecodable("DICOM holds no readable data elements")
    return ds


def _probe_dicom(data: bytes) -> Probe:
    ds = _read_dicom(data)
    try:
        rows = int(ds.get("Rows") or 0)
        cols = int(ds.get("Columns") or 0)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except Exception:
        raise Undecodable("DICOM image dimensions are not integers") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return Probe("dicom", cols, rows, max(frames, 1), samples, ds)
    if rows <= 0 or cols <= 0 or frames <= 0 or samples <= 0:
        raise Undecodable("DICOM Rows/Columns/NumberOfFrames are missing or not positive")
    return Probe("dicom", cols, rows, frames, samples, ds)


def check_pixel_limit(p: Probe, max_pixels: int) -> None:
    """Raise PixelLimit when the header announces more than ``max_pixels`` pixels."""
    if p.pixel_count > max_pixels:
        raise PixelLimit(
            f"header announces {p.width}x{p.height}x{p.frames} = {p.pixel_count} pixels, "
            f"limit {max_pixels}"
        )


def color_fraction(arr: np.ndarray) -> float:
    """Fraction of pixels whose channels differ by more than COLOR_TOLERANCE (arr (H, W, 3) uint8)."""
    a = arr.astype(np.int16, copy=False)
    spread = np.maximum(np.abs(a[..., 0] - a[..., 1]), np.abs(a[..., 1] - a[..., 2]))
    spread = np.maximum(spread, np.abs(a[..., 0] - a[..., 2]))
    return float(np.count_nonzero(spread > COLOR_TOLERANCE)) / float(spread.size)


def _percentile_stretch(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the [low, high] percentiles of ``values`` linearly onto 0..255 (float32)."""
    sample = values[::4, ::4] if values.ndim == 2 and values.size > 65536 else values
    lo, hi = np.percentile(sample, [low, high])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    out = (values.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(out, 0.0, 255.0).astype(np.float32)


def _raster_to_gray(arr: np.ndarray, allow_color: bool) -> tuple[np.ndarray, bool, float]:
    """Turn an OpenCV raster into (grey float32 0..255, was_color, colour fraction)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    frac = 0.0
    if arr.ndim == 3:
        bgr = arr[..., :3]
        eight = bgr if bgr.dtype == np.uint8 else (bgr // 257).astype(np.uint8)
        frac = color_fraction(eight)
        if frac > COLOR_FRACTION and not allow_color:
            raise NotGrayscale(f"{frac:.2%} of pixels are coloured")
        import cv2

        arr = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2GRAY)
    if arr.dtype == np.uint8:
        gray = arr.astype(np.float32)
    else:  # 16-bit grey: scale unknown, so stretch robustly like MR (documented)
        gray = _percentile_stretch(arr)
    return gray, frac > COLOR_FRACTION, frac


def _decode_raster(data: bytes, p: Probe) -> np.ndarray:
    import cv2

    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        arr = None
    if arr is None or arr.size == 0:
        raise Undecodable(f"{p.format.upper()} pixel data could not be decoded")
    if arr.shape[0] != p.height or arr.shape[1] != p.width:
        raise Undecodable("decoded size differs from the header")
    return arr


def check_transfer_syntax(ds: pydicom.Dataset) -> str:
    """Return the transfer syntax UID, raising UnsupportedTransferSyntax when no decoder exists."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    uid = UID(str(ts)) if ts else ImplicitVRLittleEndian
    name = uid.name if uid.is_valid else "unknown"
    try:
        decoder = get_decoder(uid)
    except Exception:
        raise UnsupportedTransferSyntax(f"no decoder for transfer syntax {uid} ({name})") from None
    if not decoder.is_available:
        raise UnsupportedTransferSyntax(f"decoder for {name} is not installed")
    return str(uid)


def _dicom_pixels(ds: pydicom.Dataset) -> np.ndarray:
    if "PixelData" not in ds:
        raise NoPixelData("DICOM has no PixelData element")
    ts: Any = check_transfer_syntax(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = ts
    elif meta is None:
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    try:
        arr = ds.pixel_array
    except MemoryError:
        raise Undecodable("DICOM pixel data is too large to decode") from None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - Rust decoders panic (pyo3 PanicException)
        raise Undecodable(f"DICOM pixel data could not be decoded ({type(exc).__name__})") from None
    return np.asarray(arr)


def _spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    try:
        sp = ds.get("PixelSpacing")
        if sp is None or len(sp) != 2:
            return None
        row, col = float(sp[0]), float(sp[1])
    except Exception:
        return None
    if not (np.isfinite(row) and np.isfinite(col)) or row <= 0 or col <= 0 or row > 50 or col > 50:
        return None
    return (row, col)


def axial_normal_z(ds: pydicom.Dataset) -> float | None:
    """Return |z| of the slice normal from ImageOrientationPatient (1 = axial), None if absent."""
    try:
        iop = [float(v) for v in ds.get("ImageOrientationPatient")]
    except Exception:
        return None
    if len(iop) != 6 or not all(np.isfinite(iop)):
        return None
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))
    norm = float(np.linalg.norm(normal))
    return abs(float(normal[2])) / norm if norm > 0 else None


def to_radiological_view(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Flip an axial slice so the patient's right is on the left and anterior at the top."""
    try:
        iop = [float(v) for v in ds.get("ImageOrientationPatient")]
    except Exception:
        return values
    if len(iop) != 6 or (axial_normal_z(ds) or 0.0) < 0.8:
        return values
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    if abs(row[0]) < abs(row[1]):  # transposed storage: rows run along y
        values, row, col = values.T, col, row
    if row[0] < 0:  # columns should run towards the patient's left (+x in LPS)
        values = values[:, ::-1]
    if col[1] < 0:  # rows should run towards posterior (+y in LPS)
        values = values[::-1, :]
    return np.ascontiguousarray(values)


def _rescale(ds: pydicom.Dataset) -> tuple[float, float]:
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except Exception:
        raise Undecodable("RescaleSlope/RescaleIntercept are not numbers") from None
    if not (np.isfinite(slope) and np.isfinite(intercept)) or slope == 0:
        raise Undecodable("RescaleSlope/RescaleIntercept are not usable")
    return slope, intercept


def decode_probed(
    data: bytes, p: Probe, *, allow_color: bool = False
) -> tuple[DecodedImage, float]:
    """Decode the pixels of an already probed upload; returns (image, colour fraction)."""
    if p.format in ("png", "jpeg"):
        raster = _decode_raster(data, p)
        gray, was_color, frac = _raster_to_gray(raster, allow_color)
        img = DecodedImage(
            pixels=gray,
            format=p.format,
            width=p.width,
            height=p.height,
            modality=None,
            is_hu=False,
            spacing_mm=None,
            was_color=was_color,
            dicom=None,
        )
        return img, frac
    return _decode_dicom(p, allow_color=allow_color)


def _decode_dicom(p: Probe, *, allow_color: bool) -> tuple[DecodedImage, float]:
    from ml_core.deid import header_summary

    ds = p.dataset
    if p.frames > 1:
        raise MultiFrame(f"DICOM has {p.frames} frames; send one slice per file")
    arr = _dicom_pixels(ds)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frac = 0.0
    was_color = False
    if arr.ndim == 3 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim == 3 and arr.shape[-1] == 3:
            rgb = arr if arr.dtype == np.uint8 else np.clip(arr, 0, 255).astype(np.uint8)
            frac = color_fraction(rgb)
            was_color = frac > COLOR_FRACTION
        else:
            was_color = True
        if not allow_color or arr.ndim != 3 or arr.shape[-1] != 3:
            raise NotGrayscale(f"DICOM photometric interpretation {photometric} is not greyscale")
        arr = arr.astype(np.float32).mean(axis=-1)
    if arr.ndim != 2 or arr.shape != (p.height, p.width):
        raise Undecodable("decoded DICOM pixels do not match Rows/Columns")
    modality = str(ds.get("Modality", "") or "").upper() or None
    values = arr.astype(np.float32)
    is_hu = modality == "CT"
    if is_hu:
        slope, intercept = _rescale(ds)
        values = values * np.float32(slope) + np.float32(intercept)
    elif photometric == "MONOCHROME1":  # MR and others keep raw values; to_slice_u8 stretches
        values = values.max() - values
    if not np.all(np.isfinite(values)):
        raise Undecodable("DICOM pixel values are not finite")
    values = to_radiological_view(values, ds)
    img = DecodedImage(
        pixels=values,
        format="dicom",
        width=values.shape[1],
        height=values.shape[0],
        modality=modality,
        is_hu=is_hu,
        spacing_mm=_spacing(ds),
        was_color=was_color,
        dicom=header_summary(ds),
    )
    return img, frac


def decode(
    data: bytes, *, allow_color: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Decode PNG/JPEG/DICOM bytes into a DecodedImage (pixels float32 (H, W)); raises MLCoreError."""
    if not data:
        from ml_core.errors import EmptyFile

        raise EmptyFile("the file is empty")
    try:
        p = probe(data)
        check_pixel_limit(p, max_pixels)
        if p.format == "dicom" and "PixelData" not in p.dataset:
            raise NoPixelData("DICOM has no PixelData element")
        image, _ = decode_probed(data, p, allow_color=allow_color)
    except MLCoreError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - parsers fail in many ways on hostile input
        raise Undecodable(f"input could not be parsed ({type(exc).__name__})") from None
    return image


def decode_volume(path: str | Path, *, modality: str = "CT") -> Iterator[DecodedImage]:
    """Yield the axial slices of a NIfTI volume, inferior to superior, in radiological view.

    Each slice has pixels float32 (H, W) (HU for CT), ``spacing_mm`` (row, col) from the header.
    """
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        zooms = img.header.get_zooms()
        volume = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise Undecodable(f"NIfTI volume could not be read ({type(exc).__name__})") from None
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise Undecodable(f"NIfTI volume has {volume.ndim} dimensions, expected 3")
    is_hu = modality.upper() == "CT"
    spacing = (float(zooms[1]), float(zooms[0]))
    for k in range(volume.shape[2]):
        # RAS+ axes (x towards the patient's right, y anterior): the radiological view puts
        # the patient's right on the image's left and anterior at the top, so flip both.
        sl = np.asarray(volume[::-1, ::-1, k], dtype=np.float32).T
        sl = np.ascontiguousarray(sl)
        yield DecodedImage(
            pixels=sl,
            format="nifti",
            width=sl.shape[1],
            height=sl.shape[0],
            modality=modality.upper(),
            is_hu=is_hu,
            spacing_mm=spacing,
            was_color=False,
            dicom=None,
        )
