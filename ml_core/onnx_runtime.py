"""Forward passes through ONNX Runtime: export (tf2onnx) and verified sessions, for three parts.

The parts of an artifact that serve through ONNX Runtime (``PARTS``): the classifier's compiled
forward of ``ml_core.gradcam.make_forward`` (images float32 (N, S, S, 3) 0..255 -> logits (N,),
CAM (N, h, w) in [0, 1]), the localiser U-Net's (grey float32 (N, s, s, 1) 0..255 -> liver
probability (N, s, s, 1)) and the gate CNN's (grey float32 (N, g, g, 1) 0..255 -> P_cnn (N,)),
each one call at a dynamic batch. ``export`` converts them into ``classifier.onnx``,
``localiser/localiser.onnx`` and ``gate/gate.onnx``, checks ONNX Runtime against TensorFlow on
``check`` inputs, and records each file's sha256, the sha256 of the weights it was made from
and the differences in the artifact's card under ``runtimes.<key>`` (``onnx``,
``onnx_localiser``, ``onnx_gate``). The card's top-level ``files``/``sha256`` (the artifact
identity every job records) are not changed: the ONNX files are derived, verified copies of
the same weights.

``forward_for`` is the one place that decides, per part, between TensorFlow and ONNX Runtime
("auto" / "tf" / "onnx"); ``load_forward`` opens a session only when the file matches its
sha256 and was made from the verified weights (else ModelLoadError). onnxruntime is the
serving dependency (the ``ml`` extra); tf2onnx and onnx are needed by ``export`` only (the
``onnx-export`` extra). Both are imported lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_core.errors import ModelLoadError

log = logging.getLogger(__name__)

ONNX_FILE = "classifier.onnx"
OPSET = 17
#: Largest |ONNX Runtime - TensorFlow| accepted on the check inputs, for every output.
TOLERANCE = 1e-3
DEFAULT_THREADS = 2
#: What runs a forward: "auto" (ONNX Runtime when a verified export is listed), "tf", "onnx".
RUNTIMES = ("auto", "tf", "onnx")
ARTIFACT_CARD = "model_card.json"


@dataclass(frozen=True)
class Part:
    """An exportable forward: its key under the card's ``runtimes``, its file in the artifact,
    and its serving session's intra-op threads."""

    key: str
    file: str
    threads: int


#: The small U-Net and gate CNN run at 1 intra-op thread: on 2 shared cores, 2 spinning threads
#: per session made them ~2x slower than TensorFlow (docs/model_gate.md, "ONNX Runtime for the
#: localiser and the gate", runs A and B).
PARTS = {
    "classifier": Part("onnx", ONNX_FILE, DEFAULT_THREADS),
    "localiser": Part("onnx_localiser", "localiser/localiser.onnx", 1),
    "gate": Part("onnx_gate", "gate/gate.onnx", 1),
    "localiser_second": Part("onnx_localiser_second", "localiser_second/localiser.onnx", 1),
    "gate_either": Part("onnx_gate_either", "gate_either/gate.onnx", 1),
}


def available() -> bool:
    """True when onnxruntime imports."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def onnx_entry(card: dict[str, Any], part: str = "classifier") -> dict[str, Any] | None:
    """The card's ``runtimes`` entry of ``part`` (``runtimes.onnx`` for the classifier), or None."""
    entry = (card.get("runtimes") or {}).get(PARTS[part].key)
    return entry if isinstance(entry, dict) else None


#: The card fields the classifier's compiled forward is built from (``Classifier.load``): an
#: export made for other values computes other logits (e.g. ``score_stride``), so it is refused.
FORWARD_INPUT_KEYS = ("size", "head", "output_stride", "score_stride")


def forward_spec(card: dict[str, Any]) -> dict[str, Any]:
    """What the classifier's forward is built from, per the card: backbone and FORWARD_INPUT_KEYS."""
    given = card.get("input") or {}
    return {"backbone": card.get("backbone"), **{k: given.get(k) for k in FORWARD_INPUT_KEYS}}


def artifact_card(folder: Path) -> dict[str, Any]:
    """The artifact card at <folder>/model_card.json as JSON, or {} (a localiser or gate folder alone).

    Only its ``runtimes`` entries are used from here: each binds an ONNX file to the sha256 of
    weights that the part's own loader has verified.
    """
    try:
        card = json.loads((Path(folder) / ARTIFACT_CARD).read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


class OnnxForward:
    """Callable input float32 -> the tuple of the graph's outputs, like the TensorFlow forward's."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self._input = session.get_inputs()[0].name

    def __call__(self, x: Any) -> tuple[np.ndarray, ...]:
        return tuple(self._session.run(None, {self._input: np.ascontiguousarray(x, np.float32)}))


def load_forward(
    folder: Path,
    card: dict[str, Any],
    part: str = "classifier",
    *,
    weights_sha256: str | None = None,
    threads: int | None = None,
) -> OnnxForward:
    """ONNX Runtime forward of ``part``'s file in the artifact ``folder`` after its checks; ModelLoadError if not.

    ``weights_sha256``: of the weights the caller has verified (default: the classifier's,
    from the card's ``files``); an export recorded for other weights is refused. ``threads``:
    intra-op threads (default the part's, ``PARTS``).
    """
    try:
        import onnxruntime  # noqa: F401  (a clear error before anything else)
    except ImportError as exc:
        raise ModelLoadError(
            "runtime 'onnx' needs onnxruntime (pip install onnxruntime, in the 'ml' extra)"
        ) from exc
    spec = PARTS[part]
    entry = onnx_entry(card, part)
    if entry is None:
        raise ModelLoadError(
            f"model card has no runtimes.{spec.key} entry ({spec.file} not exported)"
        )
    path = Path(folder) / str(entry.get("file", spec.file))
    if not path.is_file():
        raise ModelLoadError(f"model file missing: {path.name}")
    from ml_core.classifier import WEIGHTS, sha256_file

    if sha256_file(path) != entry.get("sha256"):
        raise ModelLoadError(f"model file fails its sha256 check: {path.name}")
    if weights_sha256 is None:
        weights_sha256 = (card.get("files") or {}).get(str(card.get("weights", WEIGHTS)))
    if entry.get("weights_sha256") != weights_sha256:
        raise ModelLoadError(f"{path.name} was exported from other weights than the {part}'s")
    if part == "classifier" and entry.get("forward_spec") != forward_spec(card):
        raise ModelLoadError(
            f"{path.name} was exported for another forward than the card's input "
            f"({', '.join(FORWARD_INPUT_KEYS)}); re-run export-onnx"
        )
    try:
        session = open_session(path, spec.threads if threads is None else threads)
    except Exception as exc:  # noqa: BLE001 - any ORT failure is a load failure
        raise ModelLoadError(
            f"{path.name} does not load in onnxruntime: {type(exc).__name__}"
        ) from exc
    return OnnxForward(session)


def forward_for(
    folder: Path,
    card: dict[str, Any],
    part: str,
    runtime: str,
    *,
    weights_sha256: str | None = None,
) -> OnnxForward | None:
    """What serves ``part``: an ONNX Runtime forward, or None for TensorFlow. The one place deciding.

    "tf": None. "onnx": ``load_forward`` (ModelLoadError when onnxruntime is missing, the card
    lists no export, or it fails a check). "auto": ONNX Runtime when onnxruntime imports and
    the card lists an export, else None; an export failing its checks gives None with a
    warning (the weights themselves are verified, so serving continues in TensorFlow).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    if runtime == "tf":
        return None
    if runtime == "onnx":
        return load_forward(folder, card, part, weights_sha256=weights_sha256)
    if onnx_entry(card, part) is None or not available():
        return None
    try:
        return load_forward(folder, card, part, weights_sha256=weights_sha256)
    except ModelLoadError as exc:
        log.warning("serving the %s through TensorFlow: %s", part, exc)
        return None


def open_session(path: Path, threads: int = DEFAULT_THREADS) -> Any:
    """An ONNX Runtime CPU session of ``path`` (no checks): ``threads`` intra-op, full graph optimisation."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def convert(function: Any, input_shape: tuple[Any, ...], path: Path, opset: int = OPSET) -> None:
    """Convert a tf.function of one float32 input of ``input_shape`` (batch None) to ONNX at ``path``.

    A function compiled with its own ``input_signature`` is converted at that signature.
    """
    import tensorflow as tf
    import tf2onnx

    spec = getattr(function, "input_signature", None) or (
        tf.TensorSpec(input_shape, tf.float32, name="image"),
    )
    tf2onnx.convert.from_function(
        function, input_signature=spec, opset=opset, output_path=str(path)
    )


def check_inputs(clf: Any, volume: Path | None = None, n: int = 16, seed: int = 0) -> np.ndarray:
    """Classifier inputs float32 (n, S, S, 3) for the export check: noise 0..255, or liver crops of ``volume``.

    ``volume``: an .npz with ``ct_hu`` (Z, H, W) HU and ``liver`` (Z, H, W) bool (3D-IRCADb as
    stored under ../shared/data/ircadb); ``n`` slices spread over the liver, windowed W400/L50,
    cropped by the card's rule (margin, crop floor) around the reference liver mask.
    """
    size = clf.input_size
    if volume is None:
        rng = np.random.default_rng(seed)
        return rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    from ml_core.classifier import crop, square_box, to_model_input
    from ml_core.preprocessing import window

    with np.load(volume) as d:
        hu, liver = d["ct_hu"], d["liver"]
    zs = np.nonzero(liver.reshape(len(liver), -1).any(axis=1))[0]
    picks = zs[np.linspace(0, len(zs) - 1, n).round().astype(int)]
    crops = []
    for z in picks:
        box = square_box(liver[z], clf._spec.margin, clf._spec.min_side_frac)
        assert box is not None  # z has liver
        crops.append(crop(window(hu[z]), box, size))
    return to_model_input(crops)


def slice_inputs(size: int, volume: Path | None = None, n: int = 16, seed: int = 0) -> np.ndarray:
    """Localiser / gate inputs float32 (n, size, size, 1) 0..255: noise, or letterboxed slices of ``volume``.

    ``volume`` as for ``check_inputs``; ``n`` slices spread over the whole volume (liver and
    far from it), windowed W400/L50.
    """
    if volume is None:
        rng = np.random.default_rng(seed)
        return rng.uniform(0, 255, (n, size, size, 1)).astype(np.float32)
    from ml_core.localiser import to_input
    from ml_core.preprocessing import window

    with np.load(volume) as d:
        hu = d["ct_hu"]
    picks = np.linspace(0, len(hu) - 1, n).round().astype(int)
    return to_input([window(hu[z]) for z in picks], size)[0]


@dataclass
class _Job:
    """One part to export: the TensorFlow function, its input shape, check inputs and weights."""

    part: str
    function: Any
    input_shape: tuple[Any, ...]
    x: np.ndarray
    outputs: tuple[str, ...]
    weights: str  # the weights file, relative to the artifact folder
    weights_sha256: str
    check: str  # what the check inputs are, for the card
    forward: dict[str, Any] | None = None  # the classifier's forward_spec; None for other parts


def _second_localiser(clf: Any) -> Any:
    second = clf.gate().second
    if second is None:
        raise ModelLoadError(
            "the gate has no second localiser (its card names none): nothing to export"
        )
    return second


def _either_gate(clf: Any) -> Any:
    gate = clf.gate()
    if not hasattr(gate, "other"):
        raise ModelLoadError("the artifact has no gate_either/: nothing to export")
    return gate.other


def _first_gate(clf: Any) -> Any:
    gate = clf.gate()
    return getattr(gate, "first", gate)


def _jobs(clf: Any, card: dict[str, Any], parts: list[str], volume: Path | None) -> list[_Job]:
    from ml_core.classifier import WEIGHTS

    where = f"{Path(volume).name} (W400/L50)" if volume else "uniform-noise images 0..255 (seed 0)"
    jobs = []
    for part in parts:
        if part == "classifier":
            size = clf.input_size
            x = check_inputs(clf, volume)
            weights = str(card.get("weights", WEIGHTS))
            jobs.append(
                _Job(
                    part,
                    clf._forward,
                    (None, size, size, 3),
                    x,
                    ("logit", "cam"),
                    weights,
                    card["files"][weights],
                    f"{len(x)} liver crops of {where}" if volume else f"{len(x)} {where}",
                    forward_spec(card),
                )
            )
            continue
        model = {
            "localiser": lambda: clf._localiser,
            "gate": lambda: _first_gate(clf),
            "localiser_second": lambda: _second_localiser(clf),
            "gate_either": lambda: _either_gate(clf),
        }[part]()
        size = int(model.input_size)
        x = slice_inputs(size, volume)
        jobs.append(
            _Job(
                part,
                model._forward,
                (None, size, size, 1),
                x,
                ("probability",),
                f"{part}/{model.card.get('weights')}",
                str(model.card.get("sha256")),
                f"{len(x)} slices spread over {where}, letterboxed to {size} px"
                if volume
                else f"{len(x)} {where}",
            )
        )
    return jobs


def _convert_and_check(
    folder: Path, job: _Job, opset: int, threads: int | None
) -> tuple[Path, dict[str, Any]]:
    """Convert ``job`` to a temporary file and check it against TensorFlow; (that file, its entry).

    Raises ModelLoadError, removing the temporary file, when the export does not convert, does
    not run in ONNX Runtime, or differs from TensorFlow by more than TOLERANCE.
    """
    import tensorflow as tf

    spec = PARTS[job.part]
    path = folder / spec.file
    tmp = path.with_suffix(".onnx.tmp")
    t0 = time.perf_counter()
    try:
        convert(job.function, job.input_shape, tmp, opset)
    except Exception as exc:  # noqa: BLE001 - an op tf2onnx cannot convert, at this opset
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"tf2onnx cannot convert the {job.part}'s forward: {type(exc).__name__}: {exc}"
        ) from exc
    seconds = time.perf_counter() - t0
    from ml_core.classifier import sha256_file

    entry: dict[str, Any] = {
        "file": spec.file,
        "sha256": sha256_file(tmp),
        "weights_sha256": job.weights_sha256,
        **({"forward_spec": job.forward} if job.forward is not None else {}),
    }
    # Check the new file under its temporary name: a failed export leaves any previous one intact.
    probe: dict[str, Any] = {
        "runtimes": {spec.key: {**entry, "file": str(tmp.relative_to(folder))}}
    }
    if job.forward is not None:  # the card fields the entry was made for
        probe["backbone"] = job.forward["backbone"]
        probe["input"] = {k: job.forward[k] for k in FORWARD_INPUT_KEYS}
    try:
        forward = load_forward(
            folder, probe, job.part, weights_sha256=job.weights_sha256, threads=threads
        )
        reference = job.function(tf.constant(job.x))
        if not isinstance(reference, (tuple, list)):
            reference = (reference,)
        ours = forward(job.x)
        diffs = {
            name: float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for name, a, b in zip(job.outputs, reference, ours, strict=True)
        }
    except ModelLoadError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a graph input tf2onnx left unbound
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"the {job.part}'s ONNX export does not run in onnxruntime: {type(exc).__name__}: {exc}"
        ) from exc
    measured = ", ".join(f"max |d{k}| {v:.2e}" for k, v in diffs.items())
    if not all(d <= TOLERANCE for d in diffs.values()):
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(
            f"the {job.part}'s ONNX export differs from TensorFlow: {measured}"
            f" (tolerance {TOLERANCE:g})"
        )
    import onnx
    import onnxruntime
    import tf2onnx

    entry.update(
        {
            "opset": opset,
            "converter": {
                "tf2onnx": tf2onnx.__version__,
                "onnx": onnx.__version__,
                "tensorflow": tf.__version__,
            },
            "checked_with": {"onnxruntime": onnxruntime.__version__},
            "check_inputs": job.check,
            **{f"max_abs_diff_{k}": v for k, v in diffs.items()},
            "tolerance": TOLERANCE,
            "size_bytes": tmp.stat().st_size,
            "note": f"derived from {job.weights} (weights_sha256); the card is re-sealed with it",
        }
    )
    log.info(
        "%s: %.1f MB, converted in %.0f s, %s",
        spec.file,
        entry["size_bytes"] / 1e6,
        seconds,
        measured,
    )
    return tmp, entry


def export(
    folder: str | Path,
    *,
    opset: int = OPSET,
    volume: Path | None = None,
    threads: int | None = None,
    parts: tuple[str, ...] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the ONNX files of ``parts`` into the artifact ``folder``, each checked, and record them in the card.

    ``parts``: of ``PARTS``; default every part the folder holds (the classifier, and the
    localiser and gate when their folders are there).

    Returns the card entries by part. Raises ModelLoadError, leaving the folder as it was,
    when any part does not convert, does not run in ONNX Runtime or differs from TensorFlow by
    more than TOLERANCE: the files replace the old ones only once every part has passed.
    """
    from ml_core.classifier import CARD, Classifier, read_card, seal_card

    folder = Path(folder)
    if parts is None:  # every part the artifact serves (a leftover localiser_second/ is not one)
        parts = tuple(p for p in PARTS if p == "classifier" or _serves(folder, p))
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; of {', '.join(PARTS)}")
    clf = Classifier.load(folder, runtime="tf")
    card = read_card(folder)
    done: list[tuple[Path, dict[str, Any]]] = []
    try:
        for job in _jobs(clf, card, list(parts), volume):
            done.append(_convert_and_check(folder, job, opset, threads))
    except BaseException:
        for tmp, _entry in done:
            tmp.unlink(missing_ok=True)
        raise
    runtimes = card.setdefault("runtimes", {})
    out = {}
    for part, (tmp, entry) in zip(parts, done, strict=True):
        tmp.replace(folder / entry["file"])
        runtimes[PARTS[part].key] = entry
        out[part] = entry
    (folder / CARD).write_text(json.dumps(seal_card(card), indent=2))  # runtimes are served
    return out


def _serves(folder: Path, part: str) -> bool:
    """Whether the artifact ``folder`` serves ``part`` (its folder exists; the second localiser
    and the second gate only as ``gate.optional_parts`` says, as the loader reads them)."""
    from ml_core import gate as G

    optional = part in (G.SECOND_LOCALISER_DIR, G.EITHER_GATE_DIR)
    return (folder / part).is_dir() and (not optional or part in G.optional_parts(folder))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m ml_core export-onnx``."""
    parser.add_argument("--model", required=True, metavar="DIR", help="model artifact folder")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument(
        "--volume",
        type=Path,
        default=None,
        help="check on liver crops / slices of this .npz (ct_hu, liver), e.g. ../shared/data/ircadb/3Dircadb1.7.npz; default noise",
    )
    parser.add_argument(
        "--parts",
        default=None,
        help=f"comma-separated parts to export, of {','.join(PARTS)} (default: every part the "
        "folder holds); the others stay as they are",
    )


def run(args: argparse.Namespace) -> int:
    """Export and print the card entries as JSON; 0 on success, 1 when it fails, 2 without tf2onnx/onnx."""
    parts = None if args.parts is None else tuple(p.strip() for p in args.parts.split(","))
    try:
        entries = export(args.model, opset=args.opset, volume=args.volume, parts=parts)
    except ModuleNotFoundError as exc:
        if exc.name not in ("tf2onnx", "onnx", "onnxruntime"):
            raise
        log.error("export-onnx needs %s: pip install -e '.[ml,onnx-export]'", exc.name)
        return 2
    except (ModelLoadError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    print(json.dumps(entries, indent=2))
    return 0
