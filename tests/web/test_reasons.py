"""Every reason a job can be rejected for has a plain-language sentence on the job page."""

from __future__ import annotations

from api.web.reasons import REASONS, reason_sentence


def test_every_validator_reason_code_has_its_own_sentence() -> None:
    from ml_core.validation import (
        REASON_CODES,
    )  # the validator's stable list (no TensorFlow import)

    missing = sorted(set(REASON_CODES) - set(REASONS))
    assert missing == [], f"reason codes without a sentence for the job page: {missing}"


def test_an_unknown_code_still_reads_as_words() -> None:
    assert reason_sentence("some_new_rule") == "The upload did not pass validation (some new rule)."
