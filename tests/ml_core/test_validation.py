"""Strict validation: every reason code with a real file of that kind; real liver slices pass."""

from __future__ import annotations

import json
import struct
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from ml_core.validation import ValidationLimits, validate


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _rejects(data: bytes, code: str, **kwargs) -> dict:  # type: ignore[no-untyped-def]
    report = validate(data, gate=None, **kwargs)
    out = report.to_dict()
    assert out["passed"] is False and out["reason_code"] == code, out
    failed = [c for c in out["checks"] if not c["passed"]]
    assert len(failed) == 1 and failed == out["checks"][-1:]  # the first failure stops the layers
    assert failed[0]["detail"]
    json.dumps(out)  # the job JSON is serialisable
    return out


def _passes_rules(data: bytes) -> dict:
    report = validate(data, gate=None)
    out = report.to_dict()
    assert out["passed"] is True and out["reason_code"] is None, out
    assert out["checks"][-1] == {
        "name": "content",
        "passed": True,
        "detail": "content gate not run (gate=None: rule layers only)",
    }
    assert out["gate"] is None
    assert report.slice_u8 is not None and report.slice_u8.dtype == np.uint8
    return out


# --- container layer ---------------------------------------------------------------------


def test_empty_file() -> None:
    _rejects(b"", "empty_file")


def test_too_large_file(make: SimpleNamespace) -> None:
    data = make.png(np.zeros((256, 256), np.uint8))
    oversize = data + b"\0" * (ValidationLimits().max_bytes - len(data) + 1)
    out = _rejects(oversize, "too_large")
    assert out["checks"][-1]["name"] == "file_size_limit"


@pytest.mark.parametrize("rel", ["negatives/skimage/no_time_for_that_tiny.gif"])
def test_unsupported_format_real_gif(read, rel: str) -> None:  # type: ignore[no-untyped-def]
    _rejects(read(rel), "unsupported_format")


def test_unsupported_format_ignores_claimed_type() -> None:
    # a PDF or a zip named scan.png is still not an image
    _rejects(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 10, "unsupported_format")
    _rejects(b"PK\x03\x04" + b"\0" * 300, "unsupported_format")


def test_nifti_is_not_an_upload_format(data_dir) -> None:  # type: ignore[no-untyped-def]
    _rejects(
        (data_dir / "totalsegmentator" / "example_ct_sm.nii.gz").read_bytes(), "unsupported_format"
    )


def test_truncated_and_corrupt_files_are_undecodable(make: SimpleNamespace, ircadb, read) -> None:  # type: ignore[no-untyped-def]
    u8 = make.window(ircadb.hu)
    png, jpeg = make.png(u8), make.jpeg(u8)
    _rejects(png[: len(png) * 2 // 3], "undecodable")
    _rejects(jpeg[: len(jpeg) * 2 // 3], "undecodable")
    corrupt = bytearray(png)
    corrupt[len(png) // 2 : len(png) // 2 + 64] = b"\xff" * 64  # CRC and zlib break
    _rejects(bytes(corrupt), "undecodable")
    real = read("pydicom_abdomen/ct_upper_abdomen__explicit_VR-UN.dcm")
    _rejects(real[: len(real) // 2], "undecodable")


def test_decompression_bomb_header() -> None:
    out = _rejects(_png_claiming(100_000, 100_000), "pixel_limit")
    assert "10000000000" in out["checks"][-1]["detail"]


# --- geometry and signal -------------------------------------------------------------------


def test_one_pixel_png_is_too_small(make: SimpleNamespace) -> None:
    _rejects(make.png(np.full((1, 1), 128, np.uint8)), "too_small")


def test_real_small_image_is_too_small(read) -> None:  # type: ignore[no-untyped-def]
    _rejects(read("negatives/skimage/microaneurysms.png"), "too_small")  # 102x102


def test_strip_is_bad_aspect(make: SimpleNamespace, read) -> None:  # type: ignore[no-untyped-def]
    _rejects(
        make.png(np.random.default_rng(0).integers(0, 255, (20, 5000), dtype=np.uint8)),
        "bad_aspect",
    )
    _rejects(read("negatives/skimage/text.png"), "bad_aspect")


def test_huge_dimensions(make: SimpleNamespace) -> None:
    out = _rejects(make.png(np.zeros((4000, 4100), np.uint8)), "too_large_dims")
    assert "4100x4000" in out["checks"][-1]["detail"]


def test_constant_image_is_blank(make: SimpleNamespace) -> None:
    _rejects(make.png(np.full((512, 512), 37, np.uint8)), "blank_image")
    _rejects(make.jpeg(np.full((512, 512), 200, np.uint8)), "blank_image")


def test_washed_out_export_is_low_dynamic_range(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    washed = (make.window(ircadb.hu).astype(np.float32) * 0.1 + 110).astype(np.uint8)
    _rejects(make.png(washed), "low_dynamic_range")


@pytest.mark.parametrize(
    "rel",
    [
        "negatives/skimage/astronaut.png",
        "negatives/skimage/coffee.png",
        "negatives/skimage/rocket.jpg",
        "negatives/skimage/retina.jpg",
        "negatives/wsidicom/test_tile.png",
    ],
)
def test_colour_photos_are_not_grayscale(read, rel: str) -> None:  # type: ignore[no-untyped-def]
    _rejects(read(rel), "not_grayscale")


def test_viewer_screenshot_with_colour_overlay_is_not_grayscale(
    make: SimpleNamespace, ircadb
) -> None:  # type: ignore[no-untyped-def]
    u8 = make.window(ircadb.hu)
    shot = cv2.cvtColor(u8, cv2.COLOR_GRAY2BGR)
    cv2.circle(shot, (180, 230), 40, (0, 0, 255), 2)  # a red ROI
    cv2.putText(shot, "ROI 1: 54 HU", (20, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 255), 1)
    for data in (make.png(shot), make.jpeg(shot, 90)):
        out = _rejects(data, "not_grayscale")
        assert "overlay" in out["checks"][-1]["detail"]


def test_grey_slice_saved_as_rgb_is_accepted(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    u8 = make.window(ircadb.hu)
    _passes_rules(make.png(np.dstack([u8, u8, u8])))
    _passes_rules(make.jpeg(np.dstack([u8, u8, u8]), 90))


# --- DICOM header ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel",
    [
        "negatives/pydicom/cr_chest_xray__RG1_UNCR.dcm",
        "negatives/pydicom/cr_extremity_xray__RG3_UNCR.dcm",
        "negatives/pydicom/us_generic__US1_UNCR.dcm",
        "negatives/pydicom/us_echo_color__color-px.dcm",
        "negatives/pydicom/us_obstetric__OBXXXX1A.dcm",
        "negatives/pydicom/nm_bone_scan__JPEG2000_UNC.dcm",
        "negatives/pydicom/ot_face_photo__OT-PAL-8-face.dcm",
    ],
)
def test_real_non_ct_mr_modalities(read, rel: str) -> None:  # type: ignore[no-untyped-def]
    _rejects(read(rel), "unsupported_modality")


def test_segmentation_object_is_unsupported_modality(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    _rejects(make.dicom(make.ct_dataset(ircadb.hu, Modality="SEG")), "unsupported_modality")


@pytest.mark.parametrize(
    "rel",
    [
        "negatives/pydicom/ct_head_j2k__J2K_pixelrep_mismatch.dcm",
        "negatives/pydicom/ct_neck__bad_sequence.dcm",
        "negatives/pydicom/mr_head_emri__emri_small.dcm",
        "negatives/pydicom/mr_shoulder__MR2_UNCR.dcm",
    ],
)
def test_real_head_neck_and_extremity_scans(read, rel: str) -> None:  # type: ignore[no-untyped-def]
    _rejects(read(rel), "wrong_body_part")


@pytest.mark.parametrize(
    "header",
    [
        {
            "BodyPartExamined": "CHEST",
            "StudyDescription": "CT Thorax",
            "SeriesDescription": "Lung 1mm",
        },
        {"BodyPartExamined": None, "StudyDescription": "CT HEAD W/O", "SeriesDescription": None},
        {"BodyPartExamined": "KNEE", "StudyDescription": None, "SeriesDescription": None},
    ],
)
def test_body_part_words_rule_out(make: SimpleNamespace, ircadb, header: dict) -> None:  # type: ignore[no-untyped-def]
    out = _rejects(make.dicom(make.ct_dataset(ircadb.hu, **header)), "wrong_body_part")
    assert "header names" in out["checks"][-1]["detail"]


@pytest.mark.parametrize(
    "header",
    [
        {"BodyPartExamined": "CHEST", "StudyDescription": "CT Chest/Abdomen/Pelvis"},
        {"BodyPartExamined": None, "StudyDescription": "Trauma neck chest abdomen pelvis"},
        {"BodyPartExamined": "ABDOMEN", "SeriesDescription": "CTA abdomen leg runoff"},
    ],
)
def test_regions_that_include_the_abdomen_are_not_ruled_out(
    make: SimpleNamespace, ircadb, header: dict
) -> None:  # type: ignore[no-untyped-def]
    _passes_rules(make.dicom(make.ct_dataset(ircadb.hu, **header)))


def test_localizer_is_unsupported_image_type(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    _rejects(
        make.dicom(make.ct_dataset(ircadb.hu, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])),
        "unsupported_image_type",
    )


def test_coronal_reformat_is_not_axial(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    _rejects(
        make.dicom(make.ct_dataset(ircadb.hu, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])),
        "not_axial",
    )


def test_burned_in_annotation_is_refused(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    _rejects(
        make.dicom(make.ct_dataset(ircadb.hu, BurnedInAnnotation="YES")), "burned_in_annotation"
    )


def test_dicom_without_pixel_data(make: SimpleNamespace) -> None:
    _rejects(make.dicom(make.ct_dataset(None, Rows=512, Columns=512)), "no_pixel_data")


def test_multi_frame_real_file(read) -> None:  # type: ignore[no-untyped-def]
    _rejects(read("negatives/pydicom/ct_enhanced_brain__eCT_Supplemental.dcm"), "multi_frame")


def test_rgb_ct_is_not_grayscale(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    u8 = make.window(ircadb.hu)
    ds = make.ct_dataset(None)
    ds.Rows, ds.Columns = u8.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.dstack([u8, u8, u8]).tobytes()
    _rejects(make.dicom(ds), "not_grayscale")


def test_mpeg_transfer_syntax_is_unsupported(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    from pydicom.encaps import encapsulate

    ds = make.ct_dataset(ircadb.hu)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\0" * 64])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    _rejects(make.dicom(ds), "unsupported_transfer_syntax")


def test_wrong_rescale_is_implausible_hu(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    out = _rejects(make.dicom(make.ct_dataset(ircadb.hu, RescaleIntercept=1500)), "implausible_hu")
    assert "median" in out["checks"][-1]["detail"]


# --- real liver slices pass the rule layers in every format ---------------------------------


@pytest.mark.parametrize("width,level", [(350, 40), (400, 50), (400, 60), (350, 60)])
def test_real_liver_slice_png_and_jpeg_pass(
    make: SimpleNamespace, ircadb, width: int, level: int
) -> None:  # type: ignore[no-untyped-def]
    u8 = make.window(ircadb.hu, width, level)
    _passes_rules(make.png(u8))
    _passes_rules(make.jpeg(u8, 85))


def test_real_liver_slice_dicom_passes(make: SimpleNamespace, ircadb, read, data_dir) -> None:  # type: ignore[no-untyped-def]
    out = _passes_rules(
        make.dicom(make.ct_dataset(ircadb.hu, transfer_syntax="1.2.840.10008.1.2.4.90"))
    )
    names = [c["name"] for c in out["checks"]]
    assert names[:4] == ["file_size", "file_size_limit", "format", "header"]
    assert {"dicom_modality", "dicom_body_part", "hu_range", "grayscale", "not_blank"} <= set(names)
    _passes_rules(read("pydicom_abdomen/ct_upper_abdomen__explicit_VR-UN.dcm"))
    _passes_rules(
        read("pydicom_abdomen/mr_abdomen_liver_lesion__MR-SIEMENS-DICOM-WithOverlays.dcm")
    )
    for path in sorted((data_dir / "totalsegmentator" / "example_ct_dicom").iterdir())[::6]:
        _passes_rules(path.read_bytes())


def test_real_8bit_slices_from_other_sites_pass(make: SimpleNamespace, data_dir) -> None:  # type: ignore[no-untyped-def]
    for name in sorted(p.name for p in (data_dir / "slices_8bit").glob("*.npz"))[::8]:
        with np.load(data_dir / "slices_8bit" / name) as z:
            _passes_rules(make.png(np.asarray(z["img_u8"][0])))
    for path in sorted((data_dir / "msd_liver_slices" / "images").iterdir())[:5]:
        _passes_rules(path.read_bytes())


@pytest.mark.parametrize(
    "rel",
    [
        "negatives/skimage/camera.png",
        "negatives/skimage/moon.png",
        "negatives/nilearn/mni152_t1_axial.png",
    ],
)
def test_grey_photos_pass_the_rules_and_are_left_to_the_gate(read, rel: str) -> None:  # type: ignore[no-untyped-def]
    _passes_rules(read(rel))


# --- content layer --------------------------------------------------------------------------


class _ConstantGate:
    """A ContentGate that scores every slice the same (the real gate needs TensorFlow)."""

    def __init__(self, value: float, threshold: float = 0.5) -> None:
        self.value, self.threshold, self.calls = value, threshold, 0

    def score(self, slices_u8: list[np.ndarray]) -> list[float]:
        self.calls += 1
        assert all(s.dtype == np.uint8 and s.ndim == 2 for s in slices_u8)
        return [self.value] * len(slices_u8)


def test_gate_rejection_is_not_liver_ct_with_score(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    report = validate(make.png(make.window(ircadb.above)), gate=_ConstantGate(0.12, 0.6))
    out = report.to_dict()
    assert out["reason_code"] == "not_liver_ct" and out["passed"] is False
    assert out["gate"] == {"score": pytest.approx(0.12), "threshold": pytest.approx(0.6)}
    assert out["checks"][-1]["name"] == "content" and "0.120" in out["checks"][-1]["detail"]


def test_gate_acceptance_reports_score(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    report = validate(make.png(make.window(ircadb.hu)), gate=_ConstantGate(0.97, 0.6))
    assert report.passed and report.gate_score == pytest.approx(0.97)
    assert report.to_dict()["gate"]["threshold"] == pytest.approx(0.6)


def test_gate_is_not_called_after_a_rule_failure(read) -> None:  # type: ignore[no-untyped-def]
    gate = _ConstantGate(0.99)
    report = validate(read("negatives/skimage/astronaut.png"), gate=gate)
    assert report.reason_code == "not_grayscale" and gate.calls == 0 and report.gate_score is None


def test_validate_image_on_volume_slices(data_dir) -> None:  # type: ignore[no-untyped-def]
    from ml_core.decoding import decode_volume
    from ml_core.validation import validate_image

    slices = list(decode_volume(data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"))
    report = validate_image(slices[15], gate=None)
    assert report.reason_code == "too_small"  # 122x101 px at 3 mm
    loose = ValidationLimits(min_side=64)
    report = validate_image(slices[15], gate=_ConstantGate(0.9), limits=loose)
    assert report.passed and report.gate_score == pytest.approx(0.9)
    assert [c.name for c in report.checks][:3] == [
        "aspect_ratio",
        "min_dimensions",
        "max_dimensions",
    ]
