"""The job page for each terminal state, from rows written by the same services the worker uses."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from api.domain import jobs
from api.domain.db import make_engine, make_session_factory
from api.domain.models import User
from api.domain.storage import LocalStorage, job_key
from tests.web.live import LiveServer, log_in_in_browser, shot, unique_email

pytestmark = pytest.mark.browser

CHECKS = [
    {"name": "file_size", "passed": True, "detail": "106 KB"},
    {"name": "format", "passed": True, "detail": "png"},
    {"name": "content", "passed": True, "detail": "liver slice score 0.97"},
]


def _png(rgb: bool) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, size=(64, 64, 3) if rgb else (64, 64), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _job(live_server: LiveServer, email: str, upload: bytes, filename: str, finish: str) -> str:
    """Create a job the way intake and the worker do, ending in `finish`."""
    engine = make_engine(live_server.settings)
    store_dir = live_server.settings.storage_dir
    assert store_dir is not None
    storage = LocalStorage(store_dir)
    with make_session_factory(engine).begin() as session:
        user = session.query(User).filter_by(email=email).one()
        jid = uuid.uuid4()
        stored = storage.put(job_key(user.org_id, jid, "input"), upload, "application/octet-stream")
        jobs.create_job(
            session,
            org_id=user.org_id,
            user_id=user.id,
            job_id=jid,
            upload=stored,
            filename=filename,
        )
        jobs.mark_processing(session, jid)
        meta = {
            "format": "dicom" if filename.endswith(".dcm") else "png",
            "width": 64,
            "height": 64,
            "modality": "CT",
        }
        if finish == "succeeded":
            heat = storage.put(job_key(user.org_id, jid, "heatmap.png"), _png(True), "image/png")
            over = storage.put(job_key(user.org_id, jid, "overlay.png"), _png(True), "image/png")
            jobs.mark_succeeded(
                session, jid, label="tumor", probability=0.8734, threshold=0.42, model_name="liverscan-b0",
                model_version="2026.11.28", model_sha256="c0ffee" * 10 + "abcd", heatmap_key=heat.key,
                overlay_key=over.key, validation={"passed": True, "reason_code": None, "checks": CHECKS},
                input_meta=meta,
            )  # fmt: skip
        elif finish == "rejected":
            checks = [
                *CHECKS[:2],
                {"name": "grayscale", "passed": False, "detail": "3 colour channels differ"},
            ]
            jobs.mark_rejected(
                session, jid, reason_code="not_grayscale",
                validation={"passed": False, "reason_code": "not_grayscale", "checks": checks}, input_meta=meta,
            )  # fmt: skip
        else:
            jobs.mark_failed(
                session, jid, error_code="model_load_error", error_message="weights missing"
            )
    engine.dispose()
    return str(jid)


@pytest.fixture
def signed_in(page: Page, live_server: LiveServer) -> str:
    email = unique_email("jobpage")
    live_server.api_signup(email, "Clinic Job Page")
    log_in_in_browser(page, email)
    return email


def test_succeeded_job_shows_result_model_checks_and_a_fading_overlay(
    page: Page, live_server: LiveServer, signed_in: str
) -> None:
    jid = _job(live_server, signed_in, _png(False), "slice.png", "succeeded")
    page.goto(f"/jobs/{jid}")
    expect(page.locator("#status-badge")).to_have_text("succeeded")
    expect(page.locator("#result-label")).to_have_text("Tumor suspected")
    expect(page.locator("#probability")).to_have_text("0.873")
    expect(page.locator("#threshold")).to_contain_text("0.420")
    expect(page.locator("#model")).to_have_text("liverscan-b0 2026.11.28")
    expect(page.locator("#checks tbody tr")).to_have_count(3)
    expect(page.locator("#checks tbody tr").nth(2)).to_contain_text(
        "content pass liver slice score 0.97"
    )
    for img in ("#scan-img", "#cam-layer"):
        assert page.locator(img).evaluate("el => el.complete && el.naturalWidth === 64"), img
    slider = page.get_by_label("Grad-CAM overlay opacity")
    expect(slider).to_have_value("100")
    slider.focus()
    for _ in range(4):
        page.keyboard.press("ArrowLeft")  # keyboard works too: 4 steps of 5%
    expect(page.locator("#opacity-value")).to_have_text("80%")
    assert page.locator("#cam-layer").evaluate("el => getComputedStyle(el).opacity") == "0.8"
    expect(page.locator("#timestamps")).to_contain_text("Finished")
    shot(page, "job-succeeded")


def test_rejected_job_says_why_in_plain_words(
    page: Page, live_server: LiveServer, signed_in: str
) -> None:
    jid = _job(live_server, signed_in, _png(True), "holiday.png", "rejected")
    page.goto(f"/jobs/{jid}")
    expect(page.locator("#reason")).to_contain_text(
        "Not screened. The image is in colour; CT and MR slices are grayscale."
    )
    expect(page.locator("#reason")).to_contain_text("(code: not_grayscale)")
    expect(page.locator("#checks .badge.fail")).to_have_count(1)
    expect(page.locator("#result-label")).to_have_count(0)
    expect(
        page.get_by_text("No classification: the model was not run on this upload.")
    ).to_be_visible()
    shot(page, "job-rejected")


def test_failed_job_shows_the_error_without_internals(
    page: Page, live_server: LiveServer, signed_in: str
) -> None:
    jid = _job(live_server, signed_in, _png(False), "slice.png", "failed")
    page.goto(f"/jobs/{jid}")
    expect(page.locator("#reason")).to_contain_text("The screening model could not be loaded.")
    expect(page.get_by_text("weights missing")).to_have_count(0)


def test_dicom_job_shows_the_overlay_with_the_heatmap_on_demand(
    page: Page, live_server: LiveServer, signed_in: str
) -> None:
    dicom_like = b"\0" * 128 + b"DICM" + b"\0" * 64
    jid = _job(live_server, signed_in, dicom_like, "slice.dcm", "succeeded")
    page.goto(f"/jobs/{jid}")
    expect(page.locator("#scan-img")).to_have_attribute(
        "alt", "The slice with the Grad-CAM overlay"
    )
    assert page.locator("#scan-img").evaluate("el => el.complete && el.naturalWidth === 64")
    expect(page.get_by_label("Raw heatmap opacity")).to_have_value("0")
    # The upload itself is never served as an image when its bytes are not PNG/JPEG.
    assert page.request.get(f"/jobs/{jid}/scan").status == 404


def test_a_queued_job_page_updates_itself_when_the_job_finishes(
    page: Page, live_server: LiveServer, signed_in: str, tmp_path: Path
) -> None:
    engine = make_engine(live_server.settings)
    store_dir = live_server.settings.storage_dir
    assert store_dir is not None
    with make_session_factory(engine).begin() as session:
        user = session.query(User).filter_by(email=signed_in).one()
        jid = uuid.uuid4()
        stored = LocalStorage(store_dir).put(
            job_key(user.org_id, jid, "input"), _png(False), "image/png"
        )
        jobs.create_job(
            session, org_id=user.org_id, job_id=jid, upload=stored, filename="later.png"
        )
    page.goto(f"/jobs/{jid}")
    expect(page.locator("#status-badge")).to_have_text("queued")
    expect(page.get_by_text("this page refreshes itself")).to_be_visible()
    with make_session_factory(engine).begin() as session:
        jobs.mark_processing(session, jid)
        jobs.mark_rejected(
            session, jid, reason_code="not_liver_ct", validation={"passed": False, "checks": []}
        )
    engine.dispose()
    expect(page.locator("#status-badge")).to_have_text("rejected", timeout=30_000)
    expect(page.locator("#reason")).to_contain_text(
        "does not look like an axial abdominal CT or MR slice"
    )
