"""Command line: ``python -m ml_core validate|train|evaluate|export-onnx …``.

``validate PATH… [--json] [--no-gate] [--model DIR]`` checks files or folders (recursively)
before a batch is sent: one row per file (file, passed, reason_code, failing check detail),
or one JSON object per line with ``--json``. Exit status 0 when every file passed, 1 when
any was rejected, 2 on usage errors. ``train``, ``evaluate`` and ``export-onnx`` live in
ml_core/training.py, ml_core/evaluation.py and ml_core/onnx_runtime.py (each exposes
``add_arguments(parser)`` and ``run(args) -> int``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("ml_core")

_SUBMODULES = {
    "train": ("ml_core.training", "train the liver localiser, classifier and gate"),
    "evaluate": ("ml_core.evaluation", "evaluate a model artifact and write metrics and plots"),
    "export-onnx": (
        "ml_core.onnx_runtime",
        "write classifier.onnx, localiser.onnx, gate.onnx (tf2onnx) into a model folder, checked against TensorFlow",
    ),
}


def iter_files(paths: Sequence[str]) -> Iterator[Path]:
    """Yield the given files and every file under the given folders, sorted, hidden ones skipped."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not any(
                    p.startswith(".") for p in child.relative_to(path).parts
                ):
                    yield child
        else:
            yield path


def _load_gate(model_dir: str | None) -> Any:
    """Load the content gate shipped with the classifier (imports TensorFlow lazily)."""
    from ml_core.classifier import Classifier, default_model_path

    classifier = Classifier.load(model_dir or default_model_path())
    return classifier.gate()


def _row(path: Path, report: dict[str, Any]) -> dict[str, Any]:
    failing = next((c for c in report["checks"] if not c["passed"]), None)
    return {
        "file": str(path),
        "passed": report["passed"],
        "reason_code": report["reason_code"],
        "detail": failing["detail"] if failing else "",
        "validation": report,
    }


def _volume_rows(path: Path, gate: Any) -> list[dict[str, Any]]:
    """One row per axial slice of a NIfTI volume (rows named ``file#z=<index>``)."""
    from ml_core.decoding import decode_volume
    from ml_core.errors import MLCoreError
    from ml_core.validation import validate_image

    modality = "MR" if "_mr" in path.name.lower() or "mri" in path.name.lower() else "CT"
    rows = []
    try:
        for z, image in enumerate(decode_volume(path, modality=modality)):
            rows.append(_row(Path(f"{path}#z={z}"), validate_image(image, gate=gate).to_dict()))
    except MLCoreError as exc:
        rows.append(
            {
                "file": str(path),
                "passed": False,
                "reason_code": exc.code,
                "detail": str(exc),
                "validation": None,
            }
        )
    return rows


def run_validate(args: argparse.Namespace) -> int:
    """Validate every file under ``args.paths`` and print a table or JSON lines; 0 if all passed."""
    from ml_core.validation import validate

    gate = None
    if not args.no_gate:
        try:
            gate = _load_gate(args.model)
        except Exception as exc:  # noqa: BLE001 - report any load failure plainly, then stop
            log.error(
                "cannot load the content gate (%s: %s); use --no-gate to run the rule layers only",
                type(exc).__name__,
                exc,
            )
            return 2
    files = list(iter_files(args.paths))
    if not files:
        log.error("no files found under %s", " ".join(args.paths))
        return 2
    rows: list[dict[str, Any]] = []
    for path in files:
        if path.name.endswith((".nii", ".nii.gz")):
            rows.extend(_volume_rows(path, gate))
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            rows.append(
                {
                    "file": str(path),
                    "passed": False,
                    "reason_code": "unreadable",
                    "detail": exc.strerror or type(exc).__name__,
                    "validation": None,
                }
            )
            continue
        rows.append(_row(path, validate(data, gate=gate).to_dict()))
    out = sys.stdout
    if args.json:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    else:
        width = min(60, max(len("file"), *(len(r["file"]) for r in rows)))
        out.write(f"{'file':<{width}}  {'passed':<6}  {'reason_code':<28}  detail\n")
        for r in rows:
            name = r["file"] if len(r["file"]) <= width else "…" + r["file"][-(width - 1) :]
            out.write(
                f"{name:<{width}}  {str(r['passed']).lower():<6}  "
                f"{r['reason_code'] or '-':<28}  {r['detail']}\n"
            )
        passed = sum(1 for r in rows if r["passed"])
        out.write(
            f"{passed}/{len(rows)} passed" + ("" if gate else " (content gate not run)") + "\n"
        )
    return 0 if all(r["passed"] for r in rows) else 1


def build_parser(selected: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """Build the parser, importing only the ``selected`` subcommand's module (TensorFlow is slow).

    Returns the parser and the subcommands whose module is missing from this checkout.
    """
    parser = argparse.ArgumentParser(prog="python -m ml_core", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subs = parser.add_subparsers(dest="command", required=True)
    v = subs.add_parser("validate", help="validate files or folders before sending them")
    v.add_argument("paths", nargs="+", help="files or folders (folders recurse)")
    v.add_argument("--json", action="store_true", help="one JSON object per file per line")
    v.add_argument("--no-gate", action="store_true", help="rule layers only; skip the content gate")
    v.add_argument("--model", metavar="DIR", help="model artifact folder (default: shipped model)")
    v.set_defaults(handler=run_validate)
    missing: dict[str, str] = {}
    for name, (module_name, help_text) in _SUBMODULES.items():
        sub = subs.add_parser(name, help=help_text)
        if name != selected:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            missing[name] = module_name
            continue
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser, missing


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m ml_core``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if "-v" in argv or "--verbose" in argv else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser, missing = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command in missing:
        log.error(
            "'%s' is not available: module %s is not installed in this checkout",
            args.command,
            missing[args.command],
        )
        return 2
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
