"""Crash freedom: random and mutated PNG, JPEG and DICOM bytes always end in a report.

Every outcome must be a ValidationReport that either passed or carries a documented reason
code — never an exception. Hypothesis runs derandomized (the same examples in CI every time)
and the number of examples run is written to the test output.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml_core.types import ValidationReport
from ml_core.validation import REASON_CODES, validate

# pydicom warns on every mangled value it still reads; the outcome is what is asserted.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXAMPLES = {"random": 250, "png": 250, "jpeg": 250, "dicom": 250, "dicom_compressed": 100}
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
OUTCOMES: Counter[str] = Counter()
RUNS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hand the counts to tests/ml_core/conftest.py, which prints them in the summary."""
    yield
    request.config.liverscan_fuzz_lines = [  # type: ignore[attr-defined]
        f"examples run: {sum(RUNS.values())} {dict(RUNS)}",
        f"outcomes: {dict(OUTCOMES.most_common())}",
    ]


@pytest.fixture(scope="module")
def seeds(make: SimpleNamespace, ircadb) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """Small real files: a 160 px liver crop as PNG, JPEG and DICOM (plain, RLE, JPEG 2000)."""
    hu = ircadb.hu[176:336, 176:336]
    u8 = make.window(hu)
    return {
        "png": make.png(u8),
        "jpeg": make.jpeg(u8, 80),
        "dicom": make.dicom(make.ct_dataset(hu)),
        "dicom_rle": make.dicom(make.ct_dataset(hu, transfer_syntax="1.2.840.10008.1.2.5")),
        "dicom_j2k": make.dicom(make.ct_dataset(hu, transfer_syntax="1.2.840.10008.1.2.4.90")),
    }


def _check(kind: str, data: bytes) -> None:
    report = validate(data, gate=None)
    RUNS[kind] += 1
    assert isinstance(report, ValidationReport)
    if report.passed:
        assert report.reason_code is None and report.slice_u8 is not None
        OUTCOMES["passed"] += 1
    else:
        assert report.reason_code in REASON_CODES, report.reason_code
        assert report.checks and not report.checks[-1].passed
        OUTCOMES[report.reason_code] += 1
    report.to_dict()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes, header_span: int) -> bytes:
    """Bit flips anywhere, byte edits in the header, truncation, or an inserted chunk."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] ^= 1 << draw(st.integers(0, 7))
    for _ in range(draw(st.integers(0, 4))):
        pos = draw(st.integers(0, min(header_span, len(data)) - 1))
        data[pos] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(FUZZ, max_examples=EXAMPLES["random"])
@given(
    data=st.one_of(
        st.binary(max_size=2048),
        st.binary(max_size=512).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
        st.binary(max_size=512).map(lambda b: b"\xff\xd8\xff" + b),
        st.binary(max_size=512).map(lambda b: b"\0" * 128 + b"DICM" + b),
    )
)
def test_random_bytes_never_crash(data: bytes) -> None:
    _check("random", data)


@pytest.mark.parametrize("kind,span", [("png", 64), ("jpeg", 700), ("dicom", 1200)])
def test_mutated_files_never_crash(seeds: dict[str, bytes], kind: str, span: int) -> None:
    @settings(FUZZ, max_examples=EXAMPLES[kind])
    @given(data=mutated(seeds[kind], span))
    def run(data: bytes) -> None:
        _check(kind, data)

    assert validate(seeds[kind], gate=None).passed  # the unmutated seed is a valid liver crop
    run()


@pytest.mark.parametrize("kind", ["dicom_rle", "dicom_j2k"])
def test_mutated_compressed_dicom_never_crashes(seeds: dict[str, bytes], kind: str) -> None:
    @settings(FUZZ, max_examples=EXAMPLES["dicom_compressed"] // 2)
    @given(data=mutated(seeds[kind], 1200))
    def run(data: bytes) -> None:
        _check("dicom_compressed", data)

    assert validate(seeds[kind], gate=None).passed
    run()


def test_decoder_inputs_of_every_shape_never_crash(make: SimpleNamespace) -> None:
    """Odd but valid encodings: 16-bit, alpha, palette-like, tiny and extreme aspect."""
    rng = np.random.default_rng(0)
    cases = [
        np.zeros((1, 1), np.uint8),
        np.zeros((1, 4097), np.uint8),
        rng.integers(0, 65535, (200, 200), dtype=np.uint16),
        rng.integers(0, 255, (200, 200, 4), dtype=np.uint8),
        rng.integers(0, 255, (200, 200, 3), dtype=np.uint8),
    ]
    for arr in cases:
        _check("random", make.png(arr))
    _check("random", make.jpeg(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)))


@pytest.mark.parametrize("kind", ["png", "jpeg", "dicom"])
def test_decode_raises_only_mlcore_errors(seeds: dict[str, bytes], kind: str) -> None:
    """``decode`` itself (used by the CLI and batch paths) fails only with a stable code."""
    from ml_core.decoding import decode
    from ml_core.errors import MLCoreError

    @settings(FUZZ, max_examples=60)
    @given(data=mutated(seeds[kind], 1200))
    def run(data: bytes) -> None:
        RUNS["decode"] += 1
        try:
            image = decode(data)
        except MLCoreError as exc:
            assert exc.code in {*REASON_CODES, "not_grayscale"}, exc.code
            OUTCOMES[f"decode:{exc.code}"] += 1
            return
        assert image.pixels.ndim == 2 and np.all(np.isfinite(image.pixels))
        OUTCOMES["decode:ok"] += 1

    run()
