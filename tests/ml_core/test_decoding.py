"""Decoding: magic-byte sniffing, PNG/JPEG/DICOM/NIfTI to typed results, stable error codes."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from ml_core import decoding
from ml_core.decoding import decode, decode_volume, sniff_format
from ml_core.errors import MLCoreError


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims ``width`` x ``height`` (a bomb header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _code(fn, *args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(MLCoreError) as info:
        fn(*args, **kwargs)
    return info.value.code


def test_sniff_uses_magic_bytes_only(make: SimpleNamespace, read) -> None:  # type: ignore[no-untyped-def]
    grey = np.full((8, 8), 100, np.uint8)
    assert sniff_format(make.png(grey)) == "png"
    assert sniff_format(make.jpeg(grey)) == "jpeg"
    assert sniff_format(read("pydicom_abdomen/ct_upper_abdomen__explicit_VR-UN.dcm")) == "dicom"
    assert sniff_format(read("negatives/skimage/no_time_for_that_tiny.gif")) is None
    assert sniff_format(b"%PDF-1.7\n" + b"\0" * 200) is None
    assert sniff_format(b"") is None


def test_sniff_recognises_dicom_without_preamble(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    raw = make.dicom(make.ct_dataset(ircadb.hu))[132:]  # drop preamble + "DICM"
    assert sniff_format(raw) == "dicom"


def test_png_grey_keeps_values(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    u8 = make.window(ircadb.hu)
    img = decode(make.png(u8))
    assert (img.format, img.width, img.height, img.is_hu, img.was_color) == (
        "png",
        512,
        512,
        False,
        False,
    )
    assert img.pixels.dtype == np.float32 and img.pixels.shape == (512, 512)
    assert np.array_equal(img.pixels, u8.astype(np.float32))
    assert img.modality is None and img.dicom is None and img.spacing_mm is None


def test_png_16bit_is_stretched_to_grey(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    stored = (ircadb.hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16)
    img = decode(make.png(stored))
    assert 0.0 <= img.pixels.min() and img.pixels.max() <= 255.0
    assert img.pixels.max() - img.pixels.min() > 200
    # order kept: brighter stored values stay brighter
    assert img.pixels[stored > 1200].mean() > img.pixels[stored < 200].mean()


def test_grey_stored_as_rgb_is_not_colour(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    u8 = make.window(ircadb.hu)
    img = decode(make.png(np.dstack([u8, u8, u8])))
    assert img.was_color is False
    assert np.abs(img.pixels - u8).max() <= 1


def test_colour_needs_allow_color(read) -> None:  # type: ignore[no-untyped-def]
    data = read("negatives/skimage/astronaut.png")
    assert _code(decode, data) == "not_grayscale"
    img = decode(data, allow_color=True)
    assert img.was_color is True and img.pixels.ndim == 2


def test_jpeg_grey_round_trip(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    u8 = make.window(ircadb.hu, 350, 40)
    img = decode(make.jpeg(u8, 95))
    assert img.format == "jpeg" and img.pixels.shape == (512, 512)
    assert float(np.abs(img.pixels - u8).mean()) < 2.0


def test_dicom_ct_gives_hu_spacing_and_phi_free_summary(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    img = decode(make.dicom(make.ct_dataset(ircadb.hu)))
    expected = np.clip(ircadb.hu.astype(np.int32) + 1024, 0, 4095) - 1024
    assert img.is_hu and img.modality == "CT" and img.format == "dicom"
    assert np.array_equal(img.pixels, expected.astype(np.float32))
    assert img.spacing_mm == (0.78, 0.78)
    assert img.dicom is not None and img.dicom["transfer_syntax"] == "1.2.840.10008.1.2.1"
    assert img.dicom["study_uid"].startswith("2.25.")


@pytest.mark.parametrize(
    "ts", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"], ids=["rle", "jpeg2000-lossless"]
)
def test_dicom_compressed_transfer_syntaxes_decode(make: SimpleNamespace, ircadb, ts: str) -> None:  # type: ignore[no-untyped-def]
    plain = decode(make.dicom(make.ct_dataset(ircadb.hu)))
    img = decode(make.dicom(make.ct_dataset(ircadb.hu, transfer_syntax=ts)))
    assert img.dicom is not None and img.dicom["transfer_syntax"] == ts
    assert np.array_equal(img.pixels, plain.pixels)


def test_dicom_jpeg_baseline_decodes(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    u8 = make.window(ircadb.hu)
    ds = make.ct_dataset(None, RescaleSlope=400 / 255, RescaleIntercept=-150)
    ds.Rows, ds.Columns = u8.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([make.jpeg(u8, 95)])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    img = decode(make.dicom(ds))
    assert img.is_hu
    assert float(np.abs(img.pixels - (u8 * (400 / 255) - 150)).mean()) < 4.0


def test_jpeg_ls_has_a_decoder() -> None:
    ds = SimpleNamespace(file_meta={"TransferSyntaxUID": "1.2.840.10008.1.2.4.80"})
    assert decoding.check_transfer_syntax(ds) == "1.2.840.10008.1.2.4.80"  # type: ignore[arg-type]


def test_dicom_without_decoder_is_unsupported_transfer_syntax(
    make: SimpleNamespace, ircadb
) -> None:  # type: ignore[no-untyped-def]
    from pydicom.encaps import encapsulate

    ds = make.ct_dataset(ircadb.hu)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 64])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2
    assert _code(decode, make.dicom(ds)) == "unsupported_transfer_syntax"


def test_real_dicom_ct_is_turned_to_radiological_view(read) -> None:  # type: ignore[no-untyped-def]
    # This file is stored with the column direction reversed (spine at the top).
    img = decode(read("pydicom_abdomen/ct_upper_abdomen__explicit_VR-UN.dcm"))
    bone_rows = np.nonzero(img.pixels > 300)[0]
    body_rows = np.nonzero(img.pixels > -300)[0]
    assert bone_rows.mean() > body_rows.mean()  # spine below the body's centre
    assert img.spacing_mm == (0.859375, 0.859375)


def test_real_dicom_series_jpeg2000(data_dir) -> None:  # type: ignore[no-untyped-def]
    first = sorted((data_dir / "totalsegmentator" / "example_ct_dicom").iterdir())[10]
    img = decode(first.read_bytes())
    assert img.is_hu and img.modality == "CT" and img.pixels.shape == (512, 512)
    assert -1100 <= float(np.median(img.pixels)) <= 400


def test_real_mr_keeps_raw_values(read) -> None:  # type: ignore[no-untyped-def]
    img = decode(read("pydicom_abdomen/mr_abdomen_liver_lesion__MR-SIEMENS-DICOM-WithOverlays.dcm"))
    assert img.modality == "MR" and not img.is_hu
    assert img.pixels.max() > 255  # raw MR intensities, windowed later by percentiles


def test_multi_frame_is_rejected(read) -> None:  # type: ignore[no-untyped-def]
    assert (
        _code(decode, read("negatives/pydicom/ct_enhanced_brain__eCT_Supplemental.dcm"))
        == "multi_frame"
    )


def test_dicom_without_pixel_data(make: SimpleNamespace) -> None:
    assert _code(decode, make.dicom(make.ct_dataset(None))) == "no_pixel_data"


def test_empty_and_unknown_formats() -> None:
    assert _code(decode, b"") == "empty_file"
    assert _code(decode, b"GIF89a" + b"\0" * 100) == "unsupported_format"


def test_truncated_files_are_undecodable(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    u8 = make.window(ircadb.hu)
    for data in (make.png(u8), make.jpeg(u8), make.dicom(make.ct_dataset(ircadb.hu))):
        assert _code(decode, data[: len(data) // 2]) == "undecodable"


def test_bomb_header_is_refused_before_allocation() -> None:
    bomb = _png_claiming(100_000, 100_000)
    tracemalloc.start()
    try:
        code = _code(decode, bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert code == "pixel_limit"
    assert peak < 1_000_000  # 10^10 pixels announced, well under a megabyte touched


def test_nifti_volume_slices_in_radiological_view(data_dir) -> None:  # type: ignore[no-untyped-def]
    import nibabel as nib

    slices = list(decode_volume(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"))
    assert len(slices) == 30
    first = slices[0]
    assert (first.format, first.is_hu, first.spacing_mm) == ("nifti", True, (3.0, 3.0))
    liver = nib.as_closest_canonical(
        nib.load(data_dir / "totalsegmentator/example_seg_fast/liver.nii.gz")
    )
    mask = np.asanyarray(liver.dataobj)
    k = int(np.argmax(mask.sum(axis=(0, 1))))
    ys, xs = np.nonzero(mask[::-1, ::-1, k].T)
    assert xs.mean() < slices[k].width / 2  # the liver on the image's left (patient's right)
    assert float(slices[k].pixels[ys, xs].mean()) > 0  # liver tissue in HU


def test_corrupt_nifti_is_undecodable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(MLCoreError) as info:
        list(decode_volume(path))
    assert info.value.code == "undecodable"
