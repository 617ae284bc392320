"""Usable by keyboard and at phone width: labels, focus order, no sideways scrolling."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, ViewportSize, expect

from tests.web.live import PASSWORD, LiveServer, shot, unique_email

pytestmark = pytest.mark.browser

PHONE: ViewportSize = {"width": 390, "height": 844}


def _fits(page: Page) -> bool:
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"))


def test_pages_fit_a_phone_screen(page: Page, live_server: LiveServer) -> None:
    email = unique_email("phone")
    live_server.api_signup(email, "Clinic Phone")
    page.set_viewport_size(PHONE)
    for path in ("/", "/signup", "/login"):
        page.goto(path)
        assert _fits(page), f"{path} scrolls sideways at {PHONE['width']} px"
    shot(page, "phone-login")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    for path in ("/upload", "/jobs", "/performance"):
        page.goto(path)
        assert _fits(page), f"{path} scrolls sideways at {PHONE['width']} px"
    shot(page, "phone-performance")


def test_login_works_with_the_keyboard_alone(page: Page, live_server: LiveServer) -> None:
    email = unique_email("keys")
    live_server.api_signup(email, "Clinic Keyboard")
    page.goto("/login")
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Enter")
    # From the main content, the form's fields come next in the tab order.
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "f-email":
            break
    expect(page.get_by_label("Email")).to_be_focused()
    page.keyboard.type(email)
    page.keyboard.press("Tab")
    expect(page.get_by_label("Password")).to_be_focused()
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{live_server.url}/jobs")
    expect(page.get_by_role("button", name="Log out")).to_be_visible()


def test_every_form_field_has_a_label(page: Page, live_server: LiveServer) -> None:
    email = unique_email("labels")
    live_server.api_signup(email, "Clinic Labels")
    unlabelled = """() => [...document.querySelectorAll('input:not([type=hidden]), select')]
        .filter(el => !(el.labels && el.labels.length)).map(el => el.name || el.id)"""
    for path in ("/signup", "/login"):
        page.goto(path)
        assert page.evaluate(unlabelled) == [], path
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    for path in ("/upload", "/jobs"):
        page.goto(path)
        assert page.evaluate(unlabelled) == [], path
