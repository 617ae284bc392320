"""Fixtures for ml_core tests: real data from ../shared/data and builders of real files.

Builders write genuine PNG, JPEG and DICOM bytes (OpenCV, pydicom) from real CT slices so
that every reason code is exercised with a file of that kind. No TensorFlow here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

#: Identifying values written into generated DICOM files; none may survive de-identification.
PHI = {
    "PatientName": "Zzyzx^Quentavious^Q",
    "PatientID": "MRN-7734119",
    "PatientBirthDate": "19470312",
    "PatientAddress": "42 Wallaby Way, Sydney",
    "InstitutionName": "St Elsewhere Hospital",
    "InstitutionAddress": "1 Hospital Road, Springfield",
    "ReferringPhysicianName": "Dr^Nick^Riviera",
    "PerformingPhysicianName": "Hibbert^Julius",
    "OperatorsName": "Tech^Frink",
    "AccessionNumber": "ACC99887766",
    "StudyID": "STUDY-4455",
    "StudyDate": "20240117",
    "OtherPatientIDs": "OTHER-ID-5566",
    "PatientTelephoneNumbers": "+1-555-0199",
    "StationName": "CTSTATION-ROOM7",
}
#: Original UIDs of generated DICOM files; they must be remapped.
STUDY_UID = "1.2.826.0.1.3680043.8.498.111222333444555666"
SERIES_UID = "1.2.826.0.1.3680043.8.498.111222333444555667"
SOP_UID = "1.2.826.0.1.3680043.8.498.111222333444555668"


def png_bytes(img: np.ndarray) -> bytes:
    """Encode uint8/uint16 (H, W) or BGR (H, W, 3) as PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def jpeg_bytes(img: np.ndarray, quality: int = 92) -> bytes:
    """Encode uint8 (H, W) or BGR (H, W, 3) as JPEG bytes."""
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def window_u8(hu: np.ndarray, width: float = 400.0, level: float = 50.0) -> np.ndarray:
    """Window HU like a clinic's export (independent of ml_core's implementation)."""
    lo = level - width / 2.0
    return np.clip((hu.astype(np.float64) - lo) / width * 255.0, 0, 255).round().astype(np.uint8)


def ct_dataset(
    hu: np.ndarray | None,
    *,
    phi: bool = True,
    transfer_syntax: str | None = None,
    **header: Any,
) -> Any:
    """Build a single-frame CT pydicom Dataset from HU (H, W) (stored +1024, intercept -1024)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = SOP_UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "STELSEWHERE_CT"
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SOP_UID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = STUDY_UID + ".9"
    ds.Modality = "CT"
    ds.BodyPartExamined = "ABDOMEN"
    ds.StudyDescription = "CT abdomen liver"
    ds.SeriesDescription = "Portal venous 3mm"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.78, 0.78]
    ds.SliceThickness = 3.0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    if phi:
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.add_new(0x00091001, "LO", "private vendor note " + PHI["PatientName"])
        seq_item = Dataset()
        seq_item.ReferencedSOPInstanceUID = SOP_UID
        seq_item.PersonName = PHI["PatientName"]
        ds.ReferencedImageSequence = [seq_item]
    if hu is not None:
        stored = np.clip(np.asarray(hu, dtype=np.int32) + 1024, 0, 4095).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = stored.tobytes()
    for key, value in header.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    if transfer_syntax is not None and hu is not None:
        ds.compress(
            transfer_syntax, encoding_plugin="pylibjpeg" if "4.9" in transfer_syntax else ""
        )
    ds.is_little_endian = True
    ds.is_implicit_VR = False
    _ = pydicom  # imported for side effects of the pixel handlers
    return ds


def dicom_bytes(ds: Any) -> bytes:
    """Serialise a Dataset with preamble and file meta (a real .dcm file)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data folder, ../shared/data beside the repository (skip when absent)."""
    if not DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return DATA


@pytest.fixture(scope="session")
def ircadb(data_dir: Path) -> SimpleNamespace:
    """3Dircadb1.1: the slice with the largest liver (HU int16 (512, 512)) and its spacing."""
    with np.load(data_dir / "ircadb" / "3Dircadb1.1.npz") as z:
        liver = z["liver"]
        k = int(np.argmax(liver.reshape(liver.shape[0], -1).sum(axis=1)))
        hu = np.asarray(z["ct_hu"][k])
        above = np.asarray(z["ct_hu"][-1])  # the top of the volume, far above the liver
        spacing = tuple(float(s) for s in z["spacing_mm"])
    return SimpleNamespace(hu=hu, liver=np.asarray(liver[k]), index=k, spacing=spacing, above=above)


@pytest.fixture(scope="session")
def phi() -> SimpleNamespace:
    """The identifying values and original UIDs written into generated DICOM files."""
    return SimpleNamespace(
        values=dict(PHI),
        study_uid=STUDY_UID,
        series_uid=SERIES_UID,
        sop_uid=SOP_UID,
        secrets=[*PHI.values(), STUDY_UID, SERIES_UID, SOP_UID, "STELSEWHERE_CT"],
    )


@pytest.fixture(scope="session")
def make() -> SimpleNamespace:
    """Builders of real files: png, jpeg, window, ct_dataset, dicom."""
    return SimpleNamespace(
        png=png_bytes, jpeg=jpeg_bytes, window=window_u8, ct_dataset=ct_dataset, dicom=dicom_bytes
    )


@pytest.fixture()
def read(data_dir: Path) -> Callable[[str], bytes]:
    """Read a file of ../shared/data by its relative path."""

    def _read(rel: str) -> bytes:
        return (data_dir / rel).read_bytes()

    return _read


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print how many fuzz examples ran and how they ended (test_fuzz_validation.py)."""
    lines = getattr(config, "liverscan_fuzz_lines", None)
    if lines:
        terminalreporter.write_sep("-", "validator fuzzing")
        for line in lines:
            terminalreporter.write_line(line)
