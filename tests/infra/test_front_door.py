"""The Makefile and CI script: the two commands a newcomer and CI depend on."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_makefile_has_the_documented_targets() -> None:
    """`make run|test|lint|bench|migrate` exist and resolve without running anything."""
    for target in ("run", "test", "lint", "bench", "migrate"):
        result = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_make_test_treats_no_tests_collected_as_failure() -> None:
    """pytest exit 5 must fail `make test` (an empty run is not a green run)."""
    recipe = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "-m pytest" in recipe
    assert re.search(r"\$rc -eq 5 \]; then .*exit 1", recipe)


def test_venv_install_is_skipped_when_up_to_date() -> None:
    """The install step is keyed on a stamp newer than pyproject.toml (make stays idempotent)."""
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(VENV\)/\.stamp-test: pyproject\.toml", makefile, re.M)
    assert re.search(r"^\$\(VENV\)/\.stamp-ml: pyproject\.toml", makefile, re.M)


def test_ci_script_is_strict_and_runs_make_test() -> None:
    """.ci/run is executable bash with `set -euo pipefail` and ends in the README test command."""
    path = ROOT / ".ci" / "run"
    text = path.read_text()
    assert os.access(path, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text
    assert text.rstrip().splitlines()[-1] == "make test"
    assert "bash scripts/ensure_services.sh" in text


def test_ensure_services_is_idempotent_when_services_run() -> None:
    """With PostgreSQL and Redis already up the service script succeeds and starts nothing."""
    result = subprocess.run(
        ["bash", "scripts/ensure_services.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "starting" not in result.stderr
