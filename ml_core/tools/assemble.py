"""Assemble a model artifact from an existing one with another content gate (and its second localiser).

The classifier, its ONNX export and the localiser are copied unchanged from ``--base``; the gate
folder's card and weights come from ``--gate`` (a ``python -m ml_core.gate`` output); a gate that
counts a second localiser (``second_localiser_sha256`` in its card) gets ``--second-localiser``
copied as ``localiser_second/``, and its sha256 must match. ``--either-gate`` adds a second gate
folder as ``gate_either/`` (the slice passes when either gate accepts; ``gate.EitherGate``). The
card is renamed to ``--version`` (a base's ``status`` note dropped), its file list and sha256
re-made, the gates' ONNX entries dropped (re-make them with ``python -m ml_core export-onnx --model
OUT --parts gate[,localiser_second][,gate_either]``), and the result is
loaded as the worker loads it before this command succeeds. Nothing is evaluated: the classifier
figures in the card are the base's.

Usage: python -m ml_core.tools.assemble --base ml_core/models/liverscan-lite0-0.5.2
       --gate /work/checkpoints/gate-v14/out --second-localiser ml_core/models/liverscan-lite0-0.5.0/localiser
       --version 0.5.4 --out ml_core/models/liverscan-lite0-0.5.4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from ml_core import gate as G

GATE_FILES = (G.CARD_NAME, G.WEIGHTS_NAME)


def assemble(
    base: Path,
    gate: Path,
    out: Path,
    version: str,
    second_localiser: Path | None = None,
    either_gate: Path | None = None,
) -> dict:
    """Write ``out`` (see the module docstring) and return its sealed card."""
    from ml_core.classifier import CARD, Classifier, seal_card
    from ml_core.localiser import sha256_file

    gate_card = json.loads((gate / G.CARD_NAME).read_text())
    wants_second = G.counts_second_localiser(gate)
    if wants_second and second_localiser is None:
        raise ValueError("the gate counts a second localiser: pass --second-localiser")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --out")
    shutil.copytree(base, out, ignore=shutil.ignore_patterns("*.log", "__pycache__"))
    try:
        shutil.rmtree(out / "gate")
        (out / "gate").mkdir()
        for name in GATE_FILES:
            shutil.copy2(gate / name, out / "gate" / name)
        second_dir, either_dir = out / G.SECOND_LOCALISER_DIR, out / G.EITHER_GATE_DIR
        for folder in (second_dir, either_dir):
            if folder.exists():
                shutil.rmtree(folder)
        card = json.loads((out / CARD).read_text())
        runtimes = card.get("runtimes", {})
        for key in ("onnx_gate", "onnx_localiser_second", "onnx_gate_either"):
            runtimes.pop(key, None)
        card["version"] = version
        card.pop("status", None)
        replaced = ("gate/", G.SECOND_LOCALISER_DIR, G.EITHER_GATE_DIR)
        kept = [k for k in card["files"] if not k.startswith(replaced)]
        added = [f"gate/{name}" for name in GATE_FILES]
        if either_gate is not None:
            either_dir.mkdir()
            for name in GATE_FILES:
                shutil.copy2(either_gate / name, either_dir / name)
            added += [f"{G.EITHER_GATE_DIR}/{name}" for name in GATE_FILES]
        if wants_second and second_localiser is not None:
            copied = G.copy_localiser(second_localiser, second_dir)
            added += [f"{G.SECOND_LOCALISER_DIR}/{name}" for name in copied]
        card["files"] = {rel: sha256_file(out / rel) for rel in sorted(kept + added)}
        words = [
            f"python -m ml_core.tools.assemble --base {base} --gate {gate}",
            f"--second-localiser {second_localiser}" if wants_second else "",
            f"--either-gate {either_gate}" if either_gate is not None else "",
            f"--version {version} --out {out}",
        ]
        card.setdefault("commands", {})["assembled"] = " ".join(w for w in words if w)
        if gate_card.get("training_command"):
            card["commands"]["gate"] = gate_card["training_command"]
        (out / CARD).write_text(json.dumps(seal_card(card), indent=2))
        Classifier.load(out, runtime="tf").gate()  # as the worker loads it
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return card


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry; prints the new artifact's sha256."""
    parser = argparse.ArgumentParser(prog="python -m ml_core.tools.assemble")
    parser.add_argument("--base", type=Path, required=True, help="artifact to take the rest from")
    parser.add_argument("--gate", type=Path, required=True, help="gate folder (card + weights)")
    parser.add_argument("--second-localiser", type=Path, default=None)
    parser.add_argument(
        "--either-gate",
        type=Path,
        default=None,
        help="a second gate folder (card + weights) copied as gate_either/: either gate accepting passes",
    )
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    card = assemble(
        args.base, args.gate, args.out, args.version, args.second_localiser, args.either_gate
    )
    print(f"{args.out}: {card['name']} {card['version']} sha256 {card['sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
