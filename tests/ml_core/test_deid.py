"""De-identification: no PHI from a DICOM upload reaches anything the service keeps or logs."""

from __future__ import annotations

import io
import json
import logging
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from ml_core.decoding import decode
from ml_core.deid import deidentify, remap_uid
from ml_core.overlay import encode_png, heatmap_png, overlay_png
from ml_core.validation import validate

SECRETS: list[str] = []


@pytest.fixture(autouse=True)
def _secrets(phi: SimpleNamespace) -> None:
    SECRETS[:] = phi.secrets


def _leaks(text: str | bytes) -> list[str]:
    """Return every PHI value (or its DICOM-encoded form) found in ``text``."""
    assert SECRETS
    haystack = text.decode("latin-1") if isinstance(text, bytes) else text
    found = []
    for secret in SECRETS:
        variants = {secret, secret.replace("^", " "), *secret.split("^")} - {"", "Dr", "Q"}
        found += [v for v in variants if len(v) >= 4 and v in haystack]
    return found


@pytest.fixture()
def dataset(make: SimpleNamespace, ircadb) -> pydicom.Dataset:  # type: ignore[no-untyped-def]
    return make.ct_dataset(ircadb.hu)


def test_deidentified_dataset_holds_no_phi(
    dataset: pydicom.Dataset, make: SimpleNamespace, phi: SimpleNamespace
) -> None:
    assert _leaks(make.dicom(dataset))  # the upload itself does carry PHI
    clean = deidentify(dataset)
    saved = make.dicom(clean)
    assert _leaks(saved) == []
    assert _leaks(str(clean)) == []
    assert clean.PatientIdentityRemoved == "YES"
    assert clean.PatientName == "" and clean.PatientID == "" and clean.StudyDate == ""
    assert "InstitutionName" not in clean and "OtherPatientIDs" not in clean
    assert all(not elem.tag.is_private for elem in clean.iterall())
    assert dataset.PatientName == phi.values["PatientName"]  # the input is left unchanged


def test_uids_are_remapped_consistently(dataset: pydicom.Dataset, phi: SimpleNamespace) -> None:
    clean = deidentify(dataset)
    assert clean.StudyInstanceUID == remap_uid(phi.study_uid) != phi.study_uid
    assert clean.SOPInstanceUID == clean.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
    assert clean.SOPClassUID == dataset.SOPClassUID  # standard class UIDs are not PHI
    again = deidentify(dataset)
    assert again.SeriesInstanceUID == clean.SeriesInstanceUID  # deterministic across uploads
    assert len(clean.StudyInstanceUID) <= 64 and pydicom.uid.UID(clean.StudyInstanceUID).is_valid


def test_deidentified_file_still_decodes_to_the_same_pixels(
    dataset: pydicom.Dataset, make: SimpleNamespace
) -> None:
    before = decode(make.dicom(dataset))
    after = decode(make.dicom(deidentify(dataset)))
    assert np.array_equal(before.pixels, after.pixels)


def test_real_file_patient_name_removed(read) -> None:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(io.BytesIO(read("pydicom_abdomen/ct_upper_abdomen__explicit_VR-UN.dcm")))
    assert "PANCREAS_0001" in str(ds.PatientName)
    buf = io.BytesIO()
    deidentify(ds).save_as(buf)
    assert b"PANCREAS_0001" not in buf.getvalue()


def test_no_phi_in_decoded_result_report_overlays_or_logs(
    dataset: pydicom.Dataset, make: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    data = make.dicom(dataset)
    report = validate(data, gate=None)
    assert report.passed, report.to_dict()
    assert report.image is not None and report.slice_u8 is not None
    assert _leaks(repr(report.image.dicom)) == []
    assert _leaks(json.dumps(report.image.dicom)) == []
    assert _leaks(json.dumps(report.to_dict())) == []
    heat = np.zeros(report.slice_u8.shape, np.float32)
    for png in (encode_png(report.slice_u8), overlay_png(report.slice_u8, heat), heatmap_png(heat)):
        assert _leaks(png) == []
    # a rejected upload's report and logs are clean too
    rejected = validate(make.dicom(make.ct_dataset(None)), gate=None)
    assert rejected.reason_code == "no_pixel_data"
    assert _leaks(json.dumps(rejected.to_dict())) == []
    assert _leaks(caplog.text) == []
    assert _leaks(" ".join(str(r.args) for r in caplog.records)) == []


def test_malformed_values_are_not_echoed_into_warnings_or_logs(
    make: SimpleNamespace,
    ircadb,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    import warnings

    ds = make.ct_dataset(ircadb.hu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.StudyInstanceUID = "Zzyzx.Quentavious.MRN-7734119"  # not a valid UID: pydicom complains
        data = make.dicom(ds)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = validate(data, gate=None)
    assert report.passed
    assert _leaks(" ".join(str(w.message) for w in caught)) == []
    assert _leaks(caplog.text) == []
    assert _leaks(json.dumps(report.image.dicom if report.image else None)) == []


# --- audit: the whole basic profile, and nothing of a header's free text in a check's detail ---

QX = "Quixlebottom^Marguerite"


def _real_ct(read) -> pydicom.Dataset:  # type: ignore[no-untyped-def]
    return pydicom.dcmread(io.BytesIO(read("pydicom_abdomen/ct_upper_abdomen__explicit_VR-UN.dcm")))


def _item(**values: object) -> pydicom.Dataset:
    item = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def make_bytes(ds: pydicom.Dataset) -> bytes:
    """A dataset as a Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_every_attribute_the_basic_profile_names_is_removed(read) -> None:  # type: ignore[no-untyped-def]
    """Attributes of PS3.15 table E.1-1 that the first list missed, at the top and nested."""
    ds = _real_ct(read)
    values = {
        "ScheduledProcedureStepDescription": "SPS for Quixlebottom",
        "ScheduledProcedureStepID": "QX-SPS-ID-1",
        "AcquisitionProtocolDescription": "Quixlebottom protocol text",
        "FillerOrderNumberImagingServiceRequest": "QX-FILLER-2",
        "PlacerOrderNumberImagingServiceRequest": "QX-PLACER-3",
        "DeviceDescription": "QX-DEVICE-DESC",
        "ClinicalTrialSponsorName": "QX-SPONSOR-4",
        "ClinicalTrialSubjectID": "QX-SUBJECT-5",
        "ContrastBolusAgent": "QX-CONTRAST-6",
        "PatientBirthDateInAlternativeCalendar": "QX-ALTCAL-7",
        "ReasonForVisit": "Quixlebottom felt unwell",
        "StationAETitle": "QXSTATIONAE",
        "RetrieveAETitle": "QXRETRIEVEAE",
        "ResultsID": "QX-RESULTS-8",
        "SpecimenAccessionNumber": "QX-SPECIMEN-9",
    }
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.ContentSequence = [_item(ValueType="TEXT", TextValue="Quixlebottom said the pain")]
    ds.AcquisitionContextSequence = [_item(TextValue="QX-CONTEXT-TEXT")]
    ds.AdmittingDiagnosesCodeSequence = [_item(CodeMeaning="QX-ADMIT-DIAGNOSIS")]
    ds.InstitutionalDepartmentTypeCodeSequence = [_item(CodeMeaning="QX-DEPARTMENT-TYPE")]
    ds.ReferencedStudySequence = [_item(ReferencedSOPInstanceUID="1.2.826.0.1.3680043.8.498.1")]
    ds.RequestAttributesSequence = [_item(ScheduledProcedureStepDescription="QX-NESTED-SPS")]
    ds.ProcedureCodeSequence = [_item(CodeValue="X1", CodingSchemeDesignator="99QX")]
    ds.ProcedureCodeSequence[0].ContentSequence = [_item(TextValue="QX-DEEP-CONTENT")]
    ds.file_meta.SendingApplicationEntityTitle = "QXSENDINGAE"
    ds.file_meta.ReceivingApplicationEntityTitle = "QXRECEIVINGAE"
    ds.file_meta.PrivateInformationCreatorUID = "1.2.826.0.1.3680043.8.498.2"
    ds.file_meta.PrivateInformation = b"QX-PRIVATE-INFO!"
    secrets = [
        *values.values(),
        "Quixlebottom",
        "QX-CONTEXT-TEXT",
        "QX-ADMIT-DIAGNOSIS",
        "QX-DEPARTMENT-TYPE",
        "QX-NESTED-SPS",
        "QX-DEEP-CONTENT",
        "QXSENDINGAE",
        "QXRECEIVINGAE",
        "QX-PRIVATE-INFO",
    ]
    clean = deidentify(ds)
    buf = io.BytesIO()
    clean.save_as(buf, enforce_file_format=True)
    text = buf.getvalue().decode("latin-1") + str(clean)
    assert [s for s in secrets if s in text] == []
    for keyword in (*values, "ContentSequence", "ReferencedStudySequence"):
        assert keyword not in clean, keyword
    assert "ProcedureCodeSequence" in clean  # kept by the profile; its nested text is not
    assert clean.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert np.array_equal(decode(buf.getvalue()).pixels, decode(make_bytes(ds)).pixels)


def test_an_element_that_does_not_parse_is_dropped_not_fatal(read) -> None:  # type: ignore[no-untyped-def]
    """A corrupt VR that the validator never reads used to stop de-identification (no report)."""
    raw = read("pydicom_abdomen/ct_upper_abdomen__explicit_VR-UN.dcm")
    bad = raw.replace(b"\x28\x00\x02\x01US", b"\x28\x00\x02\x01U\xa1")  # HighBit's VR
    assert bad != raw and validate(bad, gate=None).passed
    header = pydicom.dcmread(io.BytesIO(bad), stop_before_pixels=True, force=True)
    clean = deidentify(header)
    assert "HighBit" not in clean and clean.PatientName == "" and clean.PatientID == ""
    assert "PANCREAS_0001" not in str(clean)


def test_every_listed_keyword_is_a_dicom_keyword() -> None:
    """A misspelt keyword would be skipped silently and its attribute kept."""
    from pydicom.datadict import tag_for_keyword

    from ml_core.deid import EMPTIED, REMOVED

    assert [k for k in (*REMOVED, *EMPTIED) if tag_for_keyword(k) is None] == []


@pytest.mark.parametrize(
    ("keyword", "value", "reason_code", "check", "detail"),
    [
        ("Modality", "QUIXLEBOTTOM", "unsupported_modality", "dicom_modality",
         "Modality is not a DICOM modality code; allowed CT, MR"),
        ("Modality", "US", "unsupported_modality", "dicom_modality", "Modality US; allowed CT, MR"),
        ("Modality", QX, "unsupported_modality", "dicom_modality",
         "Modality is not a DICOM modality code; allowed CT, MR"),
        ("BurnedInAnnotation", "QUIXLEBOTTOM MG", None, "dicom_burned_in_annotation",
         "BurnedInAnnotation is neither YES nor NO"),
        ("PhotometricInterpretation", "QUIXLEBOTTOM MG", "not_grayscale", "dicom_photometric",
         "PhotometricInterpretation is not a DICOM defined term"),
        ("PhotometricInterpretation", "RGB", "not_grayscale", "dicom_photometric",
         "PhotometricInterpretation RGB"),
    ],
)  # fmt: skip
def test_a_check_detail_never_repeats_a_header_value_that_is_not_a_dicom_term(
    read,  # type: ignore[no-untyped-def]
    keyword: str,
    value: str,
    reason_code: str | None,
    check: str,
    detail: str,
) -> None:
    """Code-like header values (CS, 16 characters) can hold a name: details repeat defined terms only."""
    ds = _real_ct(read)
    setattr(ds, keyword, value)
    report = validate(make_bytes(ds), gate=None)
    assert report.reason_code == reason_code
    (found,) = [c for c in report.to_dict()["checks"] if c["name"] == check]
    assert found["detail"] == detail
    assert "QUIXLE" not in json.dumps(report.to_dict()).upper()
