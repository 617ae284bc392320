"""The pages keep working under a strict Content-Security-Policy (no inline script or style)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Page, Route, expect

from tests.web.live import LiveServer, log_in_in_browser, unique_email

pytestmark = pytest.mark.browser

CSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"


def _with_csp(route: Route) -> None:
    # The policy governs documents; other requests (the uploads too) go through untouched.
    if route.request.resource_type != "document":
        route.continue_()
        return
    response = route.fetch(max_redirects=0)
    route.fulfill(response=response, headers={**response.headers, "content-security-policy": CSP})


def test_pages_and_scripts_work_under_a_strict_csp(
    page: Page, live_server: LiveServer, liver_png: Path
) -> None:
    violations: list[str] = []
    page.on(
        "console",
        lambda msg: violations.append(msg.text) if "Content Security Policy" in msg.text else None,
    )
    page.route("**/*", _with_csp)
    email = unique_email("csp")
    live_server.api_signup(email, "Clinic CSP")
    log_in_in_browser(page, email)
    expect(page).to_have_url(f"{live_server.url}/jobs")
    page.goto("/upload")
    # Styles from the stylesheet apply (the dashed drop zone), and the upload script runs.
    assert (
        page.locator("#dropzone").evaluate("el => getComputedStyle(el).borderTopStyle") == "dashed"
    )
    page.get_by_label("Choose files (PNG, JPEG or DICOM)").set_input_files(str(liver_png))
    link = page.locator("#upload-list a.job-link")
    expect(link).to_have_text("View job (queued)")
    link.click()
    expect(page.locator("#status-badge")).to_be_visible()
    assert page.locator("#scan-img").evaluate("el => el.complete && el.naturalWidth > 0")
    for path in ("/", "/performance", "/jobs"):
        page.goto(path)
    assert violations == []
