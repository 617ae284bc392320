"""What the browser tests share: the live server handle, fixed values and page helpers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import requests
from flask import Flask
from playwright.sync_api import Page

from api.domain.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"
ARTIFACTS = ROOT / "test-artifacts" / "web"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "liver-scan-2024"
MAX_UPLOAD_MB = 2


@dataclass
class LiveServer:
    """The app under test, reachable at `url`, and what a worker needs to join it."""

    url: str
    settings: Settings
    env: dict[str, str]
    data_dir: Path
    app: Flask

    def api_login(self, email: str, password: str = PASSWORD) -> str:
        """An access token through the JSON API."""
        r = requests.post(
            f"{self.url}/api/v1/auth/login", json={"email": email, "password": password}, timeout=30
        )
        r.raise_for_status()
        return str(r.json()["access_token"])

    def api_signup(self, email: str, organization: str, password: str = PASSWORD) -> None:
        """Create an account through the JSON API (faster than the form where the form is not under test)."""
        r = requests.post(
            f"{self.url}/api/v1/auth/signup",
            json={
                "email": email,
                "password": password,
                "name": "Dr Test",
                "organization": organization,
            },
            timeout=30,
        )
        assert r.status_code == 201, r.text

    def api_submit(self, token: str, path: Path) -> str:
        """Submit one file as a job through the JSON API; returns its id."""
        with path.open("rb") as fh:
            r = requests.post(
                f"{self.url}/api/v1/jobs",
                headers={"Authorization": f"Bearer {token}"},
                files={"file": (path.name, fh)},
                timeout=60,
            )
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def unique_email(tag: str) -> str:
    """A fresh address so tests sharing one database never collide."""
    return f"{tag}-{uuid.uuid4().hex[:8]}@clinic.test"


def shipped_model_present() -> bool:
    """Whether ml_core/models/CURRENT names a model folder with a model card."""
    current = ROOT / "ml_core" / "models" / "CURRENT"
    if not current.is_file():
        return False
    return (current.parent / current.read_text().strip() / "model_card.json").is_file()


def shot(pg: Page, name: str) -> None:
    """Save a full-page screenshot under test-artifacts/web/ (not committed)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_up_in_browser(pg: Page, email: str, organization: str, password: str = PASSWORD) -> None:
    """Fill and send the sign-up form."""
    pg.goto("/signup")
    pg.get_by_label("Your name").fill("Dr Test")
    pg.get_by_label("Email").fill(email)
    pg.get_by_label("Organization (clinic or programme)").fill(organization)
    pg.get_by_label("Password").fill(password)
    pg.get_by_role("button", name="Sign up").click()


def log_in_in_browser(pg: Page, email: str, password: str = PASSWORD) -> None:
    """Fill and send the login form."""
    pg.goto("/login")
    pg.get_by_label("Email").fill(email)
    pg.get_by_label("Password").fill(password)
    pg.get_by_role("button", name="Log in").click()
