"""Reports fixtures: the Flask app and the worker pipeline on one PostgreSQL database, with the
local store or an S3 endpoint over HTTP (moto), and a tiny real classifier in the model cache."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import requests
from flask import Flask
from flask.testing import FlaskClient

from api.app import create_app
from api.domain.settings import Settings
from api.domain.storage import S3Storage
from tests.e2e.e2e_support import fresh_postgres_database
from worker import model_cache, pipeline, reports
from worker.context import WorkerContext, set_context

DB_NAME = "liverscan_reports_tests"
REDIS_DB = 12  # a Redis database of these tests' own (api 14, worker 13)
BROKER_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
PASSWORD = "correct-horse-42"
DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

#: Identifying values written into the test DICOM upload; none may reach a report.
PHI = {
    "PatientName": "Doe^Janet",
    "PatientID": "MRN-7734201",
    "PatientBirthDate": "19610412",
    "InstitutionName": "St Elsewhere General",
    "AccessionNumber": "ACC-99812",
    "ReferringPhysicianName": "House^Gregory",
    "StudyDate": "20240301",
}
STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1001.2"
SOP_UID = "1.2.826.0.1.3680043.8.498.1001.2.3"


@dataclass
class Stack:
    """The app, its test client, the worker context, and how to reach the store's URLs."""

    app: Flask
    client: FlaskClient
    ctx: WorkerContext
    backend: str

    def account(self, organization: str = "Clinic") -> dict[str, str]:
        """Sign up a fresh user in a new organization; its Authorization header."""
        email = f"dr-{uuid.uuid4().hex[:10]}@clinic.test"
        r = self.client.post(
            "/api/v1/auth/signup",
            json={
                "email": email,
                "password": PASSWORD,
                "name": "Dr Test",
                "organization": organization,
            },
        )
        assert r.status_code == 201, r.get_json()
        r = self.client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert r.status_code == 200, r.get_json()
        return {"Authorization": f"Bearer {r.get_json()['access_token']}"}

    def submit(self, headers: dict[str, str], data: bytes, filename: str, **form: str) -> str:
        """Upload a file through the API; the job id."""
        r = self.client.post(
            "/api/v1/jobs",
            headers=headers,
            data={"file": (io.BytesIO(data), filename), **form},
            content_type="multipart/form-data",
        )
        assert r.status_code == 202, r.get_json()
        return str(r.get_json()["id"])

    def process(
        self, headers: dict[str, str], data: bytes, filename: str, **form: str
    ) -> dict[str, Any]:
        """Upload, run the worker pipeline on the job, and return the job JSON."""
        job_id = self.submit(headers, data, filename, **form)
        pipeline.run(job_id, context=self.ctx)
        r = self.client.get(f"/api/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200
        return dict(r.get_json())

    def download(self, url: str, headers: dict[str, str]) -> bytes:
        """The bytes behind an API URL or a presigned store URL (redirects followed)."""
        if url.startswith("http://localhost/"):
            url = url.removeprefix("http://localhost")
        if url.startswith("/"):
            r = self.client.get(url, headers=headers)
            if r.status_code == 202:  # rendered on first request: do what the reports worker does
                assert r.headers["Retry-After"] and r.get_json()["status"] == "rendering"
                job_id = url.split("/jobs/", 1)[1].split("/", 1)[0]
                reports.render_stored(self.ctx, uuid.UUID(job_id))
                r = self.client.get(url, headers=headers)
            if r.status_code == 302:
                return self.download(r.headers["Location"], headers)
            assert r.status_code == 200, (url, r.status_code, r.get_data()[:200])
            return bytes(r.get_data())
        assert self.backend == "s3", url  # only the S3 store hands out direct URLs
        response = requests.get(url, timeout=10)
        assert response.status_code == 200, (url, response.status_code)
        return response.content


@pytest.fixture(scope="session")
def database_url() -> str:
    """A fresh PostgreSQL database of these tests, upgraded to the Alembic head."""
    return fresh_postgres_database(DB_NAME)


@pytest.fixture(scope="module")  # torn down after each module: later suites load their own model
def classifier() -> Iterator[Any]:
    """A tiny real classifier (random weights, real forward pass and CAM) without a content gate."""
    from ml_core.classifier import Classifier

    class Ungated(Classifier):
        def gate(self) -> None:  # type: ignore[override]
            """No learned gate here: the content layer is reported as not run."""
            return None

    untrained = Classifier.build_untrained(input_size=32)
    tiny = Ungated(untrained._network, untrained._spec, untrained.info, None, None)
    model_cache.set_classifier(tiny)
    yield tiny
    model_cache.set_classifier(None)


@pytest.fixture(params=["local", "s3"])
def stack(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path, classifier: Any
) -> Iterator[Stack]:
    """The app and the pipeline sharing settings, on the local store and on S3 over HTTP."""
    values: dict[str, Any] = {
        "env": "test",
        "data_dir": tmp_path,
        "database_url": database_url,
        "broker_url": BROKER_URL,
        "jwt_secret_key": "test-secret-" + "r" * 40,
        "password_hash_time_cost": 1,
        "password_hash_memory_kib": 8192,
        "max_upload_mb": 5,
        "report_wait_s": 0,  # no reports worker here: download() renders on the 202
    }
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = f"reports-{uuid.uuid4().hex[:8]}"
        values |= {
            "storage_backend": "s3",
            "s3_bucket": bucket,
            "s3_endpoint_url": endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
        }
        S3Storage(
            bucket, endpoint_url=endpoint, access_key_id="testing", secret_access_key="testing"
        ).ensure_bucket()
    else:
        values["storage_dir"] = tmp_path / "store"
    settings = Settings(**values)
    broker = redis.Redis.from_url(BROKER_URL)
    broker.flushdb()
    app = create_app(settings)
    ctx = WorkerContext.from_settings(settings)
    set_context(ctx)
    try:
        yield Stack(app=app, client=app.test_client(), ctx=ctx, backend=request.param)
    finally:
        set_context(None)
        ctx.engine.dispose()
        broker.flushdb()


@pytest.fixture(scope="session")
def liver_hu() -> np.ndarray:
    """The axial slice with the largest liver of 3Dircadb1.7, in HU (512, 512)."""
    path = DATA / "ircadb" / "3Dircadb1.7.npz"
    if not path.is_file():
        pytest.skip("../shared/data is not available")
    with np.load(path) as volume:
        z = int(volume["liver"].sum(axis=(1, 2)).argmax())
        return np.asarray(volume["ct_hu"][z], dtype=np.float32)


@pytest.fixture(scope="session")
def liver_png(liver_hu: np.ndarray) -> bytes:
    """That slice windowed W400/L50 as PNG."""
    from ml_core.overlay import encode_png
    from ml_core.preprocessing import window

    return encode_png(window(liver_hu))


@pytest.fixture(scope="session")
def liver_dicom(liver_hu: np.ndarray) -> bytes:
    """That slice as a CT DICOM file whose header carries PHI and original UIDs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = SOP_UID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = SOP_UID
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.Modality = "CT"
    ds.BodyPartExamined = "ABDOMEN"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.78, 0.78]
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    for key, value in PHI.items():
        setattr(ds, key, value)
    stored = np.clip(np.rint(liver_hu) + 1024, 0, 4095).astype(np.uint16)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
