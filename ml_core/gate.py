"""Learned content gate: is this an axial abdominal CT/MR slice showing the liver?

``LiverGate`` implements ``ml_core.validation.ContentGate``: ``score(slices_u8)`` returns
P(liver slice) per slice from one batched compiled call, ``threshold`` comes from validation.

How the evidence is combined: score = P_cnn x ramp(liver area). A small CNN on the grey
slice letterboxed to 128 px gives P_cnn, "an axial abdominal CT/MR slice in an abdominal
window" (it rejects photos, documents, brains and other body parts, wrong windows, montages,
viewer screenshots). The shipped liver localiser gives the liver area in pixels at 512x512
scale; the ramp rises from 0 to 1 over ``AREA_RAMP_PX512`` (150-600 px; the localiser finds
0 px on every slice far from the liver here), so a slice far above or below the liver scores 0
whatever the CNN says. CNN and U-Net run in one compiled call (TensorFlow; with ONNX Runtime,
``onnx_runtime``, the two sessions one after the other); the U-Net's output goes into
the localiser's content-keyed cache, so the classifier's crop of the same slice reuses it
(the localiser runs once per upload). The localiser's sha256 is in the gate's card: the
threshold is only valid with that localiser. Without a localiser (tests) score = P_cnn.

Training data (``python -m ml_core.gate``): positives are liver slices (liver area
>= ``MIN_LIVER_PX_512`` px at 512 px) of every train source in abdominal windows, MR
included, with window, contrast, scale and shift jitter and JPEG re-encoding; the CNN's
negatives are the train files of ``negatives/``, lung and bone windows of liver slices,
coronal and sagittal reformats, brains (generated MR/CT brains in every orientation, some
skull-stripped like atlas renders, and the brain MR volumes bundled with nibabel), pieces of
real slices on black, organ-like blobs, and generated documents, textures, noise, gradients,
montages and viewer screenshots. Slices more than ``FAR_MM`` from the liver's extent are
negatives of the whole gate (validation, test, bench) and are left to the localiser's
evidence. The threshold is chosen on the validation split (rule in ``choose_threshold``);
acceptance is reported on liver slices whose true liver area is at least
``MIN_EVAL_LIVER_PX_512`` px at 512x512.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ml_core import localiser as L
from ml_core.errors import ModelLoadError
from ml_core.localiser import MIN_LIVER_PX_512, Localiser, read_card, sha256_file, to_input

log = logging.getLogger(__name__)

INPUT_SIZE = 128
WEIGHTS_NAME = "gate.weights.h5"
CARD_NAME = "gate.json"
STAGING_DIR = Path(__file__).with_name("models") / "_staging" / "gate"
#: Folder (beside ``gate/`` in an artifact) of the optional second localiser (``LiverGate.second``).
SECOND_LOCALISER_DIR = "localiser_second"
#: Folder (beside ``gate/``) of an optional second gate: the slice passes when either accepts
#: (``EitherGate``; docs/model_gate.md, "Gate v15").
EITHER_GATE_DIR = "gate_either"
CHECKPOINT_DIR = Path("/work/checkpoints/gate")
#: CT slices farther than this from the liver's z-extent are negatives ("below/above the liver").
FAR_MM = 25.0
#: Windows the gate must accept (issue 4): W 350-400 / L 40-60; trained a little wider.
EVAL_WINDOWS = ((350.0, 40.0), (350.0, 60.0), (400.0, 40.0), (400.0, 50.0), (400.0, 60.0))
LUNG_WINDOWS = ((1500.0, -600.0), (1200.0, -500.0), (1600.0, -700.0))
#: Negative groups reported but not used to set the threshold nor counted in
#: ``negatives_rejected``: our own hard cases (not in issue 4's list), non-axial reformats and
#: pieces of real slices on black (``gen_cutout``; a large piece can be a fair liver view);
#: and the negative files that the rule layers reject even without their header (the gate never
#: sees them in any upload format; ``headerless_rules_pass``).
EXTRA_NEGATIVES = ("neg/reformat", "neg/cutout", "neg/files_rule_rejected")
#: Localiser liver area (px at 512x512) where the gate's liver evidence starts / is complete.
#: The localiser finds no liver at all (0 px) on every slice > FAR_MM from the liver here, and
#: under-segments small liver sections: the ramp ends well below MIN_LIVER_PX_512.
AREA_RAMP_PX512 = (150.0, 600.0)
#: The stated minimum for the acceptance figures: liver slices whose true liver area is at
#: least this many pixels at 512x512 (training positives start at MIN_LIVER_PX_512).
MIN_EVAL_LIVER_PX_512 = 3000.0
#: Volumes without a liver mask (HCC_006): slices this far inside the by-eye liver extent are
#: liver slices (the extent is uncertain by a few slices; its lowest tip is a sliver).
BY_EYE_MARGIN_SLICES = 8
BONE_WINDOWS = ((2000.0, 500.0), (1800.0, 400.0), (2500.0, 480.0))
#: Positive groups reported but not used to set the threshold nor counted in
#: ``liver_accepted``: MR-like renders of CT liver slices (``pseudo_mr``), a proxy for MR
#: uploads, of which there is no real validation example.
EXTRA_POSITIVES = ("pos/pseudo_mr",)
#: Share of training positives rendered MR-like (``pseudo_mr``).
PSEUDO_MR_SHARE = 0.15


def build_gate_cnn(input_size: int = INPUT_SIZE) -> Any:
    """Build the gate CNN: grey (N, S, S, 1) float32 0..255 → logit (N, 1)."""
    from tensorflow import keras
    from tensorflow.keras import layers

    inp = keras.Input((input_size, input_size, 1), name="slice")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0)(inp)
    for f in (16, 24, 32, 48, 64):
        x = layers.Conv2D(f, 3, strides=2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("relu")(x)
        x = layers.Conv2D(f, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        x = layers.Activation("relu")(x)
    # Flatten (4x4) rather than pool: the layout (liver left, spine bottom) is evidence.
    x = layers.Flatten()(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(32, activation="relu")(x)
    out = layers.Dense(1, name="liver_slice_logit")(x)
    return keras.Model(inp, out, name="liver_gate")


class LiverGate:
    """The content gate: ``score`` gives P(liver slice) per slice; accept when >= ``threshold``.

    score = P_cnn(abdominal CT/MR slice in an abdominal window) x ramp(liver area), where the
    liver area comes from the localiser (pixels at 512x512 scale) and the ramp rises linearly
    from 0 at ``area_ramp[0]`` to 1 at ``area_ramp[1]``. Without a localiser, score = P_cnn.
    With a ``second`` localiser the liver area is the larger of the two (either finding the
    liver is evidence: each misses liver tips the other finds); the first one's output is the
    one shared with the classifier's crop.
    """

    def __init__(
        self,
        cnn: Any,
        localiser: Localiser | None = None,
        *,
        threshold: float,
        area_ramp: tuple[float, float] = AREA_RAMP_PX512,
        card: dict[str, Any] | None = None,
        onnx_forward: Any = None,
        second: Localiser | None = None,
    ) -> None:
        import tensorflow as tf

        self.cnn = cnn  # the Keras CNN (training, and the TensorFlow forward)
        self.localiser = localiser
        #: a second localiser whose liver area also counts (the larger wins), or None
        self.second = second if localiser is not None else None
        self.threshold = float(threshold)
        self.area_ramp = (float(area_ramp[0]), float(area_ramp[1]))
        self.card = card or {}
        self.input_size = int(cnn.input_shape[1])
        size = self.input_size
        spec = tf.TensorSpec((None, size, size, 1), tf.float32)

        def forward(x: Any) -> Any:
            return tf.sigmoid(cnn(x, training=False))[:, 0]

        self._forward = tf.function(forward, input_signature=[spec], autograph=False)
        #: ONNX Runtime forward of the same CNN + sigmoid (``onnx_runtime.OnnxForward``) or None.
        self._onnx = onnx_forward
        #: What runs the CNN: "tensorflow" or "onnxruntime".
        self.runtime = "tensorflow" if onnx_forward is None else "onnxruntime"
        self._joint: Any = None
        # one compiled call only when both networks are TensorFlow's
        if localiser is not None and onnx_forward is None and localiser.runtime == "tensorflow":
            unet = localiser.model
            loc = int(localiser.input_size)
            loc_spec = tf.TensorSpec((None, loc, loc, 1), tf.float32)

            def joint(x: Any, xl: Any) -> Any:
                return forward(x), tf.sigmoid(unet(xl, training=False))[..., 0]

            # CNN and U-Net in one compiled call when the localiser has not seen the slice yet
            self._joint = tf.function(joint, input_signature=[spec, loc_spec], autograph=False)

    @classmethod
    def load(
        cls,
        path: str | Path,
        localiser: Localiser | None = None,
        *,
        runtime: str = "auto",
        artifact: dict[str, Any] | None = None,
        part: str = "gate",
    ) -> LiverGate:
        """Load ``gate.json`` + weights (sha256 verified) and the localiser beside it (``../localiser``).

        A gate calibrated with a second localiser (``second_localiser_sha256`` in its card) also
        loads ``../localiser_second`` (sha256 verified against the card).

        ``runtime`` ("auto" | "tf" | "onnx", see ``onnx_runtime.forward_for``) picks what runs
        the CNN (and the localiser loaded here); the ONNX exports are listed in the card of the
        artifact holding this folder (``artifact``, default <path>/../model_card.json), the CNN's
        under ``part`` ("gate", or "gate_either" for an EitherGate's second gate).
        """
        from ml_core import onnx_runtime

        folder = Path(path)
        card = read_card(folder, CARD_NAME, WEIGHTS_NAME)
        if artifact is None:
            artifact = onnx_runtime.artifact_card(folder.parent)
        if localiser is None and card.get("localiser_sha256"):
            localiser = Localiser.load(
                folder.parent / "localiser", runtime=runtime, artifact=artifact
            )
        if localiser is not None and card.get("localiser_sha256") != localiser.card.get("sha256"):
            raise ModelLoadError("the gate was calibrated with another localiser (sha256 differs)")
        second = None
        if card.get("second_localiser_sha256"):
            second = Localiser.load(
                folder.parent / SECOND_LOCALISER_DIR,
                runtime=runtime,
                artifact=artifact,
                part="localiser_second",
            )
            if second.card.get("sha256") != card["second_localiser_sha256"]:
                raise ModelLoadError(
                    "the gate was calibrated with another second localiser (sha256 differs)"
                )
        try:
            cnn = build_gate_cnn(int(card.get("input_size", INPUT_SIZE)))
            cnn.load_weights(str(folder / str(card.get("weights", WEIGHTS_NAME))))
            threshold = float(card["threshold"])
            ramp = tuple(card.get("area_ramp_px512", AREA_RAMP_PX512))
        except Exception as exc:  # keras raises many types for a bad file
            raise ModelLoadError("gate weights do not load", detail=type(exc).__name__) from exc
        onnx_forward = onnx_runtime.forward_for(
            folder.parent, artifact, part, runtime, weights_sha256=card.get("sha256")
        )
        return cls(
            cnn,
            localiser,
            threshold=threshold,
            area_ramp=(ramp[0], ramp[1]),
            card=card,
            onnx_forward=onnx_forward,
            second=second,
        )

    def p_cnn(self, batch: np.ndarray) -> np.ndarray:
        """P_cnn float32 (N,) for a letterboxed batch float32 (N, S, S, 1) 0..255."""
        if self._onnx is not None:
            return np.asarray(self._onnx(batch)[0], np.float32)
        return np.asarray(self._forward(batch).numpy(), np.float32)

    def liver_area_px512(
        self,
        slices_u8: Sequence[np.ndarray],
        probs: Sequence[np.ndarray],
        localiser: Localiser | None = None,
    ) -> np.ndarray:
        """A localiser's liver area (N,) in pixels at 512x512 scale from its letterboxed maps
        (``localiser``: default the first one)."""
        loc = localiser if localiser is not None else self.localiser
        assert loc is not None
        size, thr = loc.input_size, loc.threshold
        out = np.zeros(len(probs), np.float64)
        for i, (s, p) in enumerate(zip(slices_u8, probs, strict=True)):
            h, w = np.shape(s)[:2]
            ih, iw = L.letterbox_box(h, w, size).inner
            out[i] = float((p >= thr).sum()) / float(ih * iw) * 512.0 * 512.0
        return out

    def score_batch(self, batch: np.ndarray, content_frac: np.ndarray | None = None) -> np.ndarray:
        """Scores float32 (N,) for a letterboxed batch (N, S, S, 1) 0..255 (kept for callers of 0.3.0).

        ``content_frac`` is the image's share of each square (1 = no padding). The localiser
        sees the batch resized to its input size, as in 0.3.0, and nothing is cached: prefer
        ``score``, which the threshold was chosen with.
        """
        import tensorflow as tf

        if batch.shape[0] == 0:
            return np.zeros((0,), np.float32)
        x = tf.constant(batch, tf.float32)
        p_cnn = self.p_cnn(batch.astype(np.float32))
        if self.localiser is None:
            return p_cnn
        if self.second is not None:  # the second localiser needs the slices themselves
            raise ValueError("score_batch does not serve a gate with a second localiser: use score")
        size = self.localiser.input_size
        xl = x if size == self.input_size else tf.image.resize(x, (size, size), "area")
        probs = self.localiser.probabilities_small(xl.numpy())
        frac = np.ones(len(probs), np.float32) if content_frac is None else content_frac
        px512 = (probs >= self.localiser.threshold).mean(axis=(1, 2)) / np.maximum(frac, 1e-3)
        return p_cnn * area_ramp(px512 * 512.0 * 512.0, self.area_ramp)

    def score(self, slices_u8: Sequence[np.ndarray]) -> list[float]:
        """P(liver slice) in [0, 1] for each uint8 (H, W) slice, in one batched compiled call.

        The localiser's output is taken from (or left in) its content-keyed cache, so the
        classifier's crop of the same slice does not run the U-Net again.
        """
        if len(slices_u8) == 0:
            return []
        if self.localiser is None:
            batch, _ = to_input(slices_u8, self.input_size)
            return [float(s) for s in self.p_cnn(batch)]
        p_cnn, area = self.score_parts(slices_u8)
        return [float(s) for s in p_cnn * area_ramp(area, self.area_ramp).astype(np.float32)]

    def score_parts(self, slices_u8: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The two pieces of evidence per slice: P_cnn (N,) and the localiser's area at 512 scale (N,)
        (the larger of the two localisers' areas when there is a second one).

        ``score`` is ``P_cnn x area_ramp(area)``; the parts let one scoring serve several ramps
        (the ramp is chosen on validation). Needs a localiser.
        """
        assert self.localiser is not None
        batch, _ = to_input(slices_u8, self.input_size)
        keys = [L.slice_key(s) for s in slices_u8]
        probs = self.localiser.cached(keys)
        if any(p is None for p in probs):
            xl, _ = to_input(slices_u8, self.localiser.input_size)
            if self._joint is not None:
                p_cnn, small = (t.numpy() for t in self._joint(batch, xl))
            else:  # ONNX Runtime: the two sessions one after the other
                p_cnn, small = self.p_cnn(batch), self.localiser.probabilities_small(xl)
            self.localiser.remember(keys, small)
            probs = list(small)
        else:
            p_cnn = self.p_cnn(batch)
        area = self.liver_area_px512(slices_u8, [p for p in probs if p is not None])
        if self.second is not None:
            maps = self.second.small_probabilities(slices_u8, keys)
            area = np.maximum(area, self.liver_area_px512(slices_u8, maps, self.second))
        return np.asarray(p_cnn, np.float32), area

    def clear_caches(self) -> None:
        """Forget every cached localiser output, the second localiser's too (benchmarks)."""
        for loc in (self.localiser, self.second):
            if loc is not None:
                loc.clear_cache()

    def accepts(self, slices_u8: list[np.ndarray]) -> list[bool]:
        """True where the slice's score reaches the threshold."""
        return [s >= self.threshold for s in self.score(slices_u8)]


def _logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    return np.log(q / (1 - q))


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


class EitherGate:
    """Two content gates; a slice passes when either accepts it at its own threshold.

    Each gate's margin is logit(score) - logit(threshold); the union's score is
    sigmoid(max margin), so it reaches ``threshold`` = 0.5 exactly when one gate accepts. Nothing
    is fitted: both gates keep their own networks, localisers and thresholds (docs/model_gate.md,
    "Gate v15"). ``first`` is the artifact's ``gate/`` (its localiser gives the classifier its
    crop), ``other`` the one in ``gate_either/``.
    """

    threshold = 0.5

    def __init__(self, first: LiverGate, other: LiverGate) -> None:
        self.first, self.other = first, other
        self.card = {"either": [first.card, other.card]}

    @property
    def localiser(self) -> Localiser | None:
        """The first gate's localiser (the one shared with the classifier's crop)."""
        return self.first.localiser

    @property
    def second(self) -> Localiser | None:
        """The first gate's second localiser, if any."""
        return self.first.second

    @property
    def runtime(self) -> str:
        """What runs the CNNs: one runtime, or "tensorflow+onnxruntime" when they differ."""
        both = {self.first.runtime, self.other.runtime}
        return both.pop() if len(both) == 1 else "+".join(sorted(both))

    def margins(self, slices_u8: Sequence[np.ndarray]) -> np.ndarray:
        """float64 (N, 2): each gate's logit(score) - logit(its threshold); >= 0 where it accepts."""
        if len(slices_u8) == 0:
            return np.zeros((0, 2), np.float64)
        cols = [
            _logit(np.asarray(g.score(slices_u8), np.float64)) - _logit(g.threshold)
            for g in (self.first, self.other)
        ]
        return np.stack(cols, axis=1)

    @staticmethod
    def union(margins: np.ndarray) -> list[float]:
        """The union's score in [0, 1] per row of margins (N, 2): sigmoid of the larger margin.
        The one place that turns margins into the score (``score``, validation, the worker)."""
        m = np.asarray(margins, np.float64).reshape(len(margins), -1)
        return [float(v) for v in _sigmoid(m.max(axis=1))] if len(m) else []

    def score(self, slices_u8: Sequence[np.ndarray]) -> list[float]:
        """The union's score in [0, 1] per slice: sigmoid of the larger margin."""
        return self.union(self.margins(slices_u8))

    def describe(self, margins: np.ndarray) -> str:
        """Both gates' scores and thresholds from one slice's margins (the content check's detail)."""
        parts = []
        for name, g, m in zip(
            ("gate", "second gate"), (self.first, self.other), margins, strict=True
        ):
            s = float(_sigmoid(float(m) + float(_logit(g.threshold))))
            parts.append(f"{name} {s:.3f} (threshold {g.threshold:.3f})")
        return "; ".join(parts)

    def clear_caches(self) -> None:
        """Forget every cached localiser output of both gates."""
        self.first.clear_caches()
        self.other.clear_caches()

    def accepts(self, slices_u8: list[np.ndarray]) -> list[bool]:
        """True where either gate accepts."""
        return [s >= self.threshold for s in self.score(slices_u8)]


def load_gate(
    folder: str | Path,
    localiser: Localiser | None = None,
    *,
    runtime: str = "auto",
    artifact: dict[str, Any] | None = None,
) -> LiverGate | EitherGate:
    """The content gate of an artifact (or staging) ``folder``: ``gate/``, and with a
    ``gate_either/`` beside it an EitherGate of the two.

    The second gate's localiser must be one the first gate already holds (its localiser or its
    second localiser, matched by sha256), so no U-Net is loaded or run twice.
    """
    folder = Path(folder)
    first = LiverGate.load(folder / "gate", localiser, runtime=runtime, artifact=artifact)
    if not has_either_gate(folder):
        return first
    either = folder / EITHER_GATE_DIR
    card = read_card(either, CARD_NAME, WEIGHTS_NAME)
    want = card.get("localiser_sha256")
    shared = [
        loc
        for loc in (first.localiser, first.second)
        if loc is not None and loc.card.get("sha256") == want
    ]
    if want and not shared:
        raise ModelLoadError(
            "the second gate was calibrated with a localiser the first gate does not hold"
        )
    other = LiverGate.load(
        either,
        shared[0] if shared else None,
        runtime=runtime,
        artifact=artifact,
        part="gate_either",
    )
    return EitherGate(first, other)


# --------------------------------------------------------------------------- generated negatives

_WORDS = (
    "patient report liver ct abdomen findings impression normal lesion contrast study series "
    "image date name hospital radiology phase arterial portal venous slice thickness mm kv mas "
    "lorem ipsum dolor sit amet invoice total page signature department protocol"
).split()


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), n))


def _shrink(img: np.ndarray, side: int = 256) -> np.ndarray:
    """Downscale (keeping the aspect) so the longer side is at most ``side`` (training speed)."""
    import cv2

    h, w = img.shape[:2]
    f = side / max(h, w)
    if f >= 1:
        return img
    return cv2.resize(
        img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA
    )


def _text_lines(
    img: np.ndarray, rng: np.random.Generator, colour: int, scale_range: tuple[float, float]
) -> None:
    import cv2

    h, w = img.shape[:2]
    y = int(rng.integers(8, 30))
    while y < h - 5:
        scale = float(rng.uniform(*scale_range))
        words = _words(rng, int(rng.integers(2, 9)))
        x = int(rng.integers(2, max(3, w // 6)))
        cv2.putText(
            img,
            words,
            (x, y),
            int(rng.integers(0, 8)),
            scale,
            colour,
            1 if scale < 0.8 else 2,
            cv2.LINE_AA,
        )
        y += int(rng.uniform(14, 40) * max(scale, 0.4) + 6)


def gen_document(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A synthetic document page: text lines (and sometimes a table) on a light or dark background."""
    import cv2

    dark = rng.random() < 0.25
    bg = int(rng.integers(0, 50)) if dark else int(rng.integers(200, 256))
    img = np.full((size, int(size * rng.uniform(0.7, 1.4))), bg, np.uint8)
    _text_lines(img, rng, 255 - bg if rng.random() < 0.8 else int(rng.integers(0, 256)), (0.3, 0.9))
    if rng.random() < 0.3:
        for _k in range(int(rng.integers(2, 8))):
            yy = int(rng.integers(0, img.shape[0]))
            cv2.line(img, (0, yy), (img.shape[1], yy), 255 - bg, 1)
    return img


def gen_texture(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Random texture: band-passed noise, stripes, checkerboards or blobs."""
    import cv2

    kind = int(rng.integers(4))
    if kind == 0:
        n = rng.normal(0, 1, (size, size)).astype(np.float32)
        n = cv2.GaussianBlur(n, (0, 0), float(rng.uniform(0.5, 8)))
    elif kind == 1:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        a = rng.uniform(0, np.pi)
        n = np.sin((xx * np.cos(a) + yy * np.sin(a)) * rng.uniform(0.05, 0.8))
    elif kind == 2:
        c = int(rng.integers(4, 32))
        yy, xx = np.mgrid[0:size, 0:size]
        n = (((yy // c) + (xx // c)) % 2).astype(np.float32)
    else:
        n = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(5, 60))):
            cv2.circle(
                n,
                (int(rng.integers(size)), int(rng.integers(size))),
                int(rng.integers(2, size // 4)),
                float(rng.uniform(0.2, 1)),
                -1,
            )
        n = cv2.GaussianBlur(n, (0, 0), float(rng.uniform(0.5, 3)))
    n = (n - n.min()) / max(float(n.max() - n.min()), 1e-6)
    lo, hi = sorted(rng.uniform(0, 255, 2))
    return (n * (hi - lo) + lo).astype(np.uint8)


def gen_noise_or_gradient(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Uniform or Gaussian noise, a linear or radial gradient, or a near-constant image."""
    kind = int(rng.integers(4))
    if kind == 0:
        return rng.integers(0, 256, (size, size), dtype=np.uint8)
    if kind == 1:
        return np.clip(
            rng.normal(rng.uniform(40, 200), rng.uniform(5, 60), (size, size)), 0, 255
        ).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 2:
        a = rng.uniform(0, 2 * np.pi)
        g = xx * np.cos(a) + yy * np.sin(a)
    else:
        cy, cx = rng.uniform(0, 1, 2)
        g = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
    if rng.random() < 0.5:
        g = 1 - g
    return (g * rng.uniform(60, 255)).astype(np.uint8)


def gen_head(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A head-like slice (axial or sagittal): bright skull ring, grey brain texture, dark ventricles."""
    import cv2

    img = np.zeros((size, size), np.float32)
    c = (size // 2 + int(rng.integers(-10, 11)), size // 2 + int(rng.integers(-10, 11)))
    ax = (int(size * rng.uniform(0.3, 0.42)), int(size * rng.uniform(0.36, 0.46)))
    ang = float(rng.uniform(-20, 20))
    skull = float(rng.uniform(150, 255))
    cv2.ellipse(img, c, ax, ang, 0, 360, skull, -1)
    t = int(rng.integers(3, 12))
    inner = (max(4, ax[0] - t), max(4, ax[1] - t))
    brain = cv2.GaussianBlur(
        rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), float(rng.uniform(1, 6))
    )
    fill = np.zeros_like(img)
    cv2.ellipse(fill, c, inner, ang, 0, 360, 1.0, -1)
    level = float(rng.uniform(60, 170))
    img = np.where(fill > 0, level + brain * rng.uniform(5, 25), img)
    for _ in range(int(rng.integers(0, 3))):
        cv2.ellipse(
            img,
            (c[0] + int(rng.integers(-15, 16)), c[1] + int(rng.integers(-10, 11))),
            (int(rng.integers(4, 14)), int(rng.integers(10, 30))),
            float(rng.uniform(0, 180)),
            0,
            360,
            float(rng.uniform(0, 60)),
            -1,
        )
    if rng.random() < 0.3:  # sagittal: a neck below
        cv2.rectangle(
            img, (c[0] - ax[0] // 3, c[1] + ax[1] - 10), (c[0] + ax[0] // 3, size), level, -1
        )
    return np.clip(img, 0, 255).astype(np.uint8)


def gen_brain(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A brain slice as MR or CT shows it, axial, coronal or sagittal (with cerebellum and brainstem).

    Folded cortex (thresholded band-passed noise: grey and white matter), dark CSF and
    ventricles, a scalp ring (bright fat on T1 MR, bright bone on CT), on a dark background;
    a third are skull-stripped, as atlas and template renders show the brain alone.
    """
    import cv2

    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    cy, cx = s / 2 + rng.uniform(-0.06, 0.06) * s, s / 2 + rng.uniform(-0.06, 0.06) * s
    view = int(rng.integers(3))  # 0 axial, 1 coronal, 2 sagittal
    ry = s * rng.uniform(0.3, 0.42)
    rx = ry * (rng.uniform(0.75, 0.9) if view == 0 else rng.uniform(1.0, 1.3))
    if view == 2:
        rx, cy = ry * rng.uniform(1.15, 1.35), cy - 0.06 * s
    rx = min(rx, 0.47 * s)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = sum(
        rng.uniform(0, 0.05) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    r = r / (1.0 + wobble)  # lobes: not a perfect ellipse
    if view == 2:  # flatter skull base towards the back (the image's right or left)
        r = r + 0.25 * np.clip((yy - cy) / ry, 0, None) * (xx - cx) / rx * rng.choice([-1, 1])
    brain = r < 1.0
    noise = cv2.GaussianBlur(
        rng.normal(0, 1, (s, s)).astype(np.float32), (0, 0), float(rng.uniform(2.0, 4.5))
    )
    if rng.random() < 0.5:  # blotchy grey/white pattern
        white = (noise > rng.uniform(-0.2, 0.3)) & (r < 0.88)
    else:  # template-like: white matter core with gyral fingers into a grey cortical ribbon
        white = r < 0.78 + noise / max(float(noise.std()), 1e-6) * rng.uniform(0.05, 0.1)
    mr = rng.random() < 0.75
    grey_v, white_v = (rng.uniform(90, 130), rng.uniform(140, 190)) if mr else (120.0, 105.0)
    if mr and rng.random() < 0.3:  # T2: CSF bright, white matter darker
        grey_v, white_v = white_v, grey_v
    img = np.zeros((s, s), np.float32)
    img[brain] = grey_v
    img[brain & white] = white_v
    csf = rng.uniform(10, 50) if (mr and grey_v < white_v) else rng.uniform(200, 250)
    sulci = (np.abs(noise) < rng.uniform(0.02, 0.08)) & brain & (r > 0.55)
    img[sulci] = csf
    for _ in range(int(rng.integers(1, 4))):  # ventricles, corpus callosum-like arcs
        cv2.ellipse(
            img,
            (int(cx + rng.uniform(-0.1, 0.1) * s), int(cy + rng.uniform(-0.12, 0.05) * s)),
            (int(rng.uniform(0.03, 0.12) * s), int(rng.uniform(0.02, 0.07) * s)),
            float(rng.uniform(-30, 30)),
            0,
            360,
            float(csf),
            -1,
        )
    if view > 0 and rng.random() < 0.7:  # corpus callosum: a bright arc above the ventricles
        cv2.ellipse(
            img,
            (int(cx), int(cy + rng.uniform(-0.02, 0.06) * s)),
            (int(rng.uniform(0.35, 0.55) * rx), int(rng.uniform(0.12, 0.25) * ry)),
            0,
            180,
            360,
            float(white_v),
            int(rng.integers(2, 7)),
        )
    if view == 2:  # cerebellum (striped) and brainstem
        side = 1 if rng.random() < 0.5 else -1
        ccx, ccy = int(cx + side * 0.45 * rx), int(cy + 0.75 * ry)
        cv2.ellipse(img, (ccx, ccy), (int(0.38 * rx), int(0.3 * ry)), 0, 0, 360, grey_v, -1)
        stripes = np.sin((yy - ccy) * rng.uniform(0.6, 1.2)) > 0.3
        near = ((yy - ccy) / (0.3 * ry)) ** 2 + ((xx - ccx) / (0.38 * rx)) ** 2 < 1
        img[near & stripes] = white_v
        cv2.rectangle(
            img, (int(cx - 0.08 * rx), int(cy + 0.5 * ry)), (int(cx + 0.08 * rx), s), grey_v, -1
        )
    scalp_w = rng.uniform(0.04, 0.1)
    ring = (r >= 1.0) & (r < 1.0 + scalp_w)
    outer = (r >= 1.0 + scalp_w) & (r < 1.0 + 2 * scalp_w)
    if rng.random() < 0.35:  # skull-stripped: the brain alone on black, softer folds
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(1.0, 3.0)))
    elif mr:
        img[ring] = rng.uniform(0, 40)  # skull: dark on MR
        img[outer] = rng.uniform(150, 250)  # scalp fat: bright on T1
    else:
        img[ring] = rng.uniform(220, 255)  # bone: bright on CT
        img[outer] = rng.uniform(60, 100)
    img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 1.5)))
    img += rng.normal(0, rng.uniform(1, 8), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def gen_blob(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One to three irregular organ-like textured blobs on black: an organ or specimen alone,
    without the body wall, fat and spine that every axial abdominal slice shows."""
    import cv2

    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img = np.zeros((s, s), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.3, 0.7, 2) * s
        ry, rx = rng.uniform(0.12, 0.4, 2) * s
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = sum(
            rng.uniform(0, 0.2) * np.sin(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)
        )
        inside = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1.0 + wobble
        tex = cv2.GaussianBlur(
            rng.normal(0, 1, (s, s)).astype(np.float32), (0, 0), float(rng.uniform(1, 6))
        )
        level = rng.uniform(60, 200)
        img = np.where(inside, level + tex * rng.uniform(5, 40), img)
    for _ in range(int(rng.integers(0, 4))):  # a few bright or dark structures inside
        cv2.ellipse(
            img,
            (int(rng.uniform(0.3, 0.7) * s), int(rng.uniform(0.3, 0.7) * s)),
            (int(rng.uniform(0.02, 0.08) * s), int(rng.uniform(0.02, 0.08) * s)),
            float(rng.uniform(0, 180)),
            0,
            360,
            float(rng.choice([rng.uniform(0, 40), rng.uniform(200, 255)])),
            -1,
        )
    img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 2.0)))
    return np.clip(img + rng.normal(0, rng.uniform(0.5, 5), img.shape), 0, 255).astype(np.uint8)


def gen_cutout(rng: np.random.Generator, ct: Sequence[np.ndarray]) -> np.ndarray:
    """An irregular piece of a real CT slice's interior on black: real tissue texture without
    the body wall, fat ring and spine (what atlas renders and organ crops look like)."""
    import cv2

    src = ct[int(rng.integers(len(ct)))]
    h, w = src.shape
    body = np.zeros((h, w), np.uint8)
    contours, _ = cv2.findContours(
        (src > 5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if contours:  # the body outline, filled (fat and gas inside count)
        cv2.drawContours(body, [max(contours, key=cv2.contourArea)], -1, 1, -1)
    body = cv2.erode(body, np.ones((3, 3), np.uint8), iterations=max(2, int(0.06 * min(h, w))))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ys, xs = np.nonzero(body)
    if ys.size == 0:
        return gen_blob(rng)
    k = int(rng.integers(ys.size))
    cy, cx = float(ys[k]), float(xs[k])
    ry, rx = rng.uniform(0.1, 0.25, 2) * (h, w)
    theta = np.arctan2(yy - cy, xx - cx)
    wobble = sum(
        rng.uniform(0, 0.25) * np.sin(j * theta + rng.uniform(0, 2 * np.pi)) for j in (2, 3, 5)
    )
    keep = (np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2) < 1.0 + wobble) & (body > 0)
    soft = cv2.GaussianBlur(keep.astype(np.float32), (0, 0), float(rng.uniform(0.5, 3.0)))
    out = np.clip(src.astype(np.float32) * soft, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(keep)
    if ys.size < 16:
        return out
    # framed like a render: the piece fills most of the image
    m = int(rng.uniform(0.05, 0.3) * max(np.ptp(ys), np.ptp(xs)))
    return np.ascontiguousarray(
        out[max(0, ys.min() - m) : ys.max() + m + 1, max(0, xs.min() - m) : xs.max() + m + 1]
    )


_BRAIN_CACHE: list[np.ndarray] = []


def brain_mr_slices() -> list[np.ndarray]:
    """Real brain MR slices (axial, coronal, sagittal) from nibabel's bundled test volumes.

    ``anatomical.nii`` (T1, cropped) and ``example4d.nii.gz`` (EPI), resampled to square
    millimetres and stretched like MR uploads; an empty list when nibabel's data is absent.
    """
    import cv2

    if _BRAIN_CACHE:
        return _BRAIN_CACHE
    try:
        import nibabel as nib
    except ImportError:  # pragma: no cover - nibabel is a dependency
        return []
    from ml_core.preprocessing import stretch

    folder = Path(nib.__file__).with_name("tests") / "data"
    for name in ("anatomical.nii", "example4d.nii.gz"):
        try:
            img = nib.load(str(folder / name))
            vol = np.asarray(img.dataobj, dtype=np.float32)
            zooms = img.header.get_zooms()[:3]
        except Exception:  # noqa: BLE001 - optional extra negatives
            continue
        if vol.ndim == 4:
            vol = vol[..., 0]
        for ax in range(3):
            n = vol.shape[ax]
            for k in range(n // 5, n - n // 5, max(1, n // 12)):
                sl = np.rot90(np.take(vol, k, axis=ax))
                if min(sl.shape) < 25:
                    continue
                other = [zooms[a] for a in range(3) if a != ax][::-1]
                h = max(8, round(sl.shape[0] * other[0] / other[1] * 6))
                w = max(8, round(sl.shape[1] * 6))
                sl = cv2.resize(np.ascontiguousarray(sl), (w, h), interpolation=cv2.INTER_CUBIC)
                _BRAIN_CACHE.append(_shrink(stretch(sl)))
    return _BRAIN_CACHE


def gen_montage(rng: np.random.Generator, ct: Sequence[np.ndarray], size: int = 256) -> np.ndarray:
    """A grid (2x2 to 4x4) of CT slices, as a viewer's montage or a contact sheet."""
    import cv2

    n = int(rng.integers(2, 5))
    cell = size // n
    out = np.full((cell * n, cell * n), int(rng.integers(0, 40)), np.uint8)
    gap = int(rng.integers(0, 4))
    for r in range(n):
        for c in range(n):
            s = ct[int(rng.integers(len(ct)))]
            t = cv2.resize(s, (cell - gap, cell - gap), interpolation=cv2.INTER_AREA)
            out[r * cell : r * cell + cell - gap, c * cell : c * cell + cell - gap] = t
    return out


def gen_viewer(rng: np.random.Generator, ct: Sequence[np.ndarray], size: int = 256) -> np.ndarray:
    """A screenshot of a viewer: dark UI frame, toolbars, text, and a CT slice in a panel."""
    import cv2

    w = int(size * rng.uniform(1.2, 1.8))
    img = np.full((size, w), int(rng.integers(15, 60)), np.uint8)
    panels = int(rng.integers(1, 3))
    frac = rng.uniform(0.35, 0.6)
    side = int(size * frac)
    top = int(rng.integers(size // 8, size - side))
    for p in range(panels):
        left = (
            int(rng.integers(w // 6, max(w // 6 + 1, w - side)))
            if panels == 1
            else int(w * (0.2 + 0.4 * p))
        )
        left = min(left, w - side)
        s = ct[int(rng.integers(len(ct)))]
        img[top : top + side, left : left + side] = cv2.resize(
            s, (side, side), interpolation=cv2.INTER_AREA
        )
    # toolbar, side bar, text
    img[: size // 10, :] = int(rng.integers(40, 110))
    img[:, : w // 8] = int(rng.integers(30, 90))
    _text_lines(img[: size // 10, :], rng, 230, (0.3, 0.4))
    _text_lines(img[:, : w // 8], rng, 220, (0.25, 0.35))
    for _ in range(int(rng.integers(2, 6))):
        cv2.putText(
            img,
            _words(rng, 2),
            (int(rng.integers(w // 8, w - 60)), int(rng.integers(size // 8, size - 4))),
            0,
            0.3,
            240,
            1,
            cv2.LINE_AA,
        )
    return img


def gen_photo_crop(rng: np.random.Generator, photos: Sequence[np.ndarray]) -> np.ndarray:
    """A random crop, rotation or inversion of one of the negative files."""
    p = photos[int(rng.integers(len(photos)))]
    h, w = p.shape
    f = rng.uniform(0.5, 1.0)
    ch, cw = max(8, int(h * f)), max(8, int(w * f))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    c = p[y : y + ch, x : x + cw]
    if rng.random() < 0.3:
        c = 255 - c
    if rng.random() < 0.3:
        c = np.rot90(c, int(rng.integers(1, 4)))
    return _shrink(np.ascontiguousarray(c))


# --------------------------------------------------------------------------- data pools


def _liver_px_512(mask: np.ndarray) -> float:
    return float(mask.sum()) * (512.0 * 512.0) / mask.size


def _reformats(
    hu: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator, n: int
) -> list[np.ndarray]:
    """Coronal and sagittal HU reformats (not axial: negatives), resampled to square pixels."""
    import cv2

    out = []
    z, h, w = hu.shape
    for _ in range(n):
        if rng.random() < 0.5:
            sl = hu[:, int(rng.integers(h // 4, 3 * h // 4)), :]
        else:
            sl = hu[:, :, int(rng.integers(w // 4, 3 * w // 4))]
        sl = sl[::-1].astype(np.float32)
        new_h = max(8, int(round(z * spacing[0] / spacing[1])))
        out.append(cv2.resize(sl, (sl.shape[1], new_h), interpolation=cv2.INTER_LINEAR))
    return out


def headerless_rules_pass(rel: str, grey: np.ndarray) -> bool:
    """Whether negative file ``rel`` can reach the gate: its pixels, uploaded as a PNG, pass the rule layers.

    A DICOM's header can reject it (modality, body part, frames), but the same image exported
    to PNG or JPEG has no header: then only its pixels (colour, size, aspect, signal) can. So a
    DICOM counts as a PNG of ``grey`` (how ``datasets.load_negative`` renders it; RGB/YBR ones
    keep their colour); any other file is already headerless and is validated as it is.
    """
    import cv2
    import pydicom

    from ml_core import datasets as D
    from ml_core.validation import validate

    path = D.default_root() / "negatives" / rel
    if path.suffix.lower() != ".dcm":
        return validate(path.read_bytes(), gate=None).passed
    img = grey
    ds = pydicom.dcmread(str(path), force=True)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric.startswith(("RGB", "YBR")):
        try:
            px = ds.pixel_array
        except Exception:  # pydicom raises many types for exotic files; keep the grey render
            px = None
        if px is not None and px.ndim == 3 and px.shape[-1] == 3:
            if photometric != "RGB":
                px = pydicom.pixels.convert_color_space(px, photometric, "RGB")
            img = cv2.cvtColor(np.asarray(px, np.uint8), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    return bool(ok) and validate(buf.tobytes(), gate=None).passed


class GatePools:
    """In-memory sources for one split: HU volumes and 8-bit slices, positives and negatives."""

    def __init__(
        self, split: str, localiser: Localiser | None, seed: int = 0, shrink: int = 256
    ) -> None:
        from ml_core import datasets as D

        self.shrink = shrink
        rng = np.random.default_rng(seed)
        self.pos_hu: list[np.ndarray] = []  # HU (H, W) liver slices
        self.far_hu: list[np.ndarray] = []  # HU slices > FAR_MM from the liver
        self.reformat_hu: list[np.ndarray] = []
        self.pos_u8: list[np.ndarray] = []
        self.pos_u8_src: list[str] = []
        self.neg_files: list[np.ndarray] = []
        self.neg_names: list[str] = []
        #: true liver area (px at 512x512) of each positive; inf where only "has liver" is known
        self.pos_hu_px: list[float] = []
        self.pos_u8_px: list[float] = []
        self.brain_mr: list[np.ndarray] = brain_mr_slices() if split == "train" else []
        splits = D.load_splits()
        for vol in D.iter_hu_volumes(split):
            dist = vol.liver_distance_mm()
            if dist is None:
                continue
            if vol.liver is not None:
                areas = np.array([_liver_px_512(m) for m in vol.liver])
            else:  # no mask: slices well inside the by-eye extent count as liver slices
                areas = np.where(dist == 0, np.inf, 0.0)
                z_in = np.flatnonzero(dist == 0)
                areas[z_in[:BY_EYE_MARGIN_SLICES]] = 0.0
                areas[z_in[-BY_EYE_MARGIN_SLICES:]] = 0.0
            for zi in range(vol.hu.shape[0]):
                if areas[zi] >= MIN_LIVER_PX_512:
                    self.pos_hu.append(_shrink(vol.hu[zi].astype(np.float32), shrink))
                    self.pos_hu_px.append(float(areas[zi]))
                elif dist[zi] > FAR_MM:
                    self.far_hu.append(_shrink(vol.hu[zi].astype(np.float32), shrink))
            self.reformat_hu += [
                _shrink(r, shrink) for r in _reformats(vol.hu, vol.spacing_mm, rng, 40)
            ]
        for img, mask, _meta in D.iter_msd(split):
            if mask is not None and _liver_px_512(mask) >= MIN_LIVER_PX_512:
                self._pos(img, "msd_liver", _liver_px_512(mask))
        for img, mask, meta in D.iter_slices_8bit(split, sources=("CHAOS-CT", "CURVAS", "AMOS22")):
            if mask is not None and _liver_px_512(mask) >= MIN_LIVER_PX_512:
                self._pos(img, meta["source"], _liver_px_512(mask))
        for img, _mask, meta in D.iter_small_examples(split):
            if meta["source"] == "totalseg":
                continue  # its HU volume is already in pos_hu
            if meta["has_liver"]:
                self._pos(img, meta["source"], np.inf)
        unlabelled = [
            (img, meta)
            for img, _m, meta in D.iter_slices_8bit(split, sources=("KiTS19", "MSD-Task09-Spleen"))
        ]
        if unlabelled and localiser is not None:
            masks = localiser.segment([u[0] for u in unlabelled])
            for (img, meta), m in zip(unlabelled, masks, strict=True):
                if (
                    _liver_px_512(m) >= 3 * MIN_LIVER_PX_512
                ):  # pseudo-label: a clearly visible liver
                    self._pos(img, meta["source"], _liver_px_512(m))
        #: whether each negative file's pixels pass the rule layers when uploaded without their
        #: header (as a PNG), i.e. whether that image can reach the gate at all
        self.neg_rules_pass: list[bool] = []
        for img, rel in D.iter_negatives(split, splits=splits):
            self.neg_files.append(_shrink(img, 2 * self.shrink))
            self.neg_names.append(rel)
            self.neg_rules_pass.append(headerless_rules_pass(rel, img))
        self.ct_u8 = [_win(h, 400, 50) for h in self.pos_hu[::3] + self.far_hu[::2]] + self.pos_u8[
            ::4
        ]
        log.info(
            "gate pools %s: %d HU liver, %d HU far, %d reformats, %d 8-bit liver, %d files",
            split,
            len(self.pos_hu),
            len(self.far_hu),
            len(self.reformat_hu),
            len(self.pos_u8),
            len(self.neg_files),
        )

    def _pos(self, img: np.ndarray, source: str, liver_px: float) -> None:
        self.pos_u8.append(_shrink(img, self.shrink))
        self.pos_u8_src.append(source)
        self.pos_u8_px.append(float(liver_px))


def _win(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    from ml_core.preprocessing import window

    return window(hu, width=float(width), level=float(level))


def _jpeg(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2

    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(50, 96))])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else img


#: Grey levels of a W400/L50 slice (HU -150..250) where ``pseudo_mr`` places its control
#: points: air, fat (-100 HU), fat/soft-tissue edge, fluid (~0 HU), muscle (~45), liver
#: (~60-70), enhancing vessels and kidney (~150), dense contrast / bone edge, bone (>= 250).
_MR_GREY = np.array([0, 12, 32, 70, 100, 124, 138, 190, 240, 255], np.float32)


def pseudo_mr(img_u8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Render a W400/L50-like CT slice with MR-like contrast (for the gate's training and validation).

    A random, not necessarily monotone, map from CT tissue classes to MR intensities: fat
    bright (T1, T2 fast spin echo) or dark (fat-suppressed), fluid dark (T1) or bright (T2),
    soft tissue mid grey, enhancing vessels and kidneys mid to bright (post-contrast), cortical
    bone dark (signal void); then a smooth multiplicative bias field (coil sensitivity), a
    slight blur (MR's coarser in-plane resolution) and Rician-like noise, scaled to uint8 by
    percentiles as ``datasets.mr_to_u8`` does. Anatomy is kept, CT's intensity order is not.
    """
    import cv2

    air = rng.uniform(0.0, 0.04)
    fat = (
        rng.uniform(0.65, 1.0)
        if (r := rng.random()) < 0.45
        else rng.uniform(0.03, 0.25)
        if r < 0.8
        else rng.uniform(0.3, 0.6)
    )
    fluid = rng.uniform(0.05, 0.3) if rng.random() < 0.6 else rng.uniform(0.65, 1.0)
    muscle = rng.uniform(0.15, 0.45)
    liver = float(np.clip(muscle + rng.uniform(-0.05, 0.25), 0.1, 0.75))
    enh = rng.uniform(0.35, 1.0)
    bone = rng.uniform(0.05, 0.45)
    edge = (fat + fluid) / 2.0
    vals = np.array([air, air, fat, edge, fluid, muscle, liver, enh, (enh + bone) / 2, bone])
    lut = np.interp(np.arange(256, dtype=np.float32), _MR_GREY, vals).astype(np.float32)
    # CT noise (+-10 HU in the liver) would be amplified by the steep soft-tissue part of the
    # map into a speckle MR does not have: smooth within tissues first (edges kept).
    x = lut[cv2.bilateralFilter(cv2.medianBlur(img_u8, 5), 9, 60.0, 5.0)]
    h, w = x.shape
    coarse = rng.normal(0.0, 1.0, (3, 3)).astype(np.float32)
    field = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    x = x * np.exp(rng.uniform(0.05, 0.3) * field / max(float(np.abs(field).max()), 1e-3))
    if rng.random() < 0.7:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 1.5))
    sigma = rng.uniform(0.0, 0.04)
    x = np.hypot(x + rng.normal(0, sigma, x.shape), rng.normal(0, sigma, x.shape))
    lo, hi = np.percentile(x, [1.0, 99.5])
    out = (x - lo) * (255.0 / max(float(hi - lo), 1e-3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _augment_u8(img: np.ndarray, rng: np.random.Generator, *, contrast: bool) -> np.ndarray:
    import cv2

    x = img
    if contrast:  # about the spread between W350 and W400 exports, a little wider
        f = x.astype(np.float32) * rng.uniform(0.85, 1.2) + rng.uniform(-15, 15)
        x = np.clip(f, 0, 255).astype(np.uint8)
    if rng.random() < 0.15:
        x = np.ascontiguousarray(x[:, ::-1])
    if rng.random() < 0.6:  # patient size, field of view and table position vary by site
        h, w = x.shape
        m = cv2.getRotationMatrix2D(
            (w / 2, h / 2), float(rng.uniform(-12, 12)), float(rng.uniform(0.8, 1.2))
        )
        m[:, 2] += rng.uniform(-0.06, 0.06, 2) * (w, h)
        x = cv2.warpAffine(x, m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    if rng.random() < 0.4:
        x = _jpeg(x, rng)
    if rng.random() < 0.2:
        x = np.clip(x + rng.normal(0, rng.uniform(1, 5), x.shape), 0, 255).astype(np.uint8)
    return x


def _sample_positive(p: GatePools, rng: np.random.Generator, mr_share: float = 0.0) -> np.ndarray:
    if rng.random() < mr_share:  # MR-like render of a CT liver slice (HU or harmonised 8-bit)
        if p.pos_hu and rng.random() < 0.35:
            ct = _win(p.pos_hu[int(rng.integers(len(p.pos_hu)))], 400, 50)
        else:
            ct = p.pos_u8[int(rng.integers(len(p.pos_u8)))]
        return _augment_u8(pseudo_mr(ct, rng), rng, contrast=False)
    if p.pos_hu and rng.random() < 0.35:
        hu = p.pos_hu[int(rng.integers(len(p.pos_hu)))]
        img = _win(hu, rng.uniform(280, 480), rng.uniform(25, 75))
        return _augment_u8(img, rng, contrast=False)
    i = int(rng.integers(len(p.pos_u8)))
    return _augment_u8(p.pos_u8[i], rng, contrast=True)


def _sample_negative(p: GatePools, rng: np.random.Generator) -> np.ndarray:
    # Slices above/below the liver are not CNN negatives: the localiser's liver area rejects
    # them (with one training patient that has such slices, the CNN learned that patient).
    r = 0.2 + 0.8 * rng.random()
    if r < 0.32 and p.pos_hu:
        hu = p.pos_hu[int(rng.integers(len(p.pos_hu)))]
        w, lvl = (LUNG_WINDOWS if rng.random() < 0.5 else BONE_WINDOWS)[int(rng.integers(3))]
        return _augment_u8(
            _win(hu, w * rng.uniform(0.9, 1.1), lvl + rng.uniform(-50, 50)), rng, contrast=False
        )
    if r < 0.45 and p.reformat_hu:
        hu = p.reformat_hu[int(rng.integers(len(p.reformat_hu)))]
        return _augment_u8(
            _win(hu, rng.uniform(300, 460), rng.uniform(30, 70)), rng, contrast=False
        )
    if r < 0.58 and p.neg_files:
        return _augment_u8(gen_photo_crop(rng, p.neg_files), rng, contrast=True)
    if r < 0.72:  # brains (MR and CT, every orientation): the hardest look-alikes
        brains = p.brain_mr
        if brains and rng.random() < 0.3:
            img = brains[int(rng.integers(len(brains)))]
        elif p.ct_u8 and rng.random() < 0.35:
            img = gen_cutout(rng, p.ct_u8)
        else:
            img = gen_brain(rng)
        img = np.ascontiguousarray(np.rot90(img, int(rng.integers(4))))  # any orientation
        return _augment_u8(img, rng, contrast=True)
    gens: list[Callable[[], np.ndarray]] = [
        lambda: gen_head(rng),
        lambda: gen_blob(rng),
        lambda: gen_document(rng),
        lambda: gen_texture(rng),
        lambda: gen_noise_or_gradient(rng),
        lambda: gen_montage(rng, p.ct_u8),
        lambda: gen_viewer(rng, p.ct_u8),
        lambda: gen_viewer(rng, p.ct_u8),
        lambda: gen_montage(rng, p.ct_u8),
    ]
    img = gens[int(rng.integers(len(gens)))]()
    return _jpeg(img, rng) if rng.random() < 0.3 else img


def make_batch(
    p: GatePools, rng: np.random.Generator, n: int, mr_share: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Half positives, half negatives: float32 (n, S, S, 1) 0..255 and labels float32 (n, 1).

    ``mr_share`` of the positives are MR-like renders of CT liver slices (``pseudo_mr``).
    """
    imgs, labels = [], []
    for k in range(n):
        pos = k % 2 == 0
        imgs.append(_sample_positive(p, rng, mr_share) if pos else _sample_negative(p, rng))
        labels.append(1.0 if pos else 0.0)
    x, _ = to_input(imgs, INPUT_SIZE)
    return x, np.asarray(labels, np.float32)[:, None]


# --------------------------------------------------------------------------- evaluation sets


def evaluation_set(
    p: GatePools, seed: int, n_generated: int = 240, min_liver_px: float = MIN_EVAL_LIVER_PX_512
) -> dict[str, list[np.ndarray]]:
    """Fixed labelled groups for threshold choice and reporting (positives per window and format).

    Positives are the liver slices whose true liver area is at least ``min_liver_px`` (pixels
    at 512x512; slices known to show the liver without a mask are kept).
    """
    import cv2

    rng = np.random.default_rng(seed)
    groups: dict[str, list[np.ndarray]] = {}
    pos_hu = [h for h, a in zip(p.pos_hu, p.pos_hu_px, strict=True) if a >= min_liver_px]
    pos_u8 = [x for x, a in zip(p.pos_u8, p.pos_u8_px, strict=True) if a >= min_liver_px]
    for w, lvl in EVAL_WINDOWS:
        tag = f"W{int(w)}L{int(lvl)}"
        groups[f"pos/hu/{tag}/png"] = [_win(h, w, lvl) for h in pos_hu]
        groups[f"pos/hu/{tag}/jpeg"] = [
            cv2.imdecode(
                cv2.imencode(".jpg", _win(h, w, lvl), [cv2.IMWRITE_JPEG_QUALITY, 85])[1], 0
            )
            for h in pos_hu[::2]
        ]
    mr_rng = np.random.default_rng(seed + 7)
    groups["pos/pseudo_mr"] = [pseudo_mr(_win(h, 400, 50), mr_rng) for h in pos_hu[::4]] + [
        pseudo_mr(x, mr_rng) for x in pos_u8[::2]
    ]
    groups["pos/u8/png"] = list(pos_u8)
    groups["pos/u8/jpeg"] = [
        cv2.imdecode(cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, 85])[1], 0) for x in pos_u8
    ]
    # Only files whose pixels pass the rule layers (uploaded as PNG, without a header) can reach
    # the gate: they set the threshold; the others (colour, too small, ...) are reported with
    # the gate's score alone.
    groups["neg/files"] = [x for x, ok in zip(p.neg_files, p.neg_rules_pass, strict=True) if ok]
    groups["neg/files_rule_rejected"] = [
        x for x, ok in zip(p.neg_files, p.neg_rules_pass, strict=True) if not ok
    ]
    groups["neg/far_slices"] = [_win(h, w, lvl) for h in p.far_hu for (w, lvl) in EVAL_WINDOWS[::2]]
    groups["neg/lung_bone_window"] = [
        _win(h, w, lvl) for h in p.pos_hu[::3] for (w, lvl) in (LUNG_WINDOWS[0], BONE_WINDOWS[0])
    ]
    groups["neg/reformat"] = [_win(h, 400, 50) for h in p.reformat_hu]
    k = n_generated // 6
    groups["neg/document"] = [gen_document(rng) for _ in range(k)]
    groups["neg/head"] = [gen_head(rng) for _ in range(k)]
    groups["neg/brain"] = [gen_brain(rng) for _ in range(k)]
    groups["neg/blob"] = [gen_blob(rng) for _ in range(k)]
    if p.ct_u8:
        groups["neg/cutout"] = [gen_cutout(rng, p.ct_u8) for _ in range(k)]
    groups["neg/texture_noise"] = [gen_texture(rng) for _ in range(k)] + [
        gen_noise_or_gradient(rng) for _ in range(k)
    ]
    if p.ct_u8:
        groups["neg/montage"] = [gen_montage(rng, p.ct_u8) for _ in range(k)]
        groups["neg/viewer"] = [gen_viewer(rng, p.ct_u8) for _ in range(k)]
    return {g: v for g, v in groups.items() if v}


def area_ramp(area_px512: np.ndarray, ramp: Sequence[float]) -> np.ndarray:
    """The liver evidence in [0, 1]: 0 below ``ramp[0]`` px (at 512 scale), 1 from ``ramp[1]``, linear between."""
    lo, hi = float(ramp[0]), float(ramp[1])
    return np.clip((np.asarray(area_px512, np.float64) - lo) / (hi - lo), 0.0, 1.0)


def score_group_parts(
    gate: LiverGate, groups: dict[str, list[np.ndarray]]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(P_cnn, localiser area at 512 scale) per group (batched by 64); needs a localiser."""
    out = {}
    for g, imgs in groups.items():
        ps, areas = [], []
        for i in range(0, len(imgs), 64):
            p, a = gate.score_parts(imgs[i : i + 64])
            ps.append(p)
            areas.append(a)
        out[g] = (np.concatenate(ps).astype(np.float64), np.concatenate(areas))
    return out


def combine_parts(
    parts: dict[str, tuple[np.ndarray, np.ndarray]], ramp: Sequence[float]
) -> dict[str, np.ndarray]:
    """Gate scores per group for one area ramp: P_cnn x area_ramp(area)."""
    return {
        g: (p.astype(np.float32) * area_ramp(a, ramp).astype(np.float32)).astype(np.float64)
        for g, (p, a) in parts.items()
    }


#: Strictness rule (docs/model_gate.md, v8): a candidate may be chosen only if its highest
#: validation score in every counted negative group stays under this.
STRICT_MAX_NEGATIVE = 0.5


def strict_ok(scores: dict[str, np.ndarray], limit: float = STRICT_MAX_NEGATIVE) -> bool:
    """True when every counted negative group's highest score is below ``limit`` (strictness rule)."""
    return all(float(v.max()) < limit for g, v in scores.items() if _counted_negative(g) and v.size)


def far_margin_ok(
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    ramp: Sequence[float],
    group: str = "neg/far_slices",
) -> bool:
    """True when the localiser's area on every far slice is at most half the ramp's start.

    Such slices then score 0 whatever the CNN says, with a margin; no far slices: True.
    """
    if group not in parts or parts[group][1].size == 0:
        return True
    return float(parts[group][1].max()) <= float(ramp[0]) / 2.0


def every_group_accepted(
    scores: dict[str, np.ndarray], threshold: float, target: float = 0.99
) -> bool:
    """True when every counted positive group (each window and format) is accepted >= ``target``.

    Issue 4's target holds per window and format, not only pooled: a candidate whose pooled
    acceptance is met while one window (e.g. W350/L40 JPEG) falls under it is not eligible.
    """
    return all(
        float((v >= threshold).mean()) >= target
        for g, v in scores.items()
        if _counted_positive(g) and v.size
    )


def choose_candidate(history: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    """The validation choice among (epoch, ramp) candidates, and whether it passed the rules.

    Only candidates with ``strict``, ``far_margin`` and ``groups`` true may be chosen (each
    defaults to true for histories written before that rule); among them the largest ``criterion``
    (``val_criterion``), ties to the larger ramp. If none passes, the best of all is returned
    with False (nothing should ship).
    """

    def key(h: dict[str, Any]) -> tuple[Any, ...]:
        ramp = h.get("ramp", list(AREA_RAMP_PX512))
        return (*tuple(h["criterion"]), float(ramp[0]), float(ramp[1]))

    ok = [
        h
        for h in history
        if h.get("strict", True) and h.get("far_margin", True) and h.get("groups", True)
    ]
    if ok:
        return max(ok, key=key), True
    return max(history, key=key), False


def parse_ramps(text: str) -> list[tuple[float, float]]:
    """``"150:600,100:400"`` -> [(150.0, 600.0), (100.0, 400.0)] (lo < hi, px at 512 scale)."""
    out = []
    for part in text.split(","):
        lo, hi = (float(x) for x in part.split(":"))
        if not 0 <= lo < hi:
            raise ValueError(f"bad area ramp {part!r}: need 0 <= lo < hi")
        out.append((lo, hi))
    return out


def score_groups(gate: LiverGate, groups: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """Gate scores per group (batched by 64)."""
    out = {}
    for g, imgs in groups.items():
        scores: list[float] = []
        for i in range(0, len(imgs), 64):
            scores += gate.score(imgs[i : i + 64])
        out[g] = np.asarray(scores, np.float64)
    return out


def _counted_negative(group: str) -> bool:
    return group.startswith("neg/") and not group.startswith(EXTRA_NEGATIVES)


def _counted_positive(group: str) -> bool:
    return group.startswith("pos/") and not group.startswith(EXTRA_POSITIVES)


def choose_threshold(scores: dict[str, np.ndarray], target_accept: float = 0.99) -> float:
    """Threshold between negatives and positives: rejects every negative, keeps >= target if it can.

    Midpoint in logit space between the highest negative score and the positives' (1 - target)
    quantile; if those overlap, strictness wins (just above the highest negative). The
    ``EXTRA_NEGATIVES`` groups (coronal/sagittal reformats) are reported but do not set it.
    """
    pos = np.concatenate([v for g, v in scores.items() if _counted_positive(g)])
    neg = np.concatenate([v for g, v in scores.items() if _counted_negative(g)])

    def logit(p: float) -> float:
        p = min(max(p, 1e-7), 1 - 1e-7)
        return math.log(p / (1 - p))

    hi_neg = logit(float(neg.max()))
    lo_pos = logit(float(np.quantile(pos, 1.0 - target_accept)))
    t = (hi_neg + lo_pos) / 2.0 if lo_pos > hi_neg else hi_neg + 1e-3
    return float(1.0 / (1.0 + math.exp(-t)))


def rates(scores: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """Acceptance of positive groups and rejection of negative groups at ``threshold``."""
    out: dict[str, Any] = {"by_group": {}}
    pos_all, neg_all = [], []
    for g, v in scores.items():
        if g.startswith("pos/"):
            r = float((v >= threshold).mean())
            if _counted_positive(g):
                pos_all.append(v)
            out["by_group"][g] = {"accepted": round(r, 4), "n": int(v.size)}
        else:
            r = float((v < threshold).mean())
            if _counted_negative(g):
                neg_all.append(v)
            out["by_group"][g] = {
                "rejected": round(r, 4),
                "n": int(v.size),
                "max_score": round(float(v.max()), 4),
            }
    pos = np.concatenate(pos_all) if pos_all else np.zeros(0)
    neg = np.concatenate(neg_all) if neg_all else np.zeros(0)
    out["liver_accepted"] = round(float((pos >= threshold).mean()), 4) if pos.size else None
    out["negatives_rejected"] = round(float((neg < threshold).mean()), 4) if neg.size else None
    out["n_positive"], out["n_negative"] = int(pos.size), int(neg.size)
    return out


# --------------------------------------------------------------------------- training CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train-gate`` options to ``parser``."""
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50, help="batches per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--localiser",
        type=Path,
        default=STAGING_DIR.parent / "localiser",
        help="localiser artifact used to pseudo-label unlabelled 8-bit slices (optional)",
    )
    parser.add_argument(
        "--second-localiser",
        type=Path,
        default=None,
        help="a second localiser folder whose liver area also counts (the larger of the two); "
        "the artifact ships it as localiser_second/",
    )
    parser.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--out", type=Path, default=STAGING_DIR, help="artifact folder to write")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument(
        "--init", type=Path, default=None, help="gate weights to start from (fine-tuning)"
    )
    parser.add_argument(
        "--mr-share",
        type=float,
        default=PSEUDO_MR_SHARE,
        help="share of positives rendered MR-like from CT liver slices (pseudo_mr)",
    )
    parser.add_argument(
        "--select",
        choices=("val", "last"),
        default="val",
        help="weights to ship: the epoch (or the --init weights) best on validation "
        "(see val_criterion, choose_candidate), or the last epoch",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="no training: score every kept epoch_NN weights of --checkpoint-dir again on "
        "validation (with this --localiser and --area-ramps), then choose as --select says",
    )
    parser.add_argument(
        "--area-ramps",
        default="{:g}:{:g}".format(*AREA_RAMP_PX512),
        help="candidate area ramps lo:hi (px at 512 scale), comma separated; with --select val "
        "each (epoch, ramp) pair is a candidate, the first ramp otherwise",
    )


def val_criterion(scores: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """How a candidate is ranked on validation (larger is better), at its own threshold.

    (liver slices accepted, MR-like renders accepted, logit gap between the positives' 1%
    quantile and the highest counted negative). Every counted negative is rejected at any
    threshold ``choose_threshold`` returns, so acceptance ranks first; the MR proxy and the
    margin separate candidates that all accept every validation liver slice.
    """
    threshold = choose_threshold(scores)
    r = rates(scores, threshold)
    mr = r["by_group"].get("pos/pseudo_mr", {}).get("accepted", 0.0)
    pos = np.concatenate([v for g, v in scores.items() if _counted_positive(g)])
    neg = np.concatenate([v for g, v in scores.items() if _counted_negative(g)])
    q = np.clip([np.quantile(pos, 0.01), neg.max()], 1e-7, 1 - 1e-7)
    lg = np.log(q / (1 - q))
    return float(r["liver_accepted"]), float(mr), round(float(lg[0] - lg[1]), 4)


def run(args: argparse.Namespace) -> int:
    """Train the gate (resumable), choose its threshold on validation, report test rates, write the artifact."""
    import tensorflow as tf

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    localiser = (
        Localiser.load(args.localiser)
        if (Path(args.localiser) / "localiser.json").is_file()
        else None
    )
    if localiser is None:
        log.info("no localiser at %s: unlabelled KiTS19/Spleen slices are not used", args.localiser)
    ckpt_dir = Path(args.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt, state_path = ckpt_dir / "last.weights.h5", ckpt_dir / "state.json"
    cnn = build_gate_cnn(INPUT_SIZE)
    log.info("gate CNN: %d parameters", cnn.count_params())
    start = 0
    if not args.no_resume and ckpt.is_file() and state_path.is_file():
        cnn.load_weights(str(ckpt))
        start = int(json.loads(state_path.read_text())["epoch"])
        log.info("resumed from %s at epoch %d", ckpt, start)
    elif args.init is not None:
        cnn.load_weights(str(args.init))
        log.info("starting from %s", args.init)
    ramps = parse_ramps(args.area_ramps)
    second_path = getattr(args, "second_localiser", None)
    second = Localiser.load(second_path) if second_path is not None else None
    gate = LiverGate(cnn, localiser, threshold=0.5, area_ramp=ramps[0], second=second)
    val_pools = GatePools("val", localiser, seed=1, shrink=4096)
    val_groups = evaluation_set(val_pools, seed=101)
    state: dict[str, Any] = json.loads(state_path.read_text()) if start else {}
    history: list[dict[str, Any]] = list(state.get("history", []))

    def record(epoch: int, *, save: bool = True) -> None:
        """Validation criterion of the current weights (per candidate ramp); their copy for the choice."""
        if save:
            cnn.save_weights(str(ckpt_dir / f"epoch_{epoch:02d}.weights.h5"))
        if localiser is None:
            scored = [(ramps[0], score_groups(gate, val_groups), True)]
        else:
            parts = score_group_parts(gate, val_groups)
            scored = [(r, combine_parts(parts, r), far_margin_ok(parts, r)) for r in ramps]
        for ramp, scores, far_ok in scored:
            crit = val_criterion(scores)
            strict = strict_ok(scores)
            groups = every_group_accepted(scores, choose_threshold(scores))
            max_neg = {
                g: round(float(v.max()), 4) for g, v in scores.items() if _counted_negative(g)
            }
            history.append(
                {
                    "epoch": epoch,
                    "ramp": list(ramp),
                    "criterion": list(crit),
                    "strict": strict,
                    "far_margin": far_ok,
                    "groups": groups,
                    "max_negative_by_group": max_neg,
                }
            )
            log.info(
                "epoch %d ramp %g-%g validation: liver accepted %.4f, MR-like %.4f, logit gap "
                "%.3f; strict %s (highest negative %.3f), far margin %s, every group >= 0.99 %s",
                epoch,
                *ramp,
                *crit,
                strict,
                max(max_neg.values()),
                far_ok,
                groups,
            )

    if getattr(args, "rescore", False):
        history = []
        kept = sorted(ckpt_dir.glob("epoch_*.weights.h5"))
        if not kept:
            raise SystemExit(f"--rescore: no epoch_NN.weights.h5 in {ckpt_dir}")
        for path in kept:
            cnn.load_weights(str(path))
            record(int(path.name.split("_")[1].split(".")[0]), save=False)
        start = args.epochs
    elif start == 0 and args.init is not None:
        record(0)  # the starting weights compete with the fine-tuned epochs

    if start < args.epochs:
        train = GatePools("train", localiser, seed=args.seed)
        rng = np.random.default_rng(args.seed + 1000 * start)
        sched = tf.keras.optimizers.schedules.CosineDecay(
            args.lr, args.epochs * args.steps, alpha=0.05
        )
        opt = tf.keras.optimizers.Adam(sched)
        opt.iterations.assign(start * args.steps)
        spec = tf.TensorSpec((None, INPUT_SIZE, INPUT_SIZE, 1), tf.float32)

        @tf.function(input_signature=[spec, tf.TensorSpec((None, 1), tf.float32)])
        def step(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                logits = cnn(x, training=True)
                loss = tf.reduce_mean(
                    tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)
                )
            grads = tape.gradient(loss, cnn.trainable_variables)
            opt.apply_gradients(zip(grads, cnn.trainable_variables, strict=True))
            return loss

        for epoch in range(start, args.epochs):
            t0 = time.time()
            losses = []
            for _ in range(args.steps):
                x, y = make_batch(train, rng, args.batch_size, args.mr_share)
                losses.append(float(step(tf.constant(x), tf.constant(y))))
            log.info(
                "epoch %d/%d loss %.4f (%.0f img/s)",
                epoch + 1,
                args.epochs,
                float(np.mean(losses)),
                args.steps * args.batch_size / (time.time() - t0),
            )
            record(epoch + 1)
            cnn.save_weights(str(ckpt))
            state_path.write_text(json.dumps({"epoch": epoch + 1, "history": history}))

    chosen = history[-1]["epoch"] if history else None
    passed: bool | None = None
    if args.select == "val" and history:
        best, passed = choose_candidate(history)
        chosen = best["epoch"]
        gate.area_ramp = tuple(float(x) for x in best.get("ramp", ramps[0]))  # type: ignore[assignment]
        cnn.load_weights(str(ckpt_dir / f"epoch_{chosen:02d}.weights.h5"))
        log.info(
            "chosen on validation: epoch %d (0 = the --init weights), ramp %g-%g%s",
            chosen,
            *gate.area_ramp,
            "" if passed else " -- NO candidate passed the strictness/far-margin/group rules",
        )
    val_scores = score_groups(gate, val_groups)
    threshold = choose_threshold(val_scores)
    val_rates = rates(val_scores, threshold)
    test_pools = GatePools("test", localiser, seed=2, shrink=4096)
    hold_pools = GatePools("holdout", localiser, seed=3, shrink=4096)
    test_groups = evaluation_set(test_pools, seed=202)
    test_groups.update(
        {
            f"{g}@3Dircadb1.1": v
            for g, v in evaluation_set(hold_pools, seed=303, n_generated=0).items()
            if g.startswith(("pos/hu", "neg/far", "neg/lung", "neg/reformat"))
        }
    )
    test_rates = rates(score_groups(gate, test_groups), threshold)
    log.info(
        "threshold %.4f; val: liver %.4f negatives %.4f; test: liver %.4f negatives %.4f",
        threshold,
        val_rates["liver_accepted"],
        val_rates["negatives_rejected"],
        test_rates["liver_accepted"],
        test_rates["negatives_rejected"],
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if second_path is not None:  # beside the gate, as an artifact holds it
        copy_localiser(Path(second_path), out.parent / SECOND_LOCALISER_DIR)
    weights = out / WEIGHTS_NAME
    cnn.save_weights(str(weights))
    from ml_core import datasets as D

    card = {
        "name": "liver-content-gate",
        "weights": WEIGHTS_NAME,
        "sha256": sha256_file(weights),
        "input_size": INPUT_SIZE,
        "input": "uint8 grey slice letterboxed (aspect kept, zero padded) to 128 px, values 0..255",
        "localiser_sha256": localiser.card.get("sha256") if localiser else None,
        "second_localiser_sha256": second.card.get("sha256") if second else None,
        "area_ramp_px512": list(gate.area_ramp),
        "score": "P_cnn x clip((localiser liver px at 512 - ramp[0]) / (ramp[1] - ramp[0]), 0, 1)"
        + ("; liver px: the larger of the two localisers'" if second else ""),
        "threshold": threshold,
        "threshold_rule": "on validation: midpoint (logit) between the highest negative score and the 1% quantile "
        "of liver slices; if they overlap, just above the highest negative (strictness first); negatives: "
        "all but "
        + ", ".join(EXTRA_NEGATIVES)
        + " (files whose pixels the rule layers reject, even uploaded as a PNG without a header, "
        "never reach the gate)",
        "parameters": int(cnn.count_params()),
        "min_liver_px_512": MIN_LIVER_PX_512,
        "min_eval_liver_px_512": MIN_EVAL_LIVER_PX_512,
        "by_eye_margin_slices": BY_EYE_MARGIN_SLICES,
        "far_mm": FAR_MM,
        "metrics": {"val": val_rates, "test": test_rates},
        "selection": {
            "rule": "--select " + args.select + ": " + (val_criterion.__doc__ or "").split("\n")[0],
            "chosen_epoch": chosen,
            "chosen_area_ramp_px512": list(gate.area_ramp),
            "eligible": "strict: highest validation score of every counted negative group < "
            f"{STRICT_MAX_NEGATIVE}; far margin: localiser area on every validation far slice "
            "<= ramp start / 2; groups: every counted validation liver group (window, format) "
            "accepted >= 0.99 at the candidate's threshold",
            "chosen_passed_rules": passed,
            "history": history,
        },
        "pseudo_mr_share": args.mr_share,
        "splits_sha256": sha256_file(D.SPLITS_PATH),
        "init_sha256": sha256_file(args.init) if args.init is not None else None,
        "training_command": f"python -m ml_core.gate --epochs {args.epochs} --steps {args.steps} "
        f"--batch-size {args.batch_size} --lr {args.lr} --seed {args.seed} "
        f"--mr-share {args.mr_share} --select {args.select} --area-ramps {args.area_ramps}"
        + (f" --init {args.init}" if args.init is not None else "")
        + (
            f" --rescore --localiser {args.localiser} --checkpoint-dir {args.checkpoint_dir}"
            if getattr(args, "rescore", False)
            else ""
        )
        + (f" --second-localiser {second_path}" if second_path is not None else ""),
    }
    (out / CARD_NAME).write_text(json.dumps(card, indent=1) + "\n")
    log.info("wrote %s (%.2f MB)", out, weights.stat().st_size / 1e6)
    return 0


def copy_localiser(src: Path, dst: Path) -> list[str]:
    """Copy a localiser folder's card and weights into ``dst`` (replaced; no ONNX export: it is
    re-made per artifact); the names of the files copied."""
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    card = json.loads((src / L.CARD_NAME).read_text())
    names = [L.CARD_NAME, str(card.get("weights", L.WEIGHTS_NAME))]
    for name in names:
        shutil.copy2(src / name, dst / name)
    return names


def counts_second_localiser(gate_dir: Path) -> bool:
    """Whether the gate in ``gate_dir`` was calibrated with a second localiser (its card names
    one), i.e. whether an artifact holding it must ship ``SECOND_LOCALISER_DIR``."""
    card = gate_dir / CARD_NAME
    return card.is_file() and bool(json.loads(card.read_text()).get("second_localiser_sha256"))


def has_either_gate(folder: Path) -> bool:
    """Whether an artifact (or staging) ``folder`` holds a second gate (``EITHER_GATE_DIR``)."""
    return (Path(folder) / EITHER_GATE_DIR / CARD_NAME).is_file()


def optional_parts(folder: Path) -> list[str]:
    """The folders beside ``localiser/`` and ``gate/`` that an artifact (or staging) ``folder``
    serves: the gate's second localiser when its gate counts one, and a second gate."""
    parts = [SECOND_LOCALISER_DIR] if counts_second_localiser(folder / "gate") else []
    return parts + ([EITHER_GATE_DIR] if has_either_gate(folder) else [])


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry: ``python -m ml_core.gate [options]``."""
    parser = argparse.ArgumentParser(prog="python -m ml_core.gate", description=run.__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
