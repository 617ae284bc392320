"""Bad input in the browser: each refusal is shown where the user looks, and nothing leaks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from flask_jwt_extended import create_access_token, decode_token
from playwright.sync_api import Page, expect

from tests.web.live import (
    MAX_UPLOAD_MB,
    PASSWORD,
    LiveServer,
    log_in_in_browser,
    shot,
    sign_up_in_browser,
    unique_email,
)

pytestmark = pytest.mark.browser


def test_wrong_password_is_refused_with_the_error_next_to_the_field(
    page: Page, live_server: LiveServer
) -> None:
    email = unique_email("wrongpw")
    live_server.api_signup(email, "Clinic Wrong Password")
    log_in_in_browser(page, email, "not-the-password-1")
    expect(page.locator("#e-password")).to_have_text("Email or password is wrong.")
    expect(page.get_by_label("Password")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("button", name="Log out")).to_have_count(0)
    shot(page, "login-wrong-password")


def test_duplicate_email_is_refused_at_signup(page: Page, live_server: LiveServer) -> None:
    email = unique_email("dup")
    live_server.api_signup(email, "Clinic Dup")
    sign_up_in_browser(page, email, "Another Clinic")
    expect(page.locator("#e-email")).to_contain_text("already exists")
    # What the user typed is kept, except the password.
    expect(page.get_by_label("Email")).to_have_value(email)
    expect(page.get_by_label("Password")).to_have_value("")
    shot(page, "signup-duplicate-email")


def test_weak_password_is_refused_at_signup(page: Page) -> None:
    sign_up_in_browser(page, unique_email("weak"), "Clinic Weak", password="short")
    expect(page.locator("#e-password")).to_contain_text("at least 10 characters")
    expect(page.get_by_role("heading", name="Create an account")).to_be_visible()


def test_oversize_and_non_image_files_are_refused_before_sending(
    page: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    email = unique_email("files")
    live_server.api_signup(email, "Clinic Files")
    log_in_in_browser(page, email)
    page.goto("/upload")
    big = tmp_path / "huge_scan.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 10))
    text = tmp_path / "notes.png"  # the extension lies: the bytes decide
    text.write_text("patient notes, not an image\n" * 20)
    page.get_by_label("Choose files (PNG, JPEG or DICOM)").set_input_files([str(big), str(text)])
    rows = page.locator("#upload-list li")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("File too large")
    expect(rows.nth(0)).to_contain_text(f"{MAX_UPLOAD_MB:.1f} MB limit")
    expect(rows.nth(1)).to_contain_text("Not an image")
    shot(page, "upload-refused-files")
    page.goto("/jobs")
    expect(page.get_by_text("No jobs yet")).to_be_visible()


def test_expired_session_sends_the_user_to_login(page: Page, live_server: LiveServer) -> None:
    email = unique_email("expired")
    live_server.api_signup(email, "Clinic Expired")
    with live_server.app.app_context():
        claims = decode_token(live_server.api_login(email))
        expired = create_access_token(
            identity=claims["sub"],
            additional_claims={"org": claims["org"], "role": claims["role"]},
            expires_delta=timedelta(minutes=-5),
        )
    page.context.add_cookies(
        [{"name": "access_token_cookie", "value": expired, "url": live_server.url}]
    )
    page.goto("/jobs")
    expect(page).to_have_url(f"{live_server.url}/login?m=expired&next=/jobs")
    expect(page.get_by_role("status")).to_have_text(
        "Your session has expired. Please log in again."
    )
    shot(page, "session-expired")
    # Logging in again brings the user back where they were going.
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(f"{live_server.url}/jobs")


def test_another_organizations_job_is_a_404_page(
    page: Page, live_server: LiveServer, liver_png: Path
) -> None:
    owner = unique_email("owner")
    live_server.api_signup(owner, "Clinic Owner")
    job_id = live_server.api_submit(live_server.api_login(owner), liver_png)
    other = unique_email("other")
    live_server.api_signup(other, "Clinic Other")
    log_in_in_browser(page, other)
    response = page.goto(f"/jobs/{job_id}")
    assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    expect(page.get_by_text("liver_slice.png")).to_have_count(0)
    assert page.request.get(f"/jobs/{job_id}/scan").status == 404
    page.goto("/jobs")
    expect(page.locator(f'tr[data-job-id="{job_id}"]')).to_have_count(0)
    shot(page, "other-org-job-404")


def test_form_posts_without_the_csrf_token_are_refused(page: Page, live_server: LiveServer) -> None:
    email = unique_email("csrf")
    live_server.api_signup(email, "Clinic CSRF")
    page.goto("/login")
    # Right credentials, no token: refused, and no session is created.
    refused = page.request.post("/login", form={"email": email, "password": PASSWORD})
    assert refused.status == 403
    assert "Form expired or forged" in refused.text()
    assert page.request.get("/jobs", max_redirects=0).status == 302
    log_in_in_browser(page, email)
    expect(page.get_by_role("button", name="Log out")).to_be_visible()
    # Logging out without the token is refused too; the session survives.
    assert page.request.post("/logout", form={}).status == 403
    assert page.request.get("/jobs", max_redirects=0).status == 200
    # A forged token is as good as none.
    assert page.request.post("/logout", form={"csrf_token": "forged"}).status == 403
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("status")).to_have_text("You have been logged out.")


def test_upload_form_without_javascript_checks_token_and_size(
    page: Page, live_server: LiveServer, tmp_path: Path
) -> None:
    email = unique_email("nojs")
    live_server.api_signup(email, "Clinic No JS")
    log_in_in_browser(page, email)
    page.goto("/upload")
    token = page.locator('#upload-form input[name="csrf_token"]').input_value()
    big = {
        "name": "big.png",
        "mimeType": "image/png",
        "buffer": b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 10),
    }
    assert page.request.post("/upload", multipart={"file": big}).status == 403
    refused = page.request.post("/upload", multipart={"csrf_token": token, "file": big})
    assert refused.status == 413
    assert f"File too large: big.png is over the {MAX_UPLOAD_MB} MB limit." in refused.text()


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/", "/\\evil.example/", "jobs"]
)
def test_login_never_redirects_off_site(page: Page, live_server: LiveServer, target: str) -> None:
    email = unique_email("next")
    live_server.api_signup(email, "Clinic Next")
    page.goto("/login")
    token = page.locator('input[name="csrf_token"]').input_value()
    resp = page.request.post(
        "/login",
        form={"csrf_token": token, "email": email, "password": PASSWORD, "next": target},
        max_redirects=0,
    )
    assert resp.status == 302
    assert resp.headers["location"] == "/jobs"
