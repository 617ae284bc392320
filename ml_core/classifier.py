"""The tumor classifier: EfficientNet on the liver crop, CAM in the forward pass, a versioned artifact.

Pipeline of ``Classifier.predict``: liver mask from the localiser shipped in the same artifact
folder -> square box around the liver (margin) -> crop resized to S x S (aspect kept, zero
padding outside the slice) -> one batched compiled forward returning (logits, CAM) ->
calibrated sigmoid((logit - offset) / T) -> label by the slice-level threshold -> CAM mapped back onto
the full slice. TensorFlow is imported lazily (never at ``import ml_core``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_core import onnx_runtime
from ml_core.errors import ModelLoadError
from ml_core.onnx_runtime import RUNTIMES
from ml_core.types import ModelInfo, Prediction

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent / "models"
CARD = "model_card.json"
WEIGHTS = "classifier.weights.h5"
DEFAULT_INPUT = 128
DEFAULT_MARGIN = 0.10
HEADS = ("gap", "max")


def default_model_path() -> Path:
    """Folder of the default artifact: ml_core/models/<name in ml_core/models/CURRENT>."""
    current = MODELS_DIR / "CURRENT"
    try:
        name = current.read_text().strip()
    except OSError as exc:
        raise ModelLoadError("no default model: ml_core/models/CURRENT is missing") from exc
    return MODELS_DIR / name


def build_network(
    input_size: int = DEFAULT_INPUT,
    backbone: str = "b0",
    dropout: float = 0.2,
    *,
    pretrained: bool = False,
    head: str = "gap",
    output_stride: int = 32,
    score_stride: int | None = None,
) -> Any:
    """Keras model images float32 (N, S, S, 3) 0..255 -> [logit (N, 1), last feature maps (N, s, s, K)].

    backbone "b0": keras.applications.EfficientNetB0(weights=None); "lite0": ml_core.lite0's
    EfficientNet-Lite0, with its ImageNet weights when ``pretrained`` (training start only), at
    ``output_stride`` 32 or 16, or 8 (lite0 only; 8 is the stride-16 network run atrous, for
    weights trained at 16: the same weights file loads, the map is twice as fine and holds the
    stride-16 map as its odd-position subgrid, see ``ml_core.lite0.build_lite0``).

    head "gap": global average pooling -> dropout -> one linear unit (the logit).
    head "max": dropout -> the same linear unit at every feature-map cell (a logit per cell of
    the crop) -> the slice logit is their maximum. Training can then supervise each cell with
    the synthetic lesion mask; Grad-CAM stays exactly relu(sum_k w_k A_k) (ml_core.gradcam).
    ``score_stride`` 16 with ``output_stride`` 8 (max head): the logit is the maximum over the
    odd-position cells only, i.e. exactly the stride-16 network's logit, while the feature maps
    (and so the CAM, the exact Grad-CAM of that logit over them) keep all stride-8 cells.
    """
    import keras

    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}")
    subgrid = (head, output_stride, score_stride) == ("max", 8, 16)
    if score_stride not in (None, output_stride) and not subgrid:
        raise ValueError("score_stride 16 needs the max head at output_stride 8 (atrous)")
    inp = keras.Input((input_size, input_size, 3), name="image")
    if backbone == "b0":
        if output_stride != 32:
            raise ValueError("the b0 backbone has output stride 32 only")
        base = keras.applications.EfficientNetB0(
            weights=None, include_top=False, input_shape=(input_size, input_size, 3)
        )
    elif backbone == "lite0":
        from ml_core.lite0 import build_lite0

        base = build_lite0(
            (input_size, input_size, 3),
            include_top=False,
            weights_path="imagenet" if pretrained else None,
            output_stride=output_stride,
        )
    else:
        raise ValueError(f"unknown backbone {backbone!r}")
    feats = base(inp)
    if head == "gap":
        x = keras.layers.GlobalAveragePooling2D(name="gap")(feats)
        x = keras.layers.Dropout(dropout, name="dropout")(x)
        logit = keras.layers.Dense(1, name="logit")(x)
    else:
        x = keras.layers.Dropout(dropout, name="dropout")(feats)
        cells = keras.layers.Dense(1, name="logit")(x)  # (N, s, s, 1): one logit per cell
        if subgrid:
            cells = cells[:, 1::2, 1::2, :]  # the stride-16 cells (ml_core.lite0.build_lite0)
        logit = keras.layers.GlobalMaxPooling2D(name="max")(cells)
    return keras.Model(inp, [logit, feats], name=f"liverscan_{backbone}")


def cell_logits(network: Any, feats: Any) -> Any:
    """Per-cell logits (N, s, s) of a "max"-head network from its feature maps (no dropout)."""
    import tensorflow as tf

    dense = network.get_layer("logit")
    return tf.einsum("nhwk,k->nhw", feats, tf.reshape(dense.kernel, [-1])) + dense.bias[0]


def calibrated_probability(logits: Any, temperature: float, offset: float = 0.0) -> Any:
    """sigmoid((logit - offset) / temperature): the model card's calibration (offset 0 = temperature scaling)."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(logits, np.float64) - offset) / temperature))


def square_box(
    mask: np.ndarray, margin: float = DEFAULT_MARGIN, min_side_frac: float = 0.0
) -> tuple[int, int, int, int] | None:
    """Square box (y0, x0, y1, x1) around a bool mask's bounding box plus ``margin`` per side; None if empty.

    The side is at least ``min_side_frac`` of the mask's (the slice's) longer side, same centre,
    which bounds how far a small liver cross-section is magnified (the card's
    ``input.min_side_frac``). May extend past the image; ``crop`` zero-pads there.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    side = int(round(max(y1 - y0, x1 - x0) * (1.0 + 2.0 * margin)))
    side = max(side, int(round(min_side_frac * max(mask.shape[:2]))), 16)
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    by0, bx0 = int(round(cy - side / 2.0)), int(round(cx - side / 2.0))
    return by0, bx0, by0 + side, bx0 + side


def crop(image: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop image (H, W) to box (zero outside the image) and resize to float32 (size, size)."""
    import cv2

    h, w = image.shape[:2]
    y0, x0, y1, x1 = box
    out = np.zeros((y1 - y0, x1 - x0), np.float32)
    sy0, sx0, sy1, sx1 = max(0, y0), max(0, x0), min(h, y1), min(w, x1)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    interp = cv2.INTER_AREA if out.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(out, (size, size), interpolation=interp)


def to_model_input(crops: list[np.ndarray]) -> np.ndarray:
    """Stack grey crops (S, S) 0..255 into float32 (N, S, S, 3)."""
    x = np.stack([c.astype(np.float32) for c in crops])
    return np.repeat(x[..., None], 3, axis=-1)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def combined_sha256(files: dict[str, str]) -> str:
    """One sha256 over the sorted (name, sha256) pairs of an artifact's files."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}:{files[name]}\n".encode())
    return h.hexdigest()


#: Card fields that decide what a loaded artifact outputs (besides its files): the identity
#: ``sha256`` covers them, so a re-fitted threshold or an edited input is a new identity that
#: jobs, reports and FHIR/DICOM records name, and an unsealed edit refuses to load.
SERVING_FIELDS = (
    "backbone",
    "weights",
    "input",
    "window",
    "threshold",
    "temperature",
    "logit_offset",
    "runtimes",
)


def artifact_sha256(card: dict[str, Any]) -> str:
    """An artifact's identity: the sha256 of its files' sha256s and of its serving card fields."""
    serving = {k: card[k] for k in SERVING_FIELDS if k in card}
    h = hashlib.sha256(combined_sha256(card["files"]).encode())
    h.update(json.dumps(serving, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def seal_card(card: dict[str, Any]) -> dict[str, Any]:
    """Set ``card["sha256"]`` from its files and serving fields (after any change to either)."""
    card["sha256"] = artifact_sha256(card)
    return card


@dataclass(frozen=True)
class _Spec:
    input_size: int
    margin: float
    backbone: str
    threshold: float
    temperature: float
    head: str = "gap"
    output_stride: int = 32
    logit_offset: float = 0.0
    min_side_frac: float = 0.0
    cam_offset_cells: float = 0.0
    score_stride: int | None = None


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


class Classifier:
    """A loaded artifact: localiser + EfficientNet classifier + content gate."""

    info: ModelInfo
    #: What runs the classifier's forward: "tensorflow" or "onnxruntime" (the localiser's and
    #: the gate's: their own ``runtime``).
    runtime: str

    def __init__(
        self,
        network: Any,
        spec: _Spec,
        info: ModelInfo,
        folder: Path | None,
        localiser: Any,
        forward: Any = None,
        *,
        runtime_choice: str = "tf",
        card: dict[str, Any] | None = None,
    ) -> None:
        from ml_core.gradcam import make_forward

        self._network = network
        self._spec = spec
        self.info = info
        self._folder = folder
        self._localiser = localiser
        self._forward = forward if forward is not None else make_forward(network)
        self.runtime = "tensorflow" if forward is None else "onnxruntime"
        self._gate: Any = None
        self._runtime_choice = runtime_choice  # the gate, loaded later, is served the same way
        self._card = card or {}

    @property
    def threshold(self) -> float:
        """Slice-level decision threshold on the calibrated probability."""
        return self._spec.threshold

    @property
    def logit_offset(self) -> float:
        """Offset subtracted from the logit before the temperature (Platt scaling; 0 = temperature only)."""
        return self._spec.logit_offset

    @property
    def head(self) -> str:
        """The network head: "gap" (pooled) or "max" (a logit per cell, slice = maximum)."""
        return self._spec.head

    @property
    def cam_cells(self) -> int:
        """Side of the CAM grid over the liver crop (e.g. 8 for 8 x 8 cells)."""
        return int(self._network.outputs[1].shape[1])

    @property
    def input_size(self) -> int:
        """Side in px of the liver crop the network sees."""
        return self._spec.input_size

    @property
    def temperature(self) -> float:
        """Temperature dividing the logit before the sigmoid."""
        return self._spec.temperature

    @classmethod
    def load(cls, path: str | Path, runtime: str = "auto") -> Classifier:
        """Load an artifact folder; verify the sha256 of every file in model_card.json, else ModelLoadError.

        ``runtime`` runs the forwards of the classifier (logits + CAM), the localiser and the
        gate (``gate()``): "tf" TensorFlow compiled functions; "onnx" ONNX Runtime on the
        folder's verified ``classifier.onnx``, ``localiser/localiser.onnx`` and
        ``gate/gate.onnx`` (``ml_core.onnx_runtime``; ModelLoadError when onnxruntime is missing,
        the card has no export of a part, or its file fails its sha256); "auto" ONNX Runtime for
        each part whose export the card lists, else TensorFlow, and TensorFlow with a warning
        when that export fails its check (``onnx_runtime.forward_for`` decides, per part).
        """
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
        folder = Path(path)
        card = read_card(folder)
        verify_files(folder, card)
        spec = _Spec(
            input_size=int(card["input"]["size"]),
            margin=float(card["input"].get("margin", DEFAULT_MARGIN)),
            backbone=str(card.get("backbone", "b0")),
            threshold=float(card["threshold"]),
            temperature=float(card.get("temperature", 1.0)),
            head=str(card["input"].get("head", "gap")),
            output_stride=int(card["input"].get("output_stride", 32)),
            logit_offset=float(card.get("logit_offset", 0.0)),
            min_side_frac=float(card["input"].get("min_side_frac", 0.0)),
            cam_offset_cells=float(card["input"].get("cam_offset_cells", 0.0)),
            score_stride=_optional_int(card["input"].get("score_stride")),
        )
        try:
            network = build_network(
                spec.input_size,
                spec.backbone,
                head=spec.head,
                output_stride=spec.output_stride,
                score_stride=spec.score_stride,
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                network.load_weights(str(folder / card.get("weights", WEIGHTS)))
            skipped = [
                w
                for w in caught
                if "Skipping" in str(w.message) or "freshly-initialized" in str(w.message)
            ]
            if skipped:  # Keras leaves unmatched layers at random init with only a warning
                raise ModelLoadError("classifier weights do not match the architecture in the card")
        except ModelLoadError:
            raise
        except Exception as exc:  # wrong shapes, truncated HDF5: never a silent random init
            raise ModelLoadError(f"classifier weights do not load: {type(exc).__name__}") from exc
        info = ModelInfo(
            name=str(card["name"]), version=str(card["version"]), sha256=str(card["sha256"])
        )
        forward = onnx_runtime.forward_for(folder, card, "classifier", runtime)
        localiser = _load_localiser(folder, card, runtime)
        clf = cls(
            network, spec, info, folder, localiser, forward, runtime_choice=runtime, card=card
        )
        log.info(
            "loaded model %s %s from %s (classifier %s, localiser %s)",
            info.name,
            info.version,
            folder,
            clf.runtime,
            localiser.runtime,
        )
        return clf

    @classmethod
    def build_untrained(
        cls, *, input_size: int = 32, threshold: float = 0.5, localiser: Any = None, seed: int = 0
    ) -> Classifier:
        """A tiny random-weight classifier for fast tests (no artifact; liver box from ``localiser`` or the whole slice)."""
        import keras

        keras.utils.set_random_seed(seed)
        network = build_network(input_size, "b0")
        spec = _Spec(
            input_size=input_size,
            margin=DEFAULT_MARGIN,
            backbone="b0",
            threshold=threshold,
            temperature=1.0,
        )
        info = ModelInfo(name="liverscan-untrained", version="0", sha256="0" * 64)
        return cls(network, spec, info, None, localiser)

    def liver_masks(self, slices_u8: list[np.ndarray]) -> list[np.ndarray | None]:
        """Liver masks bool (H, W) from the shipped localiser (None where none is shipped)."""
        if self._localiser is None:
            return [None] * len(slices_u8)
        return list(self._localiser.segment(slices_u8))

    def boxes(self, slices_u8: list[np.ndarray]) -> list[tuple[int, int, int, int]]:
        """Square crop boxes around the localised liver (the whole slice when no liver is found)."""
        out = []
        for img, mask in zip(slices_u8, self.liver_masks(slices_u8), strict=True):
            box = (
                square_box(mask, self._spec.margin, self._spec.min_side_frac)
                if mask is not None
                else None
            )
            if box is None:
                h, w = img.shape[:2]
                side = max(h, w)
                box = (
                    (h - side) // 2,
                    (w - side) // 2,
                    (h - side) // 2 + side,
                    (w - side) // 2 + side,
                )
            out.append(box)
        return out

    def logits_and_cams(
        self, slices_u8: list[np.ndarray], boxes: list[tuple[int, int, int, int]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """One batched forward: logits (N,) float32 and crop CAMs (N, h, w) in [0, 1]."""
        size = self._spec.input_size
        x = to_model_input([crop(s, b, size) for s, b in zip(slices_u8, boxes, strict=True)])
        logits, cams = self._forward(x)
        return np.asarray(logits, np.float32), np.asarray(cams, np.float32)

    def predict(self, slices_u8: list[np.ndarray]) -> list[Prediction]:
        """Classify uint8 (H, W) windowed slices (any sizes) in one batched call; heatmaps on the full slices."""
        from ml_core.gradcam import cam_to_slice

        if not slices_u8:
            return []
        slices = [np.asarray(s) for s in slices_u8]
        boxes = self.boxes(slices)
        logits, cams = self.logits_and_cams(slices, boxes)
        preds = []
        for s, box, logit, cam in zip(slices, boxes, logits, cams, strict=True):
            p = float(
                calibrated_probability(logit, self._spec.temperature, self._spec.logit_offset)
            )
            preds.append(
                Prediction(
                    probability=p,
                    label="tumor" if p >= self._spec.threshold else "normal",
                    threshold=self._spec.threshold,
                    logit=float(logit),
                    heatmap=cam_to_slice(cam, box, s.shape[:2], self._spec.cam_offset_cells),
                )
            )
        return preds

    def gate(self) -> Any:
        """The learned content gate shipped in the same artifact folder (a LiverGate, or an
        EitherGate when the artifact holds ``gate_either/``)."""
        if self._gate is None:
            if self._folder is None:
                raise ModelLoadError("this classifier has no artifact folder, hence no gate")
            try:
                from ml_core.gate import load_gate

                self._gate = load_gate(
                    self._folder,
                    localiser=self._localiser,
                    runtime=self._runtime_choice,
                    artifact=self._card,
                )
                log.info("content gate loaded (%s)", self._gate.runtime)
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"content gate does not load: {type(exc).__name__}") from exc
        return self._gate


def read_card(folder: Path) -> dict[str, Any]:
    """Parse <folder>/model_card.json or raise ModelLoadError."""
    try:
        card = json.loads((folder / CARD).read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model card missing or unreadable in {folder.name}") from exc
    for key in ("name", "version", "sha256", "files", "input", "threshold"):
        if key not in card:
            raise ModelLoadError(f"model card lacks {key!r}")
    return card


def verify_files(folder: Path, card: dict[str, Any]) -> None:
    """Check every file listed in the card against its sha256, then the card's own sha256
    (files and serving fields, ``artifact_sha256``); ModelLoadError if not."""
    files: dict[str, str] = card["files"]
    for rel, digest in files.items():
        p = folder / rel
        if not p.is_file():
            raise ModelLoadError(f"model file missing: {rel}")
        if sha256_file(p) != digest:
            raise ModelLoadError(f"model file fails its sha256 check: {rel}")
    if artifact_sha256(card) != card["sha256"]:
        raise ModelLoadError(
            "model card sha256 does not match its files and serving fields "
            f"({', '.join(SERVING_FIELDS)}): edited without re-sealing"
        )


def _load_localiser(folder: Path, card: dict[str, Any], runtime: str = "tf") -> Any:
    """Load H4a's Localiser from <folder>/localiser, served by ``runtime`` (ModelLoadError on failure)."""
    if not (folder / "localiser").is_dir():
        raise ModelLoadError("artifact has no localiser folder")
    try:
        from ml_core.localiser import Localiser

        return Localiser.load(folder / "localiser", runtime=runtime, artifact=card)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"liver localiser does not load: {type(exc).__name__}") from exc


def write_untrained_artifact(
    folder: str | Path,
    *,
    input_size: int = 32,
    seed: int = 0,
    threshold: float = 0.5,
    gate_threshold: float | None = None,
    either_gate_threshold: float | None = None,
) -> Path:
    """Write a tiny random-weight artifact (B0 at ``input_size`` px + tiny localiser) for fast tests; returns the folder.

    ``gate_threshold``: add a tiny content gate (32 px CNN) with that threshold, calibrated with
    that localiser (0 admits every decodable slice). ``either_gate_threshold`` (with a gate): a
    second, differently initialised gate in ``gate_either/`` (the artifact serves an EitherGate).
    Real files, real sha256s, real loading path; predictions are meaningless.
    """
    import keras

    from ml_core import localiser as loc

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    build_network(input_size, "b0").save_weights(str(out / WEIGHTS))
    (out / "localiser").mkdir(exist_ok=True)
    unet = loc.build_unet(32, 4)
    unet.save_weights(str(out / "localiser" / loc.WEIGHTS_NAME))
    lcard = {
        "input_size": 32,
        "base_filters": 4,
        "threshold": 0.5,
        "weights": loc.WEIGHTS_NAME,
        "sha256": sha256_file(out / "localiser" / loc.WEIGHTS_NAME),
    }
    (out / "localiser" / loc.CARD_NAME).write_text(json.dumps(lcard))
    from ml_core import gate as G

    gates = {} if gate_threshold is None else {"gate": gate_threshold}
    if gates and either_gate_threshold is not None:
        gates[G.EITHER_GATE_DIR] = either_gate_threshold
    for sub, gate_thr in gates.items():
        (out / sub).mkdir(exist_ok=True)
        G.build_gate_cnn(32).save_weights(str(out / sub / G.WEIGHTS_NAME))
        gcard = {
            "input_size": 32,
            "threshold": float(gate_thr),
            "weights": G.WEIGHTS_NAME,
            "sha256": sha256_file(out / sub / G.WEIGHTS_NAME),
            "localiser_sha256": lcard["sha256"],
        }
        (out / sub / G.CARD_NAME).write_text(json.dumps(gcard))
    files = {
        str(p.relative_to(out)): sha256_file(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != CARD
    }
    card = {
        "name": "liverscan-untrained",
        "version": "0.0.0-test",
        "backbone": "b0",
        "files": files,
        "weights": WEIGHTS,
        "input": {"kind": "liver crop", "size": input_size, "margin": DEFAULT_MARGIN},
        "threshold": threshold,
        "temperature": 1.0,
        "intended_use": "tests only: random weights",
    }
    (out / CARD).write_text(json.dumps(seal_card(card), indent=2))
    return out
