"""Content gate: threshold rule, generated negatives, sha256-verified loading, and the shipped gate
accepting real liver slices (PNG, JPEG, DICOM) while rejecting non-liver files and far slices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ml_core import gate as G
from ml_core.errors import MLCoreError

SHIPPED = G.STAGING_DIR


def test_threshold_rejects_every_negative_and_sits_between_the_classes() -> None:
    scores = {
        "pos/a": np.array([0.97, 0.99, 0.995, 0.999] * 50),
        "neg/b": np.array([0.01, 0.2, 0.6]),
    }
    t = G.choose_threshold(scores)
    assert 0.6 < t < 0.97
    r = G.rates(scores, t)
    assert r["negatives_rejected"] == 1.0 and r["liver_accepted"] == 1.0
    assert r["by_group"]["neg/b"]["max_score"] == 0.6


def test_when_classes_overlap_strictness_wins_over_acceptance() -> None:
    scores = {"pos/a": np.array([0.5, 0.9, 0.95, 0.99]), "neg/b": np.array([0.1, 0.92])}
    t = G.choose_threshold(scores)
    r = G.rates(scores, t)
    assert r["negatives_rejected"] == 1.0
    assert r["liver_accepted"] == 0.5


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: G.gen_document(rng),
        lambda rng: G.gen_head(rng),
        lambda rng: G.gen_brain(rng),
        lambda rng: G.gen_blob(rng),
        lambda rng: G.gen_cutout(rng, [_body()]),
        lambda rng: G.gen_texture(rng),
        lambda rng: G.gen_noise_or_gradient(rng),
        lambda rng: G.gen_montage(rng, [np.full((64, 64), 100, np.uint8)]),
        lambda rng: G.gen_viewer(rng, [np.full((64, 64), 100, np.uint8)]),
    ],
    ids=["document", "head", "brain", "blob", "cutout", "texture", "noise", "montage", "viewer"],
)
def test_generated_negatives_are_grey_uint8_images(make) -> None:
    for seed in range(5):
        img = make(np.random.default_rng(seed))
        assert img.dtype == np.uint8 and img.ndim == 2 and min(img.shape) >= 16


def _body() -> np.ndarray:
    """A body-like 128 px slice: grey ellipse with a darker rim on black."""
    import cv2

    img = np.zeros((128, 128), np.uint8)
    cv2.ellipse(img, (64, 64), (56, 44), 0, 0, 360, 40, -1)
    cv2.ellipse(img, (64, 64), (48, 36), 0, 0, 360, 140, -1)
    return img


def test_pseudo_mr_keeps_the_anatomy_and_changes_the_ct_intensity_order() -> None:
    body = np.kron(_body(), np.ones((2, 2), np.uint8))  # fat ring 40, liver-like core 140
    fat_brighter = 0
    for seed in range(40):
        mr = G.pseudo_mr(body, np.random.default_rng(seed))
        assert mr.dtype == np.uint8 and mr.shape == body.shape
        outside, core, ring = mr[:8, :8].mean(), mr[128, 128], mr[128, 128 + 104]
        assert outside < 50  # air stays dark (noise floor and bias field aside)
        fat_brighter += int(ring > core)
    # fat is brighter than soft tissue in T1 / T2 renders and darker when fat-suppressed
    assert 5 <= fat_brighter <= 35
    again = G.pseudo_mr(body, np.random.default_rng(3))
    assert np.array_equal(again, G.pseudo_mr(body, np.random.default_rng(3)))


def test_mr_like_renders_are_reported_but_do_not_set_the_threshold() -> None:
    scores = {
        "pos/a": np.array([0.97, 0.99, 0.995, 0.999] * 50),
        "pos/pseudo_mr": np.array([0.05, 0.1]),
        "neg/b": np.array([0.01, 0.2, 0.6]),
    }
    t = G.choose_threshold(scores)
    assert 0.6 < t < 0.97
    r = G.rates(scores, t)
    assert r["liver_accepted"] == 1.0 and r["n_positive"] == 200
    assert r["by_group"]["pos/pseudo_mr"]["accepted"] == 0.0
    better_mr = dict(scores, **{"pos/pseudo_mr": np.array([0.99, 0.1])})
    wider_gap = dict(scores, **{"neg/b": np.array([0.01, 0.2, 0.3])})
    assert G.val_criterion(better_mr) > G.val_criterion(scores)
    assert G.val_criterion(wider_gap) > G.val_criterion(scores)
    assert G.val_criterion(scores)[:2] == (1.0, 0.0)


def test_strictness_rule_looks_at_every_counted_negative_group_only() -> None:
    scores = {
        "pos/a": np.array([0.99] * 10),
        "neg/brain": np.array([0.01, 0.3]),
        "neg/cutout": np.array([0.99]),  # not counted (EXTRA_NEGATIVES)
        "neg/files_rule_rejected": np.array([0.9]),  # not counted either
    }
    assert G.strict_ok(scores)
    assert not G.strict_ok(dict(scores, **{"neg/brain": np.array([0.01, 0.95])}))
    assert not G.strict_ok(dict(scores, **{"neg/document": np.array([0.5])}))  # limit excluded


def test_a_window_under_99_percent_makes_a_candidate_ineligible() -> None:
    scores = {
        "pos/hu/W400L50/png": np.array([0.99] * 200),
        "pos/hu/W350L40/jpeg": np.array([0.99] * 97 + [0.2] * 3),  # 97 % of one window
        "pos/pseudo_mr": np.array([0.1] * 10),  # not counted (EXTRA_POSITIVES)
        "neg/brain": np.array([0.01, 0.05]),
    }
    t = G.choose_threshold(scores)
    assert G.rates(scores, t)["liver_accepted"] >= 0.99  # pooled, the target looks met
    assert not G.every_group_accepted(scores, t)
    fixed = dict(scores, **{"pos/hu/W350L40/jpeg": np.array([0.99] * 100)})
    assert G.every_group_accepted(fixed, G.choose_threshold(fixed))
    a = {"epoch": 3, "criterion": [1.0, 0.9, 5.0], "groups": False}
    b = {"epoch": 1, "criterion": [1.0, 0.5, 2.0], "groups": True}
    assert G.choose_candidate([a, b]) == (b, True)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("rel", "reaches_gate"),
    [
        # its header says neck (wrong_body_part), but a PNG export of it has no header
        ("pydicom/ct_neck__bad_sequence.dcm", True),
        ("pydicom/ct_head_j2k__J2K_pixelrep_mismatch.dcm", True),
        # colour ultrasound: not_grayscale in any format
        ("pydicom/us_generic__US1_UNCR.dcm", False),
        ("skimage/astronaut.png", False),
        ("skimage/moon.png", True),
    ],
)
def test_negative_files_count_for_the_gate_when_their_pixels_pass_without_header(
    rel: str, reaches_gate: bool, data_root: Path
) -> None:
    from ml_core import datasets as D

    grey = D.load_negative(rel)
    assert grey is not None
    assert G.headerless_rules_pass(rel, grey) is reaches_gate


def test_a_less_strict_candidate_cannot_win_on_the_criterion() -> None:
    v7 = {"epoch": 4, "ramp": [150, 600], "criterion": [1.0, 0.72, 3.0], "strict": True}
    v8 = {"epoch": 12, "ramp": [150, 600], "criterion": [1.0, 0.85, 2.5], "strict": False}
    best, passed = G.choose_candidate([v7, v8])
    assert best is v7 and passed
    # the far-slice margin rules a candidate out the same way
    low = {"epoch": 4, "ramp": [30, 150], "criterion": [1.0, 0.9, 3.5], "far_margin": False}
    assert G.choose_candidate([v7, low])[0] is v7
    # ties go to the larger (more conservative) ramp
    same = dict(v7, ramp=[60, 250])
    assert G.choose_candidate([same, v7])[0] is v7
    # nobody passes: the best is returned, flagged
    best, passed = G.choose_candidate([v8, low])
    assert best is low and not passed
    # histories written before the rules (no flags) still rank as before
    assert G.choose_candidate([{"epoch": 1, "criterion": [1.0, 0.5, 1.0]}])[1]


def test_area_ramp_and_far_margin() -> None:
    np.testing.assert_allclose(
        G.area_ramp(np.array([0, 50, 100, 325, 600, 5000]), (100, 550)), [0, 0, 0, 0.5, 1, 1]
    )
    p = np.array([0.9, 0.9])
    parts = {"neg/far_slices": (p, np.array([0.0, 40.0])), "pos/a": (p, np.array([325.0, 0]))}
    assert G.far_margin_ok(parts, (100, 550)) and not G.far_margin_ok(parts, (60, 250))
    assert G.far_margin_ok({"pos/a": parts["pos/a"]}, (30, 150))
    scores = G.combine_parts(parts, (100, 550))
    np.testing.assert_allclose(scores["pos/a"], [0.45, 0.0], rtol=1e-6)
    assert G.parse_ramps("150:600,30:150") == [(150.0, 600.0), (30.0, 150.0)]
    with pytest.raises(ValueError):
        G.parse_ramps("600:150")


def test_bundled_brain_mr_slices_are_grey_images() -> None:
    brains = G.brain_mr_slices()
    assert len(brains) >= 20
    assert all(b.dtype == np.uint8 and b.ndim == 2 and min(b.shape) >= 24 for b in brains)


def test_corrupted_gate_weights_fail_the_sha256_check_with_model_load_error(tmp_path: Path) -> None:
    (tmp_path / G.WEIGHTS_NAME).write_bytes(b"tampered")
    card = {"weights": G.WEIGHTS_NAME, "sha256": "f" * 64, "input_size": 128, "threshold": 0.5}
    (tmp_path / G.CARD_NAME).write_text(json.dumps(card))
    with pytest.raises(MLCoreError) as err:
        G.LiverGate.load(tmp_path)
    assert err.value.code == "model_load_error"


# --------------------------------------------------------------------------- shipped gate


@pytest.fixture(scope="module")
def gate() -> G.LiverGate | G.EitherGate:
    """The staged content gate as an artifact serves it (with gate_either/ when staged)."""
    if not (SHIPPED / G.CARD_NAME).is_file():
        pytest.skip("no trained gate in ml_core/models/_staging/gate")
    return G.load_gate(SHIPPED.parent)


@pytest.fixture(scope="module")
def data_root() -> Path:
    from ml_core import datasets as D

    if not D.default_root().is_dir():
        pytest.skip("../shared/data missing")
    return D.default_root()


@pytest.fixture(scope="module")
def ircadb11(data_root: Path):
    """3Dircadb1.1 (never trained on): HU volume, its liver-distance per slice, its largest liver slice."""
    from ml_core import datasets as D

    vol = D.load_hu_volume("ircadb", "3Dircadb1.1")
    dist = vol.liver_distance_mm()
    assert dist is not None
    z = int(np.argmax(vol.liver.reshape(vol.liver.shape[0], -1).sum(axis=1)))
    return vol, dist, z


def _slice_u8(data: bytes) -> np.ndarray:
    from ml_core.decoding import decode
    from ml_core.preprocessing import to_slice_u8

    return to_slice_u8(decode(data))


def _png(img: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", img)[1].tobytes()


def _jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    import cv2

    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


@pytest.mark.integration
def test_shipped_gate_with_one_flipped_byte_is_refused(tmp_path: Path) -> None:
    if not (SHIPPED / G.CARD_NAME).is_file():
        pytest.skip("no trained gate in ml_core/models/_staging/gate")
    dst = tmp_path / "gate"
    shutil.copytree(SHIPPED, dst)
    w = dst / G.WEIGHTS_NAME
    data = bytearray(w.read_bytes())
    data[-100] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(MLCoreError) as err:
        G.LiverGate.load(dst)
    assert err.value.code == "model_load_error"


@pytest.mark.integration
def test_gate_accepts_held_out_liver_slices_as_png_jpeg_and_dicom(
    gate: G.LiverGate, data_root: Path, ircadb11
) -> None:
    from ml_core import datasets as D

    vol, _dist, z = ircadb11
    msd_img = next(img for img, _m, _meta in D.iter_msd("test"))
    uploads = {
        "ircadb W400/L50 png": _png(D.window_u8(vol.hu[z], 400, 50)),
        "ircadb W350/L40 jpeg": _jpeg(D.window_u8(vol.hu[z], 350, 40)),
        "ircadb W400/L60 jpeg": _jpeg(D.window_u8(vol.hu[z - 5], 400, 60), 75),
        "msd test png": _png(msd_img),
        "pydicom abdomen CT dicom": (
            data_root / "pydicom_abdomen" / "ct_upper_abdomen__explicit_VR-UN.dcm"
        ).read_bytes(),
    }
    slices = [_slice_u8(b) for b in uploads.values()]
    scores = gate.score(slices)
    for (name, _), s in zip(uploads.items(), scores, strict=True):
        assert s >= gate.threshold, f"{name} rejected (score {s:.3f} < {gate.threshold:.3f})"


def _accepted_negative_files(gate: G.LiverGate) -> list[str]:
    from ml_core import datasets as D

    negs = list(D.iter_negatives("test"))
    assert negs
    scores = gate.score([img for img, _rel in negs])
    return [rel for (_img, rel), s in zip(negs, scores, strict=True) if s >= gate.threshold]


@pytest.mark.integration
def test_gate_rejects_every_held_out_negative_file(gate: G.LiverGate, data_root: Path) -> None:
    # including the three MNI152 brain renders (axial, coronal, sagittal) and the head CTs
    assert _accepted_negative_files(gate) == []


@pytest.mark.integration
def test_gate_rejects_a_slice_far_below_the_liver_and_its_lung_window(
    gate: G.LiverGate, ircadb11
) -> None:
    from ml_core import datasets as D

    vol, dist, z = ircadb11
    far = int(np.argmax(dist))
    assert dist[far] > G.FAR_MM
    slices = [D.window_u8(vol.hu[far], 400, 50), D.window_u8(vol.hu[z], 1500, -600)]
    assert all(s < gate.threshold for s in gate.score(slices))


@pytest.mark.integration
def test_validator_reports_not_liver_ct_for_a_far_slice_and_passes_a_liver_slice(
    gate: G.LiverGate, ircadb11
) -> None:
    from ml_core import datasets as D
    from ml_core.validation import validate

    vol, dist, z = ircadb11
    far = validate(_png(D.window_u8(vol.hu[int(np.argmax(dist))])), gate=gate)
    ok = validate(_png(D.window_u8(vol.hu[z])), gate=gate)
    assert far.reason_code == "not_liver_ct" and not far.passed
    assert ok.passed and ok.gate_threshold == gate.threshold


@pytest.mark.integration
def test_gate_accepts_99_percent_of_the_held_out_patients_liver_slices_in_every_window(
    gate: G.LiverGate, ircadb11
) -> None:
    """The stated figure: liver >= MIN_EVAL_LIVER_PX_512 px, PNG at W350-400/L40-60, 3Dircadb1.1."""
    from ml_core import datasets as D

    vol, _dist, _z = ircadb11
    px = vol.liver.reshape(vol.liver.shape[0], -1).sum(axis=1) * (512.0 * 512.0)
    zs = np.flatnonzero(px / (vol.liver.shape[1] * vol.liver.shape[2]) >= G.MIN_EVAL_LIVER_PX_512)
    assert zs.size > 50
    for w, lvl in G.EVAL_WINDOWS:
        slices = [_slice_u8(_png(D.window_u8(vol.hu[z], w, lvl))) for z in zs]
        scores = np.concatenate([gate.score(slices[i : i + 32]) for i in range(0, len(slices), 32)])
        assert (scores >= gate.threshold).mean() >= 0.99, f"W{w}/L{lvl}"


def _with_second_localiser(tmp_path: Path, *, sha: str | None = None) -> Path:
    """A tiny artifact whose gate also counts a second (differently initialised) localiser."""
    import keras

    from ml_core import localiser as L
    from ml_core.classifier import CARD, seal_card, write_untrained_artifact
    from ml_core.localiser import sha256_file

    folder = write_untrained_artifact(tmp_path / "art", gate_threshold=0.0)
    second = folder / G.SECOND_LOCALISER_DIR
    second.mkdir()
    keras.utils.set_random_seed(11)
    L.build_unet(32, 4).save_weights(str(second / L.WEIGHTS_NAME))
    lcard = json.loads((folder / "localiser" / L.CARD_NAME).read_text())
    lcard["sha256"] = sha256_file(second / L.WEIGHTS_NAME)
    (second / L.CARD_NAME).write_text(json.dumps(lcard))
    gcard = json.loads((folder / "gate" / G.CARD_NAME).read_text())
    gcard["second_localiser_sha256"] = sha or lcard["sha256"]
    (folder / "gate" / G.CARD_NAME).write_text(json.dumps(gcard))
    card = json.loads((folder / CARD).read_text())
    card["files"] = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CARD
    }
    (folder / CARD).write_text(json.dumps(seal_card(card)))
    return folder


def test_a_gate_with_a_second_localiser_counts_the_larger_liver_area(tmp_path: Path) -> None:
    from ml_core.classifier import Classifier

    gate = Classifier.load(_with_second_localiser(tmp_path), runtime="tf").gate()
    assert gate.second is not None and gate.localiser is not None
    rng = np.random.default_rng(5)
    slices = [rng.integers(0, 256, (64, 48), dtype=np.uint8) for _ in range(6)]
    _p, area = gate.score_parts(slices)
    first = gate.liver_area_px512(slices, gate.localiser.small_probabilities(slices))
    other = gate.liver_area_px512(slices, gate.second.small_probabilities(slices), gate.second)
    assert not np.array_equal(first, other)  # two different networks
    np.testing.assert_allclose(area, np.maximum(first, other))


def test_a_gate_refuses_a_second_localiser_it_was_not_calibrated_with(tmp_path: Path) -> None:
    from ml_core.classifier import Classifier

    clf = Classifier.load(_with_second_localiser(tmp_path, sha="0" * 64), runtime="tf")
    with pytest.raises(MLCoreError, match="second localiser"):
        clf.gate()


def _with_either_gate(
    tmp_path: Path, *, threshold: float = 0.5, localiser_sha: str | None = None
) -> Path:
    """A tiny artifact with a second, differently initialised gate in gate_either/."""
    from ml_core.classifier import CARD, seal_card, write_untrained_artifact
    from ml_core.localiser import sha256_file

    folder = write_untrained_artifact(
        tmp_path / "art", gate_threshold=0.5, either_gate_threshold=threshold
    )
    if localiser_sha is not None:
        either = folder / G.EITHER_GATE_DIR / G.CARD_NAME
        either.write_text(
            json.dumps({**json.loads(either.read_text()), "localiser_sha256": localiser_sha})
        )
        card = json.loads((folder / CARD).read_text())
        card["files"][f"{G.EITHER_GATE_DIR}/{G.CARD_NAME}"] = sha256_file(either)
        (folder / CARD).write_text(json.dumps(seal_card(card)))
    return folder


def test_either_gate_passes_a_slice_exactly_when_one_of_its_gates_accepts_it(
    tmp_path: Path,
) -> None:
    """Thresholds set between each gate's scores: every slice one gate accepts passes, the rest
    do not, and the union's score crosses 0.5 at the same place."""
    from ml_core.classifier import Classifier

    gate = Classifier.load(_with_either_gate(tmp_path), runtime="tf").gate()
    assert isinstance(gate, G.EitherGate) and gate.threshold == 0.5
    assert gate.other.localiser is gate.first.localiser  # the U-Net runs once for both
    rng = np.random.default_rng(8)
    slices = [rng.integers(0, 256, (64, 48), dtype=np.uint8) for _ in range(12)]
    a = np.asarray(gate.first.score(slices))
    b = np.asarray(gate.other.score(slices))
    assert not np.allclose(a, b)
    gate.first.threshold = float(np.median(a))
    gate.other.threshold = float(np.median(b))
    want = (a >= gate.first.threshold) | (b >= gate.other.threshold)
    assert 0 < want.sum() < len(slices)
    assert gate.accepts(slices) == list(want)
    union = np.asarray(gate.score(slices))
    assert list(union >= 0.5) == list(want)
    m = gate.margins(slices)
    np.testing.assert_allclose(union, 1 / (1 + np.exp(-m.max(axis=1))))


def test_validation_reports_both_gates_of_an_either_gate(tmp_path: Path) -> None:
    """The content check's detail names each gate's score and threshold; the report's score and
    threshold are the union's."""
    from ml_core.classifier import Classifier
    from ml_core.validation import validate

    gate = Classifier.load(_with_either_gate(tmp_path, threshold=0.0), runtime="tf").gate()
    report = validate(
        _png(np.random.default_rng(2).integers(0, 256, (200, 200), np.uint8)), gate=gate
    )
    content = next(c for c in report.checks if c.name == "content")
    assert report.passed and content.passed  # the second gate admits everything (threshold 0)
    assert report.gate_threshold == 0.5 and report.gate_score >= 0.5
    assert "passes when either gate accepts: gate " in content.detail
    assert "second gate" in content.detail and "(threshold 0.000)" in content.detail


def test_an_either_gate_with_a_localiser_the_first_gate_lacks_is_refused(tmp_path: Path) -> None:
    from ml_core.classifier import Classifier

    clf = Classifier.load(_with_either_gate(tmp_path, localiser_sha="0" * 64), runtime="tf")
    with pytest.raises(MLCoreError) as err:
        clf.gate()
    assert err.value.code == "model_load_error"
    assert "second gate" in str(err.value)
