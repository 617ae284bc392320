"""Sessions renew while in use and die at logout; the job list pages and filters."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from flask_jwt_extended import create_access_token, decode_token
from playwright.sync_api import Page, expect

from api.domain.db import make_engine, make_session_factory
from api.domain.models import Job, JobStatus, User, utcnow
from tests.web.live import LiveServer, log_in_in_browser, shot, unique_email

pytestmark = pytest.mark.browser


def _expire_access_cookie(page: Page, live_server: LiveServer) -> None:
    current = next(c for c in page.context.cookies() if c["name"] == "access_token_cookie")
    with live_server.app.app_context():
        claims = decode_token(current["value"])
        expired = create_access_token(
            identity=claims["sub"],
            additional_claims={"org": claims["org"], "role": claims["role"]},
            expires_delta=timedelta(minutes=-1),
        )
    page.context.add_cookies(
        [{"name": "access_token_cookie", "value": expired, "url": live_server.url}]
    )


def test_an_expired_access_token_is_renewed_from_the_refresh_cookie(
    page: Page, live_server: LiveServer
) -> None:
    email = unique_email("renew")
    live_server.api_signup(email, "Clinic Renew")
    log_in_in_browser(page, email)
    _expire_access_cookie(page, live_server)
    page.goto("/jobs")
    expect(page).to_have_url(f"{live_server.url}/jobs")
    expect(page.get_by_role("button", name="Log out")).to_be_visible()
    # The renewed cookie works for the JSON API the page scripts call.
    assert page.request.get("/api/v1/jobs").status == 200


def test_after_logout_a_copied_refresh_cookie_renews_nothing(
    page: Page, live_server: LiveServer
) -> None:
    email = unique_email("revoke")
    live_server.api_signup(email, "Clinic Revoke")
    log_in_in_browser(page, email)
    stolen = page.context.cookies()
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("status")).to_have_text("You have been logged out.")
    page.context.add_cookies(stolen)  # type: ignore[arg-type]
    _expire_access_cookie(page, live_server)  # force the renewal path
    page.goto("/jobs")
    expect(page).to_have_url(f"{live_server.url}/login?m=expired&next=/jobs")
    expect(page.get_by_role("button", name="Log out")).to_have_count(0)


def test_jobs_are_listed_newest_first_in_pages_and_filtered(
    page: Page, live_server: LiveServer
) -> None:
    email = unique_email("pages")
    live_server.api_signup(email, "Clinic Pages")
    engine = make_engine(live_server.settings)
    now = utcnow()
    with make_session_factory(engine).begin() as session:
        user = session.query(User).filter_by(email=email).one()
        for i in range(30):
            status = JobStatus.REJECTED if i % 10 == 0 else JobStatus.QUEUED
            session.add(
                Job(
                    org_id=user.org_id,
                    status=status,
                    reason_code="not_liver_ct" if status is JobStatus.REJECTED else None,
                    input_key=f"{user.org_id}/{uuid.uuid4()}/input",
                    input_sha256="0" * 64,
                    input_filename=f"slice_{i:02d}.png",
                    created_at=now - timedelta(minutes=30 - i),
                )
            )
    engine.dispose()
    log_in_in_browser(page, email)
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(25)
    expect(rows.first).to_contain_text("slice_29.png")
    shot(page, "jobs-page-1")
    page.get_by_role("link", name="Next page").click()
    expect(rows).to_have_count(5)
    expect(rows.last).to_contain_text("slice_00.png")
    expect(page.get_by_role("link", name="Next page")).to_have_count(0)
    page.get_by_role("link", name="First page").click()
    expect(rows).to_have_count(25)
    page.get_by_label("Status").select_option("rejected")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(3)
    expect(rows.first).to_contain_text("slice_20.png")
    expect(rows.first).to_contain_text("does not look like an axial abdominal CT or MR slice")
    assert page.request.get("/jobs?status=rejected").status == 200
    # An unknown status or a damaged cursor falls back to the plain list, not an error.
    assert page.request.get("/jobs?status=bogus").status == 200
    assert page.request.get("/jobs?cursor=%%%", max_redirects=0).status == 302


def test_an_upload_after_the_access_token_expired_renews_and_goes_through(
    page: Page, live_server: LiveServer, liver_png: Path
) -> None:
    email = unique_email("upload-renew")
    live_server.api_signup(email, "Clinic Upload Renew")
    log_in_in_browser(page, email)
    page.goto("/upload")
    _expire_access_cookie(page, live_server)  # the page has been open for longer than 15 minutes
    page.get_by_label("Choose files (PNG, JPEG or DICOM)").set_input_files(str(liver_png))
    expect(page.locator("#upload-list a.job-link")).to_have_text("View job (queued)")
