"""No value identifying a patient, a visit or a site in a DICOM upload reaches anything the service
stores or logs beyond the upload itself: a real CT file (pydicom's abdomen slice) with a fake
patient written into the attributes PS3.15's basic profile names (nested sequences, private tags,
dates, UIDs, the file meta too) goes through the real API and worker pipeline, and every stored
object, every database row, the job JSON, the reports and the captured logs are searched."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pypdf import PdfReader
from sqlalchemy import MetaData, create_engine, select

from ml_core.deid import remap_uid
from tests.reports.conftest import DATA, Stack

SOURCE = DATA / "pydicom_abdomen" / "ct_upper_abdomen__explicit_VR-UN.dcm"

#: The fake patient, visit and site: long enough never to occur by chance in PNG or PDF bytes.
FAKE = {
    "PatientName": "Quixlebottom^Marguerite",
    "PatientID": "QX-MRN-55107",
    "PatientBirthDate": "19420213",
    "PatientComments": "Quixlebottom prefers morning slots",
    "InstitutionName": "Quixlebottom Memorial",
    "InstitutionAddress": "12 Quixlebottom Lane",
    "ReferringPhysicianName": "Drquixle^Referrer",
    "PerformingPhysicianName": "Drquixle^Performer",
    "OperatorsName": "Techquixle^Operator",
    "AccessionNumber": "QX-ACC-90817",
    "StudyID": "QX-STUDY-4471",
    "StudyDate": "19990214",
    "SeriesDate": "19990214",
    "AcquisitionDate": "19990214",
    "ContentDate": "19990214",
    "StudyDescription": "CT liver Quixlebottom",
    "SeriesDescription": "portal Quixlebottom",
    "ProtocolName": "Quixlebottom protocol",
    "StationName": "QX-STATION-7",
    "ScheduledProcedureStepDescription": "Quixlebottom liver follow-up",
    "AcquisitionProtocolDescription": "Quixlebottom dose plan",
}
#: Values written in nested sequences, private tags and the file meta.
NESTED = [
    "QX-OTHER-ID-31",
    "QX-REQ-PROC-88",
    "QX-ACC-NESTED-5",
    "Quixlebottom private note",
    "Quixlebottom said the pain",
    "QXSOURCEAE",
    "QXSENDINGAE",
    "QX-PRIVATE-INFO",
]
REFERENCED_PATIENT_UID = "1.2.826.0.1.3680043.8.498.7770155"


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def phi_upload(**overrides: Any) -> tuple[bytes, list[str]]:
    """The real CT slice with the fake patient everywhere; the bytes and every value to look for."""
    ds = pydicom.dcmread(SOURCE)
    for keyword, value in {**FAKE, **overrides}.items():
        setattr(ds, keyword, value)
    ds.OtherPatientIDsSequence = [_item(PatientID="QX-OTHER-ID-31", IssuerOfPatientID="QXISSUER")]
    ds.ReferencedPatientSequence = [
        _item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=REFERENCED_PATIENT_UID)
    ]
    ds.RequestAttributesSequence = [
        _item(
            RequestedProcedureID="QX-REQ-PROC-88",
            AccessionNumber="QX-ACC-NESTED-5",
            ScheduledProcedureStepDescription="Quixlebottom liver",
        )
    ]
    ds.add_new(0x00291010, "LO", "Quixlebottom private note")
    ds.ContentSequence = [_item(ValueType="TEXT", TextValue="Quixlebottom said the pain")]
    ds.file_meta.SourceApplicationEntityTitle = "QXSOURCEAE"
    ds.file_meta.SendingApplicationEntityTitle = "QXSENDINGAE"
    ds.file_meta.PrivateInformationCreatorUID = "1.2.826.0.1.3680043.8.498.7770156"
    ds.file_meta.PrivateInformation = b"QX-PRIVATE-INFO!"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    originals = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)]
    secrets = [*FAKE.values(), *overrides.values(), *NESTED, REFERENCED_PATIENT_UID, *originals]
    for name in ("Quixlebottom", "QUIXLEBOTTOM", "Marguerite", "MARGUERITE", "Drquixle"):
        secrets.append(name)
    return buf.getvalue(), sorted({str(s) for s in secrets})


def _found(secrets: list[str], where: str, blob: str | bytes) -> list[str]:
    text = blob.decode("latin-1") if isinstance(blob, bytes) else blob
    return [f"{where}: {secret}" for secret in secrets if secret in text]


def _readable(name: str, data: bytes) -> str:
    """The bytes as latin-1, plus what a PDF or DICOM file holds in compressed or parsed form."""
    text = data.decode("latin-1")
    if data.startswith(b"%PDF"):
        text += "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)
    if name.endswith(".dcm"):
        text += str(pydicom.dcmread(io.BytesIO(data)))
    return text


@pytest.mark.parametrize("stack", ["local"], indirect=True)
def test_no_phi_of_a_dicom_upload_is_stored_shown_or_logged(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = stack.account()
    # The same patient twice: a slice that is classified, and one the validator rejects whose
    # code-like header values (Modality, BurnedInAnnotation) carry the name.
    accepted, secrets = phi_upload(BurnedInAnnotation="QUIXLEBOTTOM MG")
    refused, more = phi_upload(
        Modality="QUIXLEBOTTOM", SOPInstanceUID="1.2.826.0.1.3680043.8.498.77702"
    )
    secrets = sorted({*secrets, *more})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = stack.process(headers, accepted, "slice.dcm")
        rejected = stack.process(headers, refused, "other.dcm")
        assert job["status"] == "succeeded", job
        assert rejected["status"] == "rejected", rejected
        assert rejected["validation"]["reason_code"] == "unsupported_modality"

        leaks: list[str] = []
        leaks += _found(secrets, "job JSON", json.dumps(job))
        leaks += _found(secrets, "rejected job JSON", json.dumps(rejected))
        listing = stack.client.get("/api/v1/jobs", headers=headers).get_json()
        leaks += _found(secrets, "job list", json.dumps(listing))
        result = job["result"]
        urls = {
            "heatmap.png": result["heatmap_url"],
            "overlay.png": result["overlay_url"],
            "report.pdf": result["report_url"],
            "overlay_sc.dcm": f"/api/v1/jobs/{job['id']}/dicom/overlay",
            "sr.dcm": f"/api/v1/jobs/{job['id']}/dicom/sr",
        }
        downloaded = {name: stack.download(url, headers) for name, url in urls.items()}
        for name, data in downloaded.items():
            leaks += _found(secrets, name, _readable(name, data))
        fhir = stack.client.get(f"/api/v1/jobs/{job['id']}/fhir", headers=headers)
        assert fhir.status_code == 200
        leaks += _found(secrets, "FHIR", fhir.get_data(as_text=True))
        token = headers["Authorization"].removeprefix("Bearer ")
        stack.client.set_cookie("access_token_cookie", token)  # what the web login sets
        for shown in (job, rejected):
            page = stack.client.get(f"/jobs/{shown['id']}")
            assert page.status_code == 200
            leaks += _found(secrets, "job page", page.get_data(as_text=True))

    # Every object in the store but the two uploads themselves (kept as sent, for audit).
    uploads = {accepted, refused}
    store = Path(stack.ctx.settings.storage_dir)
    stored = [p for p in store.rglob("*") if p.is_file() and p.read_bytes() not in uploads]
    assert {p.name for p in stored} >= {"heatmap.png", "overlay.png", "report.pdf", "sr.dcm"}
    for path in stored:
        leaks += _found(secrets, f"store {path.name}", _readable(path.name, path.read_bytes()))

    # Every row of every table (the database holds these tests' jobs only).
    engine = create_engine(stack.ctx.settings.database_url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                rows = conn.execute(select(table)).all()
                leaks += _found(secrets, f"table {table.name}", repr(rows))
    finally:
        engine.dispose()

    leaks += _found(secrets, "logs", caplog.text)
    leaks += _found(secrets, "log arguments", repr([r.args for r in caplog.records]))
    leaks += _found(secrets, "warnings", " ".join(str(w.message) for w in caught))
    assert leaks == [], "\n".join(leaks)

    # UIDs are replaced consistently: the outputs sit in the remapped source study.
    sc = pydicom.dcmread(io.BytesIO(downloaded["overlay_sc.dcm"]))
    source = pydicom.dcmread(io.BytesIO(accepted), stop_before_pixels=True)
    assert sc.StudyInstanceUID == remap_uid(str(source.StudyInstanceUID))
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == remap_uid(
        str(source.SOPInstanceUID)
    )
