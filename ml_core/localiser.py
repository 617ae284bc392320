"""Liver localiser: a small U-Net that segments the liver on an 8-bit axial slice.

Input: one grey slice letterboxed to ``input_size`` (128) px; output: a liver probability map,
mapped back to the input's full resolution and thresholded. Trained on every liver mask of
``../shared/data`` (train split of ``ml_core/splits.json``) with window jitter on HU sources
(W 300–450 / L 30–70), contrast jitter on 8-bit sources, flips, rotations and scale.

Artifact folder: ``localiser.weights.h5`` + ``localiser.json`` (sha256, input size, threshold,
metrics, training command). ``Localiser.load`` verifies the sha256 before building anything.
Serving can run the same forward through ONNX Runtime (``localiser.onnx``, listed in the
artifact's card; ``ml_core.onnx_runtime``); training is TensorFlow.

TensorFlow is imported lazily, so the pure helpers (``dice``, ``liver_bbox``) stay cheap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ml_core.errors import ModelLoadError

log = logging.getLogger(__name__)

INPUT_SIZE = 128
BASE_FILTERS = 12
WEIGHTS_NAME = "localiser.weights.h5"
CARD_NAME = "localiser.json"
STAGING_DIR = Path(__file__).with_name("models") / "_staging" / "localiser"
CHECKPOINT_DIR = Path("/work/checkpoints/localiser")
#: Minimum liver area (pixels at 512x512, i.e. 0.57% of the slice) for a slice to count as a
#: liver slice in the slice-level Dice figures and in the gate's positives.
MIN_LIVER_PX_512 = 1500
#: Localiser outputs kept per loaded model (LRU, keyed by the slice's content): the gate and the
#: classifier see the same slice of one upload, so the U-Net runs once for both.
CACHE_SLICES = 64
#: "Small liver section" for ``--small-share``: liver under this share of the letterboxed square.
SMALL_SECTION_FRAC = 0.02


# --------------------------------------------------------------------------- pure helpers


def dice(pred: np.ndarray, truth: np.ndarray, *, empty: float = 1.0) -> float:
    """Dice overlap of two bool masks of the same shape; ``empty`` when both are empty."""
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return empty
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def liver_bbox(mask: np.ndarray, margin: int = 8) -> tuple[int, int, int, int] | None:
    """Return the half-open box (y0, x0, y1, x1) around a bool mask (H, W) plus ``margin`` px, clipped; None if empty."""
    m = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    h, w = m.shape
    return (
        max(0, int(rows[0]) - margin),
        max(0, int(cols[0]) - margin),
        min(h, int(rows[-1]) + 1 + margin),
        min(w, int(cols[-1]) + 1 + margin),
    )


def keep_main_components(mask: np.ndarray, min_ratio: float = 0.1) -> np.ndarray:
    """Drop connected components of a bool mask (H, W) smaller than ``min_ratio`` of the largest."""
    import cv2

    m = np.asarray(mask, dtype=np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    if n <= 2:
        return m.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= min_ratio * areas.max()) + 1
    return np.isin(labels, keep)


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_card(folder: Path, card_name: str, weights_name: str) -> dict[str, Any]:
    """Read a staging card and verify its weights' sha256 (ModelLoadError on any mismatch)."""
    card_path = folder / card_name
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {card_name}", detail=type(exc).__name__) from exc
    weights = folder / str(card.get("weights", weights_name))
    if not weights.is_file():
        raise ModelLoadError(f"weights file {weights.name} missing")
    if sha256_file(weights) != card.get("sha256"):
        raise ModelLoadError(f"sha256 of {weights.name} does not match {card_name}")
    return card


# --------------------------------------------------------------------------- network


def build_unet(input_size: int = INPUT_SIZE, base: int = BASE_FILTERS) -> Any:
    """Build the U-Net: uint8-range grey (N, S, S, 1) float32 → liver logits (N, S, S, 1)."""
    from tensorflow import keras
    from tensorflow.keras import layers

    def block(x: Any, filters: int) -> Any:
        for _ in range(2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
        return x

    inp = keras.Input((input_size, input_size, 1), name="slice")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(inp)
    skips = []
    for f in (base, base * 2, base * 4, base * 8):
        x = block(x, f)
        skips.append(x)
        x = layers.MaxPooling2D()(x)
    x = block(x, base * 8)
    for f, skip in zip((base * 8, base * 4, base * 2, base), reversed(skips), strict=True):
        x = layers.UpSampling2D(interpolation="bilinear")(x)
        x = layers.Concatenate()([x, skip])
        x = block(x, f)
    out = layers.Conv2D(1, 1, name="liver_logit")(x)
    return keras.Model(inp, out, name="liver_unet")


def slice_key(slice_u8: np.ndarray) -> bytes:
    """Content key of a slice: a 16-byte BLAKE2b digest of its shape and uint8 pixels."""
    a = np.ascontiguousarray(np.asarray(slice_u8, dtype=np.uint8))
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(a.shape).encode())
    h.update(memoryview(a).cast("B"))
    return h.digest()


def letterbox_box(height: int, width: int, size: int) -> Any:
    """The ``Letterbox`` that ``preprocessing.letterbox`` gives an (height, width) image, without resizing."""
    from ml_core.preprocessing import Letterbox

    scale = size / float(max(height, width))
    ih, iw = Letterbox(height, width, size, scale, 0, 0).inner
    return Letterbox(height, width, size, scale, (size - ih) // 2, (size - iw) // 2)


def to_input(
    slices_u8: Sequence[np.ndarray], size: int = INPUT_SIZE
) -> tuple[np.ndarray, list[Any]]:
    """Letterbox uint8 (H, W) slices into float32 (N, size, size, 1) 0..255 and their boxes."""
    from ml_core.preprocessing import letterbox

    batch = np.zeros((len(slices_u8), size, size, 1), dtype=np.float32)
    boxes = []
    for i, s in enumerate(slices_u8):
        boxed, box = letterbox(np.asarray(s, dtype=np.uint8), size)
        batch[i, ..., 0] = boxed
        boxes.append(box)
    return batch, boxes


class Localiser:
    """A loaded liver localiser; ``segment`` runs one batched compiled call (TensorFlow or ONNX Runtime).

    Outputs are cached by slice content (``CACHE_SLICES``, LRU): asking again for a slice it
    has already seen (the content gate, then the classifier's crop, on one upload) reuses
    the first run. ``runs`` counts the slices that actually went through the network.
    """

    def __init__(
        self,
        model: Any,
        *,
        input_size: int,
        threshold: float,
        card: dict[str, Any] | None = None,
        cache_slices: int = CACHE_SLICES,
        onnx_forward: Any = None,
    ) -> None:
        import tensorflow as tf

        self.model = model  # the Keras U-Net (training, and the TensorFlow forward)
        self.input_size = input_size
        self.threshold = threshold
        self.card = card or {}
        self.runs = 0
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_slices = int(cache_slices)
        self._lock = threading.Lock()
        spec = tf.TensorSpec((None, input_size, input_size, 1), tf.float32)

        def forward(x: Any) -> Any:
            return tf.sigmoid(model(x, training=False))

        self._forward = tf.function(forward, input_signature=[spec])
        #: ONNX Runtime forward of the same U-Net + sigmoid (``onnx_runtime.OnnxForward``) or None.
        self._onnx = onnx_forward
        #: What runs the U-Net: "tensorflow" or "onnxruntime".
        self.runtime = "tensorflow" if onnx_forward is None else "onnxruntime"

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        runtime: str = "auto",
        artifact: dict[str, Any] | None = None,
        part: str = "localiser",
    ) -> Localiser:
        """Load a localiser folder (``localiser.json`` + weights), verifying the sha256 first.

        ``runtime`` ("auto" | "tf" | "onnx", see ``onnx_runtime.forward_for``) picks what runs
        the U-Net; its ONNX export is listed in the card of the artifact holding this folder
        (``artifact``, default <path>/../model_card.json; none: TensorFlow under "auto") as
        ``part`` (``onnx_runtime.PARTS``: "localiser", or the gate's "localiser_second").
        """
        from ml_core import onnx_runtime

        folder = Path(path)
        card = read_card(folder, CARD_NAME, WEIGHTS_NAME)
        if artifact is None:
            artifact = onnx_runtime.artifact_card(folder.parent)
        try:
            model = build_unet(int(card["input_size"]), int(card.get("base_filters", BASE_FILTERS)))
            model.load_weights(str(folder / str(card.get("weights", WEIGHTS_NAME))))
        except Exception as exc:  # keras raises many types for a bad file
            raise ModelLoadError(
                "localiser weights do not load", detail=type(exc).__name__
            ) from exc
        onnx_forward = onnx_runtime.forward_for(
            folder.parent, artifact, part, runtime, weights_sha256=card.get("sha256")
        )
        return cls(
            model,
            input_size=int(card["input_size"]),
            threshold=float(card.get("threshold", 0.5)),
            card=card,
            onnx_forward=onnx_forward,
        )

    def probabilities_small(self, batch: np.ndarray) -> np.ndarray:
        """Liver probability float32 (N, S, S) for a letterboxed float32 batch (N, S, S, 1)."""
        if batch.shape[0] == 0:
            return np.zeros((0, self.input_size, self.input_size), np.float32)
        if self._onnx is not None:
            return np.asarray(self._onnx(batch)[0], np.float32)[..., 0]
        return self._forward(batch).numpy()[..., 0]

    def clear_cache(self) -> None:
        """Forget every cached output (benchmarks measuring the network itself)."""
        with self._lock:
            self._cache.clear()

    def cached(self, keys: Sequence[bytes]) -> list[np.ndarray | None]:
        """The cached letterboxed probability maps (S, S) for these slice keys (None where absent)."""
        with self._lock:
            out = []
            for k in keys:
                hit = self._cache.get(k)
                if hit is not None:
                    self._cache.move_to_end(k)
                out.append(hit)
            return out

    def remember(self, keys: Sequence[bytes], probs: np.ndarray) -> None:
        """Cache letterboxed probability maps (N, S, S) computed elsewhere (the gate's joint call)."""
        with self._lock:
            self.runs += len(keys)
            for k, p in zip(keys, probs, strict=True):
                self._cache[k] = np.asarray(p, np.float32)
                self._cache.move_to_end(k)
            while len(self._cache) > self._cache_slices:
                self._cache.popitem(last=False)

    def small_probabilities(
        self, slices_u8: Sequence[np.ndarray], keys: Sequence[bytes] | None = None
    ) -> list[np.ndarray]:
        """Letterboxed probability maps float32 (S, S), from the cache or one batched call for the rest."""
        keys = [slice_key(s) for s in slices_u8] if keys is None else list(keys)
        probs = self.cached(keys)
        todo = [i for i, p in enumerate(probs) if p is None]
        if todo:
            batch, _ = to_input([slices_u8[i] for i in todo], self.input_size)
            fresh = self.probabilities_small(batch)
            self.remember([keys[i] for i in todo], fresh)
            for i, p in zip(todo, fresh, strict=True):
                probs[i] = p
        return [p for p in probs if p is not None]

    def probabilities(self, slices_u8: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Liver probability maps float32 (H, W) in [0, 1] at each input's full resolution."""
        from ml_core.preprocessing import unletterbox

        out = []
        for s, p in zip(slices_u8, self.small_probabilities(slices_u8), strict=True):
            h, w = np.shape(s)[:2]
            out.append(unletterbox(p, letterbox_box(h, w, self.input_size)))
        return out

    def segment(self, slices_u8: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Liver masks bool (H, W) at each input's full resolution (one batched forward pass)."""
        return [keep_main_components(p >= self.threshold) for p in self.probabilities(slices_u8)]


# --------------------------------------------------------------------------- training data


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    from ml_core.preprocessing import letterbox

    boxed, _ = letterbox(mask.astype(np.float32), size)
    return boxed > 0.5


class TrainingSet:
    """Training slices held in memory at ``size`` px: HU slices (window jittered) and 8-bit ones."""

    def __init__(self, size: int, split: str = "train") -> None:
        from ml_core import datasets as D
        from ml_core.preprocessing import letterbox

        self.size = size
        self.hu: list[np.ndarray] = []
        self.hu_masks: list[np.ndarray] = []
        self.u8: list[np.ndarray] = []
        self.u8_masks: list[np.ndarray] = []
        self.u8_group: list[int] = []  # 0 = MSD, 1 = other 8-bit sources (sampled separately)
        for vol in D.iter_hu_volumes(split):
            if vol.liver is None:
                continue
            for z in range(vol.hu.shape[0]):
                boxed, _ = letterbox(vol.hu[z].astype(np.float32), size, pad_value=-1024)
                self.hu.append(boxed)
                self.hu_masks.append(_resize_mask(vol.liver[z], size))
        for img, mask, _meta in D.iter_msd(split):
            self._add_u8(img, mask, 0)
        for img, mask, _meta in D.iter_slices_8bit(split, sources=("CHAOS-CT", "CURVAS", "AMOS22")):
            self._add_u8(img, mask, 1)
        for img, mask, _meta in D.iter_slices_8bit(
            split, sources=("CHAOS-CT", "AMOS22"), harmonise=False
        ):
            self._add_u8(img, mask, 1)  # the exported wide window too: robustness to odd windows
        log.info("training set: %d HU slices, %d 8-bit slices", len(self.hu), len(self.u8))

    def _add_u8(self, img: np.ndarray, mask: np.ndarray | None, group: int) -> None:
        from ml_core.preprocessing import letterbox

        if mask is None:
            return
        boxed, _ = letterbox(img, self.size)
        self.u8.append(boxed)
        self.u8_masks.append(_resize_mask(mask, self.size))
        self.u8_group.append(group)

    def small_sections(self, max_frac: float = SMALL_SECTION_FRAC) -> list[tuple[bool, int]]:
        """(is_hu, index) of the slices whose liver covers more than 0 and under ``max_frac`` of the square."""
        out = []
        for is_hu, masks in ((True, self.hu_masks), (False, self.u8_masks)):
            for i, m in enumerate(masks):
                if 0 < m.mean() < max_frac:
                    out.append((is_hu, i))
        return out

    def batch(
        self, rng: np.random.Generator, n: int, small_share: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Draw an augmented batch: float32 images (n, S, S, 1) 0..255 and masks (n, S, S, 1).

        ``small_share`` of the draws come from small liver sections (``small_sections``).
        """
        from ml_core.preprocessing import window

        xs = np.zeros((n, self.size, self.size, 1), np.float32)
        ys = np.zeros((n, self.size, self.size, 1), np.float32)
        msd = [i for i, g in enumerate(self.u8_group) if g == 0]
        other = [i for i, g in enumerate(self.u8_group) if g == 1]
        small = self.small_sections() if small_share > 0 else []
        for k in range(n):
            r = rng.random()
            pick: tuple[bool, int] | None = None
            if small and rng.random() < small_share:
                pick = small[int(rng.integers(len(small)))]  # (is_hu, index)
            use_hu = pick[0] if pick is not None else (r < 0.35 and bool(self.hu))
            if use_hu:
                i = pick[1] if pick is not None else int(rng.integers(len(self.hu)))
                if rng.random() < 0.85:
                    w, lvl = rng.uniform(300, 450), rng.uniform(30, 70)
                else:  # occasionally much wider/narrower soft-tissue windows
                    w, lvl = rng.uniform(200, 700), rng.uniform(0, 120)
                img = window(self.hu[i], width=float(w), level=float(lvl))
                mask = self.hu_masks[i]
            else:
                if pick is not None:
                    i = pick[1]
                else:
                    pool = msd if (r < 0.7 or not other) else other
                    i = pool[int(rng.integers(len(pool)))]
                img = _contrast_jitter(self.u8[i], rng)
                mask = self.u8_masks[i]
            img, mask = _geometry(img, mask, rng)
            if rng.random() < 0.3:
                img = np.clip(img + rng.normal(0, rng.uniform(1, 6), img.shape), 0, 255)
            xs[k, ..., 0] = img
            ys[k, ..., 0] = mask
        return xs, ys


def _contrast_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)
    x = x * rng.uniform(0.85, 1.15) + rng.uniform(-15, 15)
    gamma = rng.uniform(0.8, 1.25)
    x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** gamma
    return np.clip(x, 0, 255)


def _geometry(
    img: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    x = img.astype(np.float32)
    m = mask.astype(np.float32)
    if rng.random() < 0.3:
        x, m = x[:, ::-1], m[:, ::-1]
    if rng.random() < 0.7:
        s = x.shape[0]
        mat = cv2.getRotationMatrix2D(
            (s / 2, s / 2), float(rng.uniform(-15, 15)), float(rng.uniform(0.85, 1.15))
        )
        mat[:, 2] += rng.uniform(-0.06, 0.06, 2) * s
        x = cv2.warpAffine(
            np.ascontiguousarray(x), mat, (s, s), flags=cv2.INTER_LINEAR, borderValue=0.0
        )
        m = cv2.warpAffine(
            np.ascontiguousarray(m), mat, (s, s), flags=cv2.INTER_LINEAR, borderValue=0.0
        )
    return x, (m > 0.5).astype(np.float32)


# --------------------------------------------------------------------------- evaluation


def _chunks(items: Any, n: int) -> Any:
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def evaluate(
    loc: Localiser,
    splits: Sequence[str] = ("val", "test", "holdout"),
    *,
    samples: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """Dice at full resolution per split: mean over patients (pooled pixels) and over liver slices.

    ``samples`` maps a split to its masked ``(slice, mask, meta)`` list already in memory
    (the per-epoch validation of ``--keep-every``); other splits are read from disk.
    """
    from ml_core import datasets as D

    out: dict[str, Any] = {}
    for split in splits:
        inter: dict[str, int] = defaultdict(int)
        total: dict[str, int] = defaultdict(int)
        per_slice: list[float] = []
        per_source: dict[str, list[float]] = defaultdict(list)
        if samples is not None and split in samples:
            masked = iter(samples[split])
        else:
            masked = (s for s in D.iter_mask_slices(split) if s[1] is not None)
        for chunk in _chunks(masked, 32):
            preds = loc.segment([c[0] for c in chunk])
            for pred, (_img, truth, meta) in zip(preds, chunk, strict=True):
                key = f"{meta['source']}:{meta['patient']}"
                inter[key] += int(np.logical_and(pred, truth).sum())
                total[key] += int(pred.sum()) + int(truth.sum())
                if truth.sum() * (512 * 512) / truth.size >= MIN_LIVER_PX_512:
                    d = dice(pred, truth)
                    per_slice.append(d)
                    per_source[meta["source"]].append(d)
        if not total:
            continue
        patients = {k: (2.0 * inter[k] / total[k] if total[k] else 1.0) for k in total}
        out[split] = {
            "dice_patient_mean": float(np.mean(list(patients.values()))),
            "dice_slice_mean": float(np.mean(per_slice)) if per_slice else None,
            "n_patients": len(patients),
            "n_liver_slices": len(per_slice),
            "dice_slice_mean_by_source": {
                s: round(float(np.mean(v)), 4) for s, v in sorted(per_source.items())
            },
            "dice_by_patient": {k: round(v, 4) for k, v in sorted(patients.items())},
        }
        log.info(
            "dice %s: patient mean %.4f, slice mean %s over %d liver slices",
            split,
            out[split]["dice_patient_mean"],
            out[split]["dice_slice_mean"],
            len(per_slice),
        )
    return out


# --------------------------------------------------------------------------- training CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train-localiser`` options to ``parser``."""
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=40, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--input-size", type=int, default=INPUT_SIZE)
    parser.add_argument("--base-filters", type=int, default=BASE_FILTERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="weights to start from (same input size and filters; fully convolutional, so a "
        "96 px run's weights also start a 128 px one) instead of from scratch",
    )
    parser.add_argument("--out", type=Path, default=STAGING_DIR, help="artifact folder to write")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="only re-evaluate the checkpoint")
    parser.add_argument(
        "--small-share",
        type=float,
        default=0.0,
        help="share of training draws taken from small liver sections (liver under "
        "SMALL_SECTION_FRAC = 0.02 of the square: tips and domes)",
    )
    parser.add_argument(
        "--keep-every",
        type=int,
        default=0,
        help="every N epochs (and at the last) keep the weights and score their validation "
        "patient-mean Dice (0: off)",
    )
    parser.add_argument(
        "--select",
        choices=("last", "val"),
        default="last",
        help="weights to write: the last epoch, or the kept epoch (or the --init weights, "
        "epoch 0) with the best validation patient-mean Dice (needs --keep-every)",
    )


def _val_batch(size: int, limit: int = 192) -> tuple[np.ndarray, np.ndarray]:
    from ml_core import datasets as D

    xs, ys = [], []
    for img, mask, _meta in D.iter_mask_slices("val"):
        if mask is None:
            continue
        x, _ = to_input([img], size)
        xs.append(x[0])
        ys.append(_resize_mask(mask, size))
    idx = np.linspace(0, len(xs) - 1, min(limit, len(xs))).astype(int)
    return np.stack([xs[i] for i in idx]), np.stack([ys[i] for i in idx])


def run(args: argparse.Namespace) -> int:
    """Train the localiser (resumable), evaluate Dice per split and write the artifact folder."""
    import tensorflow as tf

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    size, base = int(args.input_size), int(args.base_filters)
    ckpt_dir = Path(args.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt, state_path = ckpt_dir / "last.weights.h5", ckpt_dir / "state.json"
    model = build_unet(size, base)
    log.info("U-Net %d px, base %d: %d parameters", size, base, model.count_params())
    start = 0
    if not args.no_resume and ckpt.is_file() and state_path.is_file():
        model.load_weights(str(ckpt))
        start = int(json.loads(state_path.read_text())["epoch"])
        log.info("resumed from %s at epoch %d", ckpt, start)
    elif args.init is not None:
        model.load_weights(str(args.init))
        log.info("starting from %s", args.init)

    state: dict[str, Any] = json.loads(state_path.read_text()) if start else {}
    history: list[dict[str, Any]] = list(state.get("history", []))
    keep_every = int(getattr(args, "keep_every", 0) or 0)
    val_samples: dict[str, list[Any]] | None = None

    def keep(epoch: int) -> None:
        """Keep this epoch's weights and record their validation patient-mean Dice."""
        nonlocal val_samples
        from ml_core import datasets as D

        if val_samples is None:
            val_samples = {"val": [s for s in D.iter_mask_slices("val") if s[1] is not None]}
        m = evaluate(
            Localiser(model, input_size=size, threshold=0.5), ("val",), samples=val_samples
        )
        model.save_weights(str(ckpt_dir / f"epoch_{epoch:03d}.weights.h5"))
        v = m["val"]
        history.append(
            {
                "epoch": epoch,
                "val_dice_patient_mean": round(v["dice_patient_mean"], 4),
                "val_dice_slice_mean": round(v["dice_slice_mean"], 4),
            }
        )
        log.info(
            "epoch %d kept: val patient-mean Dice %.4f, slice-mean %.4f",
            epoch,
            v["dice_patient_mean"],
            v["dice_slice_mean"],
        )

    if keep_every and start == 0 and args.init is not None and not args.eval_only:
        keep(0)  # the starting weights compete with the epochs

    if not args.eval_only and start < args.epochs:
        rng = np.random.default_rng(args.seed + start)
        data = TrainingSet(size)
        vx, vy = _val_batch(size)
        total_steps = args.epochs * args.steps
        sched = tf.keras.optimizers.schedules.CosineDecay(args.lr, total_steps, alpha=0.05)
        opt = tf.keras.optimizers.Adam(sched)
        opt.iterations.assign(start * args.steps)

        @tf.function
        def step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                bce = tf.reduce_mean(
                    tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
                )
                p = tf.sigmoid(logits)
                num = 2.0 * tf.reduce_sum(p * y, axis=[1, 2, 3]) + 1.0
                den = tf.reduce_sum(p + y, axis=[1, 2, 3]) + 1.0
                loss = bce + tf.reduce_mean(1.0 - num / den)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        infer = Localiser(model, input_size=size, threshold=0.5).probabilities_small
        for epoch in range(start, args.epochs):
            t0 = time.time()
            losses = []
            for _ in range(args.steps):
                x, y = data.batch(rng, args.batch_size, float(getattr(args, "small_share", 0.0)))
                losses.append(float(step(tf.constant(x), tf.constant(y))))
            pv = np.concatenate([infer(vx[i : i + 64]) for i in range(0, len(vx), 64)]) >= 0.5
            inter = np.logical_and(pv, vy).sum()
            vdice = 2.0 * inter / max(1, pv.sum() + vy.sum())
            dt = time.time() - t0
            log.info(
                "epoch %d/%d loss %.4f val_dice@%dpx %.4f (%.0f img/s)",
                epoch + 1,
                args.epochs,
                float(np.mean(losses)),
                size,
                vdice,
                args.steps * args.batch_size / dt,
            )
            if keep_every and ((epoch + 1) % keep_every == 0 or epoch + 1 == args.epochs):
                keep(epoch + 1)
            model.save_weights(str(ckpt))
            state_path.write_text(
                json.dumps({"epoch": epoch + 1, "val_dice_small": float(vdice), "history": history})
            )

    chosen = None
    if getattr(args, "select", "last") == "val" and history:
        chosen = max(history, key=lambda h: h["val_dice_patient_mean"])["epoch"]
        model.load_weights(str(ckpt_dir / f"epoch_{chosen:03d}.weights.h5"))
        log.info(
            "chosen on validation patient-mean Dice: epoch %d (0 = the --init weights)", chosen
        )
    loc = Localiser(model, input_size=size, threshold=0.5)
    metrics = evaluate(loc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_NAME
    model.save_weights(str(weights))
    from ml_core import datasets as D

    card = {
        "name": "liver-localiser-unet",
        "weights": WEIGHTS_NAME,
        "sha256": sha256_file(weights),
        "input_size": size,
        "base_filters": base,
        "input": "uint8 grey slice letterboxed (aspect kept, zero padded) to input_size, values 0..255",
        "threshold": 0.5,
        "postprocess": "components smaller than 10% of the largest removed",
        "parameters": int(model.count_params()),
        "metrics": metrics,
        "min_liver_px_512_for_slice_dice": MIN_LIVER_PX_512,
        "splits_sha256": sha256_file(D.SPLITS_PATH),
        "training_data": "train split of ml_core/splits.json: 3Dircadb1.7 (CC BY-NC-ND 4.0), MSD Task03 "
        "slices (CC BY-SA 4.0), CHAOS (CC BY-NC-SA 4.0), CURVAS (CC BY-NC 4.0), AMOS (CC BY 4.0)",
        "training_command": f"python -m ml_core.localiser --epochs {args.epochs} --steps {args.steps} "
        f"--batch-size {args.batch_size} --lr {args.lr} --input-size {size} --base-filters {base} "
        f"--seed {args.seed}"
        + (f" --init {args.init}" if args.init is not None else "")
        + (f" --keep-every {keep_every} --select {args.select}" if keep_every else "")
        + (f" --small-share {args.small_share}" if getattr(args, "small_share", 0.0) else ""),
        "init_sha256": sha256_file(args.init) if args.init is not None else None,
    }
    if history:
        card["selection"] = {
            "rule": f"--select {args.select}: the kept epoch with the best validation "
            "patient-mean Dice (0 = the --init weights)",
            "chosen_epoch": chosen,
            "history": history,
        }
    (out / CARD_NAME).write_text(json.dumps(card, indent=1) + "\n")
    log.info("wrote %s (%.1f MB)", out, weights.stat().st_size / 1e6)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``python -m ml_core.localiser [options]``."""
    parser = argparse.ArgumentParser(prog="python -m ml_core.localiser", description=run.__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
