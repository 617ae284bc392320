"""DICOM outputs of a DICOM upload: a Secondary Capture of the overlay and a Basic Text SR,
read back with pydicom, in the source study (de-identified consistently), free of PHI."""

from __future__ import annotations

import io

import pydicom
from pydicom.uid import BasicTextSRStorage, CTImageStorage, SecondaryCaptureImageStorage

from ml_core.deid import remap_uid
from tests.reports.conftest import PHI, SERIES_UID, SOP_UID, STUDY_UID, Stack


def _codes(seq: pydicom.Sequence) -> tuple[str, str]:
    (code,) = seq
    return str(code.CodingSchemeDesignator), str(code.CodeValue)


def test_dicom_upload_gets_an_overlay_capture_and_a_text_sr(
    stack: Stack, liver_dicom: bytes
) -> None:
    """Both files reference the de-identified source study/series/image, carry the finding, and no PHI."""
    headers = stack.account()
    job = stack.process(headers, liver_dicom, "slice.dcm")
    assert job["status"] == "succeeded", job
    assert job["input"]["format"] == "dicom"
    result = job["result"]
    sc_bytes = stack.download(f"/api/v1/jobs/{job['id']}/dicom/overlay", headers)
    sr_bytes = stack.download(f"/api/v1/jobs/{job['id']}/dicom/sr", headers)

    for raw in (sc_bytes, sr_bytes):
        for secret in (*PHI.values(), STUDY_UID, SERIES_UID, SOP_UID):
            assert secret.encode() not in raw, secret
    study, series, source = remap_uid(STUDY_UID), remap_uid(SERIES_UID), remap_uid(SOP_UID)

    sc = pydicom.dcmread(io.BytesIO(sc_bytes))
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == study  # filed into the source study in the PACS
    assert sc.SeriesInstanceUID not in (series, SERIES_UID)
    assert sc.SOPInstanceUID not in (source, SOP_UID)
    assert sc.file_meta.MediaStorageSOPInstanceUID == sc.SOPInstanceUID
    assert (
        sc.SourceImageSequence[0].ReferencedSOPClassUID,
        sc.SourceImageSequence[0].ReferencedSOPInstanceUID,
    ) == (CTImageStorage, source)
    assert sc.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert sc.PatientIdentityRemoved == "YES" and sc.PatientName == "" and sc.PatientID == ""
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("RGB", 3)
    pixels = sc.pixel_array
    assert pixels.shape == (512, 512, 3)
    assert (pixels[..., 0] != pixels[..., 2]).any()  # the colour heatmap is in there

    sr = pydicom.dcmread(io.BytesIO(sr_bytes))
    assert sr.SOPClassUID == BasicTextSRStorage and sr.Modality == "SR"
    assert sr.StudyInstanceUID == study
    assert sr.SeriesInstanceUID not in (series, sc.SeriesInstanceUID)
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert _codes(sr.ConceptNameCodeSequence) == ("LN", "18748-4")
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == study
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    assert (
        evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == source
    )

    items = list(sr.ContentSequence)
    (finding,) = [i for i in items if i.ValueType == "CODE"]
    assert _codes(finding.ConceptNameCodeSequence) == ("DCM", "121071")
    expected = "126851005" if result["label"] == "tumor" else "281900007"
    assert _codes(finding.ConceptCodeSequence) == ("SCT", expected)
    texts = {
        _codes(i.ConceptNameCodeSequence): str(i.TextValue) for i in items if i.ValueType == "TEXT"
    }
    assert float(texts[("99LIVERSCAN", "probability")]) == round(result["probability"], 4)
    assert float(texts[("99LIVERSCAN", "threshold")]) == round(result["threshold"], 4)
    assert texts[("DCM", "111001")] == result["model"]["name"]
    assert result["model"]["sha256"] in texts[("DCM", "111003")]
    assert "Decision support only" in texts[("DCM", "121106")]
    images = {
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items if i.ValueType == "IMAGE"
    }
    assert images == {source, sc.SOPInstanceUID}  # the source slice and the overlay capture
