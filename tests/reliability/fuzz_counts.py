"""A pytest plugin for `make reliability` (`-p tests.reliability.fuzz_counts`): appends the fuzz
suites' case counts to the results file beside the fault scenarios' books — schemathesis cases
(the `schemathesis_cases` property tests/security records) and hypothesis examples (the counter
tests/ml_core/test_fuzz_validation.py keeps)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.accounting import RESULTS_ENV, ResultsFile


def _results() -> ResultsFile:
    raw = os.environ.get(RESULTS_ENV)
    return ResultsFile(Path(raw) if raw else None)


FUZZ_MODULE = "test_fuzz_validation"
_fuzz_failures: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record the schemathesis case count of a finished test that reports one."""
    if report.failed and FUZZ_MODULE in report.nodeid:
        _fuzz_failures.append(report.nodeid)
    if report.when != "call":
        return
    for name, value in report.user_properties:
        if name == "schemathesis_cases":
            _results().write(
                {
                    "fuzz": "schemathesis: generated API requests (tests/security)",
                    "cases": int(value),
                    "passed": report.passed,
                }
            )


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Record the hypothesis examples the decoder/validator fuzz tests ran, if they ran."""
    runs: Any = None
    for name, module in list(sys.modules.items()):
        if name.rsplit(".", 1)[-1] == FUZZ_MODULE:
            runs = getattr(module, "RUNS", None)
    if runs:
        _results().write(
            {
                "fuzz": "hypothesis: PNG/JPEG/DICOM bytes into decode + validate (tests/ml_core)",
                "cases": int(sum(runs.values())),
                "by_kind": dict(runs),
                "passed": not _fuzz_failures,
            }
        )
