"""`python -m ml_core.tools.assemble`: an artifact from another one with a new gate (and the gate's
second localiser), loadable as the worker loads it, its provenance in the card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ml_core import gate as G
from ml_core.classifier import CARD, Classifier, write_untrained_artifact
from ml_core.errors import MLCoreError
from ml_core.localiser import sha256_file
from ml_core.tools.assemble import assemble, main


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base artifact, a gate folder counting a second localiser, that localiser's folder)."""
    base = write_untrained_artifact(tmp_path / "base", gate_threshold=0.0)
    gate = tmp_path / "gate-out"
    shutil.copytree(base / "gate", gate)
    card = json.loads((gate / G.CARD_NAME).read_text())
    card["second_localiser_sha256"] = sha256_file(base / "localiser" / "localiser.weights.h5")
    card["threshold"] = 0.25
    card["training_command"] = "python -m ml_core.gate --rescore …"
    (gate / G.CARD_NAME).write_text(json.dumps(card))
    return base, gate, base / "localiser"


def test_assembled_artifact_serves_the_new_gate_with_its_second_localiser(
    parts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, gate, second = parts
    out = tmp_path / "models" / "liverscan-b0-9.9.9"
    main(["--base", str(base), "--gate", str(gate), "--second-localiser", str(second),
          "--version", "9.9.9", "--out", str(out)])  # fmt: skip
    clf = Classifier.load(out, runtime="tf")
    assert clf.info.version == "9.9.9"
    served = clf.gate()
    assert served.threshold == 0.25 and served.second is not None
    card = json.loads((out / CARD).read_text())
    assert f"{G.SECOND_LOCALISER_DIR}/localiser.weights.h5" in card["files"]
    assert card["commands"]["assembled"].startswith("python -m ml_core.tools.assemble --base")
    assert card["commands"]["gate"] == "python -m ml_core.gate --rescore …"
    base_card = json.loads((base / CARD).read_text())
    assert card["files"]["classifier.weights.h5"] == base_card["files"]["classifier.weights.h5"]


def test_a_gate_counting_a_second_localiser_needs_it_and_nothing_is_left_behind(
    parts: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, gate, _second = parts
    with pytest.raises(ValueError, match="second localiser"):
        assemble(base, gate, tmp_path / "a", "9.9.9")
    assert not (tmp_path / "a").exists()
    wrong = tmp_path / "wrong-localiser"
    shutil.copytree(base / "localiser", wrong)
    (wrong / "localiser.weights.h5").write_bytes(b"other weights")  # sha256 no longer matches
    with pytest.raises(MLCoreError, match="sha256"):  # the localiser's own card refuses it
        assemble(base, gate, tmp_path / "b", "9.9.9", wrong)
    assert not (tmp_path / "b").exists()
    with pytest.raises(FileExistsError):
        assemble(base, gate, base, "9.9.9", base / "localiser")
