"""The whole journey in a real browser against a live server and a real worker process."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.web.live import LiveServer, log_in_in_browser, shot, sign_up_in_browser, unique_email

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.slow]

JOB_TIMEOUT_MS = 300_000  # the first job also loads the model in the worker (shared, busy CPUs)


def test_sign_up_upload_read_results_and_log_out(
    page: Page,
    live_server: LiveServer,
    worker: subprocess.Popen[bytes],
    liver_png: Path,
    photo: Path,
) -> None:
    email = unique_email("flow")
    page.goto("/")
    expect(page.get_by_text("Decision support, not a diagnosis.")).to_be_visible()
    shot(page, "01-home")

    sign_up_in_browser(page, email, "Clinic Flow")
    expect(page.get_by_role("status")).to_have_text("Your account is ready. Log in to start.")
    expect(page.get_by_label("Email")).to_have_value(email)
    log_in_in_browser(page, email)
    expect(page).to_have_url(f"{live_server.url}/jobs")
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["access_token_cookie"]["httpOnly"] is True
    assert cookies["access_token_cookie"]["sameSite"] == "Lax"

    page.get_by_role("link", name="Upload", exact=True).click()
    page.get_by_label("Choose files (PNG, JPEG or DICOM)").set_input_files(
        [str(liver_png), str(photo)]
    )
    links = page.locator("#upload-list a.job-link")
    expect(links).to_have_count(2)
    expect(page.locator("#upload-list progress").first).to_have_attribute("value", "100")
    shot(page, "02-upload")
    liver_url = links.nth(0).get_attribute("href")
    photo_url = links.nth(1).get_attribute("href")
    assert liver_url and photo_url

    # The liver slice: the page refreshes itself until the job succeeds.
    page.goto(liver_url)
    badge = page.locator("#status-badge")
    expect(badge).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#result-label")).to_have_text(
        re.compile("Tumor suspected|No tumor detected")
    )
    expect(page.locator("#probability")).to_have_text(re.compile(r"^[01]\.\d{3}$"))
    expect(page.locator("#threshold")).to_contain_text("at or above: tumor")
    expect(page.locator("#model")).not_to_be_empty()
    expect(page.locator("#checks tbody tr").first).to_be_visible()
    assert page.locator("#checks .badge.fail").count() == 0
    for img in ("#scan-img", "#cam-layer"):
        expect(page.locator(img)).to_be_visible()
        loaded = page.locator(img).evaluate("el => el.complete && el.naturalWidth > 0")
        assert loaded, f"{img} did not load"
    assert page.locator("#cam-layer").get_attribute("src") == page.get_by_role(
        "link", name="overlay PNG"
    ).get_attribute("href")
    slider = page.get_by_label("Grad-CAM overlay opacity")
    slider.fill("30")
    expect(page.locator("#opacity-value")).to_have_text("30%")
    assert page.locator("#cam-layer").evaluate("el => getComputedStyle(el).opacity") == "0.3"
    expect(page.locator("#timestamps")).to_contain_text("Finished")
    shot(page, "03-job-succeeded")

    # The photo: rejected, with the reason in plain words and every check that ran.
    page.goto(photo_url)
    expect(page.locator("#status-badge")).to_have_text("rejected", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#reason")).to_contain_text("Not screened.")
    reason = page.locator("#reason").inner_text()
    assert "(code:" in reason and "unknown" not in reason
    assert page.locator("#checks .badge.fail").count() >= 1
    expect(page.locator("#result-label")).to_have_count(0)
    shot(page, "04-job-rejected")

    page.get_by_role("link", name="Jobs", exact=True).click()
    rows = page.locator("#jobs-table tbody tr")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("chelsea.png")  # newest first
    expect(rows.nth(1)).to_contain_text("liver_slice.png")
    page.get_by_label("Status").select_option("rejected")
    page.get_by_role("button", name="Filter").click()
    expect(rows).to_have_count(1)
    expect(rows.nth(0)).to_contain_text("rejected")
    shot(page, "05-jobs")

    page.get_by_role("link", name="Performance", exact=True).click()
    expect(page.get_by_role("heading", name="Model performance")).to_be_visible()
    expect(page.locator("#live-total")).to_have_text("2")
    expect(page.locator("#live-rejection")).to_contain_text("50.0% of 2 finished jobs")
    shot(page, "06-performance")

    # Log out: the cookies are cleared, and even a copy of them is refused from now on.
    stolen = page.context.cookies()
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("status")).to_have_text("You have been logged out.")
    page.goto("/jobs")
    expect(page).to_have_url(re.compile(r"/login\?"))
    page.context.add_cookies(stolen)  # type: ignore[arg-type]
    page.goto("/jobs")
    expect(page).to_have_url(re.compile(r"/login\?m=revoked"))
    page.context.add_cookies(stolen)  # type: ignore[arg-type]
    api = page.request.get(liver_url.replace("/jobs/", "/api/v1/jobs/"))
    assert api.status == 401
    assert api.json()["error"]["code"] == "token_revoked"
    shot(page, "07-logged-out")
