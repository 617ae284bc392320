"""Browser tests: the Flask app on a loopback port, a real Celery worker, Debian's Chromium.

The embedded default backends (SQLite file, kombu SQLAlchemy broker on SQLite, local store) so
the API thread and the worker process share everything without servers.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Page
from werkzeug.serving import make_server

from api.domain.settings import Settings
from tests.web.live import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    DATA,
    MAX_UPLOAD_MB,
    ROOT,
    LiveServer,
    shipped_model_present,
)

log = logging.getLogger(__name__)


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Migrate a fresh SQLite database and serve the app from a background thread."""
    from api.app import create_app

    data_dir = tmp_path_factory.mktemp("web-data")
    env = {
        "LIVERSCAN_ENV": "test",
        "LIVERSCAN_DATA_DIR": str(data_dir),
        "LIVERSCAN_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "LIVERSCAN_JWT_SECRET_KEY": secrets.token_hex(32),
        "LIVERSCAN_PASSWORD_HASH_TIME_COST": "1",
        "LIVERSCAN_PASSWORD_HASH_MEMORY_KIB": "8192",
        "LIVERSCAN_SWEEP_DEADLINE_S": "600",
    }
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LIVERSCAN_")} | env
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env=full_env,
        check=True,
        capture_output=True,
    )
    settings = Settings(
        env="test",
        data_dir=data_dir,
        max_upload_mb=MAX_UPLOAD_MB,
        jwt_secret_key=env["LIVERSCAN_JWT_SECRET_KEY"],
        password_hash_time_cost=1,
        password_hash_memory_kib=8192,
        sweep_deadline_s=600,
    )
    app = create_app(settings)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="web-test-server", daemon=True)
    thread.start()
    try:
        yield LiveServer(
            url=f"http://127.0.0.1:{server.server_port}",
            settings=settings,
            env=full_env,
            data_dir=data_dir,
            app=app,
        )
    finally:
        server.shutdown()
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def worker(live_server: LiveServer) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process consuming the same broker, database and store."""
    if not shipped_model_present():
        pytest.skip("no shipped model under ml_core/models/ yet: the worker cannot classify")
    log_path = live_server.data_dir / "worker.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
             "-Q", "inference,webhooks", "--pool=solo", "--concurrency=1", "--loglevel=INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=live_server.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("the worker exited early:\n" + log_path.read_text(errors="replace")[-4000:])
        if "ready." in log_path.read_text(errors="replace"):
            break
        time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(
            "the worker did not become ready:\n" + log_path.read_text(errors="replace")[-4000:]
        )
    yield proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "worker.log").write_text(log_path.read_text(errors="replace"))


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's Chromium driven by Playwright (never a downloaded browser)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    """A fresh browser context (no cookies) with its base URL on the live server."""
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="session")
def liver_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real liver CT slice (3D-IRCADb-01 patient 1, the largest liver section) as an 8-bit PNG, W400/L50."""
    vol = DATA / "ircadb" / "3Dircadb1.1.npz"
    with (DATA / "ircadb" / "3Dircadb1.1_slices.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    z = max(rows, key=lambda r: int(r["liver_px"]))["slice_index"]
    hu = np.load(vol)["ct_hu"][int(z)].astype(np.float32)
    lo, hi = 50 - 200, 50 + 200
    u8 = (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).round().astype(np.uint8)
    path = tmp_path_factory.mktemp("uploads") / "liver_slice.png"
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="session")
def photo() -> Path:
    """A colour photograph (a cat), which must be rejected."""
    return DATA / "negatives" / "skimage" / "chelsea.png"
