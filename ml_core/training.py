"""Train the liver-crop tumor classifier on paired synthetic lesions (``python -m ml_core train``).

Every batch holds PAIRS: the same tumor-free liver slice without and with synthetic lesions
(ml_core.synthesis), identically windowed, cropped and augmented, so the only difference the
network can use is the lesion. Backgrounds: 3Dircadb1.7 (HU; its mass lies outside the liver)
and the CHAOS, CURVAS and AMOS 8-bit slices with liver masks (harmonised to a W400/L50-like
grey scale). Validation: synthetic pairs on held-out background patients (never the real
tumors of 3Dircadb1.1, which are the test). Checkpoints (weights + optimiser + step) go under
/work/checkpoints/<run>/ and a run resumes from them; the seed is fixed.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_core.classifier import (
    CARD,
    DEFAULT_INPUT,
    DEFAULT_MARGIN,
    HEADS,
    MODELS_DIR,
    WEIGHTS,
    crop,
    seal_card,
    sha256_file,
    square_box,
    to_model_input,
)
from ml_core.synthesis import DEFAULT_PARAMS, LesionParams, insert_lesions

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHECKPOINTS = Path("/work/checkpoints")
#: A run's checkpoint with the best synthetic validation AUC (what ``--export`` takes by default).
BEST_WEIGHTS = "best.weights.h5"
LIVER_GREY = 165.0  # liver (~110 HU) at W400/L50
MIN_LIVER_PX = 2000


@dataclass(frozen=True)
class Background:
    """A tumor-free liver slice: HU or harmonised grey float32 (H, W) and its liver mask."""

    image: np.ndarray
    liver: np.ndarray
    is_hu: bool
    spacing_mm: float | None
    patient: str
    source: str
    split: str


def harmonise_u8(img: np.ndarray, liver: np.ndarray) -> np.ndarray:
    """Map an 8-bit slice of unknown window to a W400/L50-like grey scale (float32): liver median -> 165."""
    vals = img[liver].astype(np.float32)
    med = float(np.median(vals))
    mad = float(np.median(np.abs(vals - med))) * 1.4826
    scale = float(np.clip(10.0 / max(mad, 1e-3), 0.6, 2.0))
    return LIVER_GREY + (img.astype(np.float32) - med) * scale


def load_backgrounds(data_dir: Path = DATA_DIR) -> list[Background]:
    """All tumor-free liver slices with a liver mask of at least MIN_LIVER_PX pixels."""
    from ml_core.datasets import load_splits, patient_key

    splits = load_splits()["patients"]
    out: list[Background] = []
    z = np.load(data_dir / "ircadb" / "3Dircadb1.7.npz")
    hu, liver, spacing = z["ct_hu"], z["liver"], float(z["spacing_mm"][1])
    for i in range(hu.shape[0]):
        if liver[i].sum() >= MIN_LIVER_PX:
            out.append(
                Background(
                    hu[i].astype(np.float32),
                    liver[i].copy(),
                    True,
                    spacing,
                    "3Dircadb1.7",
                    "ircadb",
                    splits["ircadb:3Dircadb1.7"],
                )
            )
    with open(data_dir / "slices_8bit" / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    cache: dict[str, Any] = {}
    for r in rows:
        if r["source"] not in ("CHAOS-CT", "CURVAS", "AMOS22") or r["has_liver_mask"] != "1":
            continue
        npz = cache.setdefault(
            r["npz_file"], np.load(data_dir / "slices_8bit" / r["npz_file"], allow_pickle=True)
        )
        k = int(r["z_index"])
        m = npz["liver"][k].astype(bool)
        if m.sum() < MIN_LIVER_PX:
            continue
        part = splits[patient_key(r["source"], r["patient_id"])]
        out.append(
            Background(
                # exported black (air, outside the field of view) stays black: the plain linear
                # map put CURVAS air mid-grey, where no upload has it and the localiser fails
                harmonise_clipped_u8(npz["img_u8"][k], m),
                m,
                False,
                None,
                r["patient_id"],
                r["source"],
                part,
            )
        )
    return out


# KiTS19 slices (kidney tumor patients, all in the train split, no liver mask) used as extra
# tumor-free backgrounds with `--extra-backgrounds kits19`: those where the shipped localiser
# finds >= MIN_LIVER_PX of liver after erosion and a by-eye montage (as exported, localiser
# contour drawn; 2026-11-28 16:00 UTC) showed a plausible liver mask and no liver lesion; every
# second slice of sarah10036's 13-slice run (neighbours are near copies).
KITS19_BY_EYE: dict[str, tuple[int, ...]] = {
    "sarah10036": (0, 2, 4, 6, 8, 10, 12),
    "sarah10037": (0, 1),
    "sarah10038": (0,),
    "sarah10041": (0,),
    "sarahB10029": (0,),
    "sarahB10070": (0,),
    "sarahB10108": (0,),
    "sarahB10187": (0,),
    "sarahB10203": (0,),
}
KITS19_EXCLUDED = {
    "sarahB10031": "the localiser's mask covers a large necrotic kidney tumor, not the liver",
    "sarahB10089": "an unusually tight field of view; the mask runs along the body wall",
    "sarahB10115": "a large round hypodense mass against the liver (cyst or gallbladder?)",
}
KITS19_ERODE_PX = 5  # keep lesions off the localiser mask's uncertain edge


def harmonise_clipped_u8(img: np.ndarray, liver: np.ndarray) -> np.ndarray:
    """``harmonise_u8`` for narrow-window exports: pixels clipped at 0 / 255 stay black / white.

    A narrow export window clips fat and air to 0; the linear noise-based map would put them
    mid-grey, where W400/L50 shows both near black.
    """
    out = harmonise_u8(img, liver)
    out[img == 0] = 0.0
    out[img == 255] = 255.0
    return out


def kits19_backgrounds(liver_masks: Any, data_dir: Path = DATA_DIR) -> list[Background]:
    """The KITS19_BY_EYE slices, harmonised, with the largest component of the eroded localiser mask.

    ``liver_masks``: a callable from uint8 slices to bool masks (or None), e.g. a Localiser's segment.
    """
    import cv2

    from ml_core.datasets import load_splits, patient_key

    splits = load_splits()["patients"]
    with open(data_dir / "slices_8bit" / "manifest.csv") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if r["source"] == "KiTS19"
            and int(r["z_index"]) in KITS19_BY_EYE.get(r["patient_id"], ())
        ]
    imgs = [
        np.load(data_dir / "slices_8bit" / r["npz_file"], allow_pickle=True)["img_u8"][
            int(r["z_index"])
        ]
        for r in rows
    ]
    kernel = np.ones((2 * KITS19_ERODE_PX + 1,) * 2, np.uint8)
    out = []
    for r, img, mask in zip(rows, imgs, liver_masks(imgs), strict=True):
        if mask is None:
            continue
        n, labels, stats, _ = cv2.connectedComponentsWithStats(
            cv2.erode(mask.astype(np.uint8), kernel)
        )
        if n < 2:
            continue
        liver = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        if liver.sum() < MIN_LIVER_PX:
            continue
        out.append(
            Background(
                harmonise_clipped_u8(img, liver),
                liver,
                False,
                None,
                r["patient_id"],
                "KiTS19",
                splits[patient_key("KiTS19", r["patient_id"])],
            )
        )
    return out


def split(backgrounds: list[Background], part: str) -> list[Background]:
    """Backgrounds of one patient-level split of ml_core/splits.json ("train", "val", "test")."""
    return [b for b in backgrounds if b.split == part]


def _window(img: np.ndarray, is_hu: bool, width: float, level: float) -> np.ndarray:
    """HU -> grey with (width, level); harmonised grey is treated as W400/L50 and re-windowed."""
    hu = img if is_hu else img / 255.0 * 400.0 - 150.0
    return np.clip((hu - (level - width / 2.0)) / width * 255.0, 0.0, 255.0)


def _augment(
    c: np.ndarray, rng: np.random.Generator, strong: bool, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop-level augmentation (rotation, noise, blur, JPEG): float32 (S, S) 0..255.

    ``mask`` (float (S, S), e.g. the lesion mask of the crop) gets the same geometric transform.
    """
    import cv2

    s = c.shape[0]
    if strong:
        ang = rng.uniform(-10, 10)
        mat = cv2.getRotationMatrix2D((s / 2, s / 2), ang, rng.uniform(0.95, 1.05))
        c = cv2.warpAffine(c, mat, (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        if mask is not None:
            mask = cv2.warpAffine(mask, mat, (s, s), flags=cv2.INTER_LINEAR)
        if rng.random() < 0.3:
            c = cv2.GaussianBlur(c, (0, 0), rng.uniform(0.3, 0.8))
        c = c + rng.normal(0, rng.uniform(0, 4), c.shape).astype(np.float32)
        if rng.random() < 0.3:
            ok, enc = cv2.imencode(
                ".jpg",
                np.clip(c, 0, 255).astype(np.uint8),
                [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 96))],
            )
            if ok:
                c = cv2.imdecode(enc, cv2.IMREAD_GRAYSCALE).astype(np.float32)
    return np.clip(c, 0, 255).astype(np.float32), mask


def make_pair(
    bg: Background,
    rng: np.random.Generator,
    size: int,
    *,
    strong: bool,
    params: LesionParams = DEFAULT_PARAMS,
    min_side_frac: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean crop, lesioned crop, lesion mask of the crop) float32 (S, S) of one background.

    Both crops are identically windowed, cropped and augmented; the mask (0..1) follows the
    same crop and geometric transform, for per-cell supervision. ``min_side_frac``: the crop
    box is at least that share of the slice side, as the serving path does with the card's
    ``input.min_side_frac``.
    """
    lesioned, lesion = insert_lesions(
        bg.image, bg.liver, rng, is_hu=bg.is_hu, spacing_mm=bg.spacing_mm, params=params
    )
    width, level = (rng.uniform(300, 450), rng.uniform(30, 70)) if strong else (400.0, 50.0)
    box = square_box(bg.liver, DEFAULT_MARGIN, min_side_frac)
    assert box is not None
    if strong:  # imitate localiser error: jitter the box by a few percent
        side = box[2] - box[0]
        j = rng.uniform(-0.06, 0.06, 4) * side
        y0, x0 = int(box[0] + j[0]), int(box[1] + j[1])
        side = int(side * (1 + j[2] / side * 2))
        box = (y0, x0, y0 + side, x0 + side)
    seed = int(rng.integers(1 << 31))
    clean, _ = _augment(
        crop(_window(bg.image, bg.is_hu, width, level), box, size),
        np.random.default_rng(seed),
        strong,
    )
    painted, mask = _augment(
        crop(_window(lesioned, bg.is_hu, width, level), box, size),
        np.random.default_rng(seed),
        strong,
        crop(lesion.astype(np.float32), box, size),
    )
    assert mask is not None
    return clean, painted, mask


CELL_FULL = 0.03  # a cell whose area is >= 3% lesion is a full positive; less scales linearly


def cell_targets(mask: np.ndarray, cells: int, *, atrous: bool = False) -> np.ndarray:
    """Per-cell lesion targets float32 (cells, cells) in [0, 1] from a crop's lesion mask (S, S).

    ``atrous`` (output stride 8 run atrous): cell j sees the stride-16 tile centred at
    j * S / cells, so its target is the lesion share of that 2S/cells window; on the odd
    subgrid ``[1::2, 1::2]`` these are exactly the stride-16 network's targets.
    """
    import cv2

    if not atrous:
        frac = cv2.resize(mask.astype(np.float32), (cells, cells), interpolation=cv2.INTER_AREA)
        return np.clip(frac / CELL_FULL, 0.0, 1.0).astype(np.float32)
    step = mask.shape[0] // cells
    padded = np.pad(mask.astype(np.float32), step)  # window [8j - 8, 8j + 8) at 16 cells, 128 px
    blocks = padded.reshape(cells + 2, step, cells + 2, step).sum(axis=(1, 3))
    window = blocks[:-1, :-1] + blocks[1:, :-1] + blocks[:-1, 1:] + blocks[1:, 1:]
    frac = window[:cells, :cells] / float(4 * step * step)
    return np.clip(frac / CELL_FULL, 0.0, 1.0).astype(np.float32)


def batches(
    backgrounds: list[Background],
    batch: int,
    size: int,
    seed: int,
    step0: int,
    curriculum: int,
    cells: int = 1,
    min_contrast_hu: float = 15.0,
    min_side_frac: float = 0.0,
    atrous: bool = False,
) -> Any:
    """Infinite generator of (images (B, S, S, 3), labels (B,), cell targets (B, c, c)) from B/2 pairs.

    Lesion contrast is drawn from ``min_contrast_hu``..70 HU darker (..50 brighter), scaled up
    by the curriculum at the start.
    """
    step = step0
    while True:
        rng = np.random.default_rng([seed, step])
        c = 1.0 + 0.6 * max(0.0, 1.0 - step / max(curriculum, 1))
        params = LesionParams(
            hypo_hu=(min_contrast_hu * c, 70.0 * c), hyper_hu=(min_contrast_hu * c, 50.0 * c)
        )
        crops, labels, targets = [], [], []
        for _ in range(batch // 2):
            bg = backgrounds[int(rng.integers(len(backgrounds)))]
            a, b, m = make_pair(
                bg, rng, size, strong=True, params=params, min_side_frac=min_side_frac
            )
            crops += [a, b]
            labels += [0.0, 1.0]
            targets += [np.zeros((cells, cells), np.float32), cell_targets(m, cells, atrous=atrous)]
        yield to_model_input(crops), np.asarray(labels, np.float32), np.stack(targets)
        step += 1


def validation_set(
    backgrounds: list[Background], n_pairs: int, size: int, seed: int, min_side_frac: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed synthetic validation set: (images (2n, S, S, 3), labels (2n,))."""
    rng = np.random.default_rng(seed + 7919)
    crops, labels = [], []
    for i in range(n_pairs):
        a, b, _ = make_pair(
            backgrounds[i % len(backgrounds)], rng, size, strong=False, min_side_frac=min_side_frac
        )
        crops += [a, b]
        labels += [0.0, 1.0]
    return to_model_input(crops), np.asarray(labels, np.float32)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank AUC (ties count one half); NaN if a class is missing."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m ml_core train``."""
    parser.add_argument(
        "--run", default="b0-128", help="run name: checkpoints in /work/checkpoints/<run>"
    )
    parser.add_argument("--backbone", choices=["b0", "lite0"], default="b0")
    parser.add_argument("--input-size", type=int, default=DEFAULT_INPUT)
    parser.add_argument(
        "--head",
        choices=list(HEADS),
        default="gap",
        help="gap: pooled features -> logit; max: a logit per feature-map cell, slice = max",
    )
    parser.add_argument(
        "--output-stride",
        type=int,
        choices=[8, 16, 32],
        default=32,
        help="lite0 feature stride (8: the stride-16 network run atrous, cell targets 16 x 16 at 128 px)",
    )
    parser.add_argument(
        "--cell-weight",
        type=float,
        default=1.0,
        help="max head: weight of the per-cell loss against the synthetic lesion masks",
    )
    parser.add_argument(
        "--batch", type=int, default=32, help="images per step (half clean, half lesioned)"
    )
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--keep-every",
        type=int,
        default=0,
        help="also keep step_NNNNN.weights.h5 every N steps (at validation steps), for a "
        "choice made later on another validation set; 0 = only best and last",
    )
    parser.add_argument(
        "--curriculum",
        type=int,
        default=600,
        help="steps over which lesion contrast eases to normal",
    )
    parser.add_argument(
        "--init", default=None, help="weights file to start from (e.g. a pretrained backbone)"
    )
    parser.add_argument(
        "--export",
        metavar="VERSION",
        default=None,
        help="write an artifact from the run's best checkpoint and stop",
    )
    parser.add_argument(
        "--export-weights",
        default=BEST_WEIGHTS,
        help="with --export: the run's weights file to export (e.g. step_00300.weights.h5)",
    )
    parser.add_argument(
        "--no-current",
        action="store_true",
        help="with --export: leave ml_core/models/CURRENT as it is (e.g. a comparison model)",
    )
    parser.add_argument(
        "--min-contrast-hu",
        type=float,
        default=15.0,
        help="faintest synthetic lesion (HU difference to the liver); small real tumors can be 3-10",
    )
    parser.add_argument(
        "--extra-backgrounds",
        nargs="*",
        choices=["kits19"],
        default=[],
        help="more tumor-free training backgrounds: kits19 = the KITS19_BY_EYE slices, masked by "
        "the staged localiser",
    )
    parser.add_argument(
        "--min-side-frac",
        type=float,
        default=0.0,
        help="floor on the crop box side as a share of the slice side (0.27 = 0.4.3's serving "
        "floor); written into the exported card's input.min_side_frac",
    )
    parser.add_argument("--checkpoints", default=str(CHECKPOINTS))
    parser.add_argument(
        "--val-pairs", type=int, default=96, help="synthetic validation pairs (fixed seed)"
    )


def run(args: argparse.Namespace) -> int:
    """Train (resuming if a checkpoint exists) or, with --export, write the artifact folder."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    ckpt = Path(args.checkpoints) / args.run
    if args.export:
        folder = export_artifact(
            ckpt, args.export, set_current=not args.no_current, weights=args.export_weights
        )
        log.info("artifact written to %s", folder)
        return 0
    train_loop(args, ckpt)
    return 0


def train_loop(args: argparse.Namespace, ckpt: Path) -> None:
    """The training loop with periodic validation, best/last checkpoints and resume."""
    import keras
    import tensorflow as tf

    from ml_core.classifier import build_network, cell_logits

    ckpt.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    backgrounds = load_backgrounds()
    if "kits19" in args.extra_backgrounds:
        from ml_core.localiser import Localiser

        localiser = Localiser.load(MODELS_DIR / "_staging" / "localiser")
        extra = kits19_backgrounds(localiser.segment)
        log.info("extra backgrounds: %d KiTS19 slices", len(extra))
        backgrounds += extra
    train, val, test = (split(backgrounds, p) for p in ("train", "val", "test"))
    manifest = {
        "rule": "patient-level, from ml_core/splits.json (python -m ml_core.datasets --write-splits)",
        "train": sorted({f"{b.source}:{b.patient}" for b in train}),
        "validation": sorted({f"{b.source}:{b.patient}" for b in val}),
        "synthetic_test": sorted({f"{b.source}:{b.patient}" for b in test}),
        "real_test": ["ircadb:3Dircadb1.1 (real tumors; never trained on)"],
        "n_train_slices": len(train),
        "n_validation_slices": len(val),
    }
    (ckpt / "split_manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("backgrounds: %d train slices, %d validation slices", len(train), len(val))
    vx, vy = validation_set(val, args.val_pairs, args.input_size, args.seed, args.min_side_frac)
    model = build_network(
        args.input_size,
        args.backbone,
        pretrained=args.backbone == "lite0",
        head=args.head,
        output_stride=args.output_stride,
    )
    if args.init:
        model.load_weights(args.init, skip_mismatch=True)
    cells = int(model.outputs[1].shape[1])
    cell_weight = float(args.cell_weight) if args.head == "max" else 0.0
    opt = keras.optimizers.AdamW(learning_rate=args.lr, weight_decay=1e-5)
    opt.build(model.trainable_variables)
    state_path = ckpt / "state.json"
    state = {"step": 0, "best_auc": -1.0, "best_step": 0, "args": vars(args)}
    if state_path.exists() and (ckpt / "last.weights.h5").exists():
        state = json.loads(state_path.read_text())
        model.load_weights(str(ckpt / "last.weights.h5"))
        opt_vars = np.load(ckpt / "last.optimizer.npz")
        for v, k in zip(opt.variables, sorted(opt_vars.files, key=int), strict=True):
            v.assign(opt_vars[k])
        log.info(
            "resumed at step %d (best val AUC %.3f at %d)",
            state["step"],
            state["best_auc"],
            state["best_step"],
        )
        # The optimiser's variables hold the old learning rate: the command line's wins.
        if not np.isclose(float(opt.learning_rate.numpy()), args.lr):
            log.info("learning rate %.2e from step %d", args.lr, state["step"])
            opt.learning_rate.assign(args.lr)
    state["invocations"] = [  # the schedule as run: every (re)start with its learning rate
        *state.get("invocations", []),
        {"from_step": int(state["step"]), "lr": args.lr, "steps": args.steps},
    ]

    @tf.function(reduce_retracing=True)
    def train_step(x: tf.Tensor, y: tf.Tensor, t: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            logit, feats = model(x, training=True)
            loss = tf.reduce_mean(
                tf.nn.sigmoid_cross_entropy_with_logits(y, tf.reshape(logit, [-1]))
            )
            if cell_weight > 0.0:  # every cell: lesion there or not (synthetic masks)
                per_cell = tf.nn.weighted_cross_entropy_with_logits(
                    t, cell_logits(model, feats), pos_weight=4.0
                )
                loss = loss + cell_weight * tf.reduce_mean(per_cell)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function(reduce_retracing=True)
    def infer(x: tf.Tensor) -> tf.Tensor:
        logit, _ = model(x, training=False)
        return tf.reshape(logit, [-1])

    gen = batches(
        train,
        args.batch,
        args.input_size,
        args.seed,
        int(state["step"]),
        args.curriculum,
        cells,
        args.min_contrast_hu,
        args.min_side_frac,
        atrous=args.output_stride == 8,
    )
    ds = tf.data.Dataset.from_generator(
        lambda: gen,
        output_signature=(
            tf.TensorSpec((args.batch, args.input_size, args.input_size, 3), tf.float32),
            tf.TensorSpec((args.batch,), tf.float32),
            tf.TensorSpec((args.batch, cells, cells), tf.float32),
        ),
    ).prefetch(3)
    t0, seen, losses = time.time(), 0, []
    for x, y, t in ds:
        step = int(state["step"])
        if step >= args.steps:
            break
        losses.append(float(train_step(x, y, t)))
        seen += args.batch
        state["step"] = step + 1
        if state["step"] % 10 == 0:
            log.info(
                "step %d loss %.4f (%.1f img/s)",
                state["step"],
                float(np.mean(losses[-10:])),
                seen / (time.time() - t0),
            )
        if state["step"] % args.eval_every == 0 or state["step"] >= args.steps:
            scores = np.concatenate([infer(vx[i : i + 64]).numpy() for i in range(0, len(vx), 64)])
            val_auc = auc(scores, vy)
            gap = float(np.mean(scores[vy > 0.5] > scores[vy <= 0.5]))
            log.info(
                "step %d validation: synthetic AUC %.3f, pair accuracy %.3f",
                state["step"],
                val_auc,
                gap,
            )
            if val_auc > state["best_auc"]:
                state["best_auc"], state["best_step"] = val_auc, state["step"]
                model.save_weights(str(ckpt / BEST_WEIGHTS))
            model.save_weights(str(ckpt / "last.weights.h5"))
            if args.keep_every and state["step"] % args.keep_every == 0:
                model.save_weights(str(ckpt / f"step_{state['step']:05d}.weights.h5"))
            np.savez(
                ckpt / "last.optimizer.npz",
                **{str(i): v.numpy() for i, v in enumerate(opt.variables)},
            )
            state["history"] = [
                *state.get("history", []),
                {
                    "step": state["step"],
                    "val_auc": val_auc,
                    "pair_acc": gap,
                    "loss": float(np.mean(losses[-args.eval_every :])),
                },
            ]
            state_path.write_text(json.dumps(state, indent=2, default=str))
    log.info(
        "done at step %d; best synthetic validation AUC %.3f at step %d",
        state["step"],
        state["best_auc"],
        state["best_step"],
    )


LICENCES = [
    {
        "data": "3D-IRCADb-01 (3Dircadb1.7 backgrounds; 3Dircadb1.1 test)",
        "source": "IRCAD France",
        "licence": "CC BY-NC-ND 4.0",
        "note": "attribution, non-commercial use; anything trained on it carries that note",
    },
    {
        "data": "CHAOS CT slices (healthy liver donors)",
        "source": "CHAOS challenge, zenodo 3362844",
        "licence": "CC BY-NC-SA 4.0",
    },
    {
        "data": "CURVAS routine abdominal CT slices",
        "source": "CURVAS challenge",
        "licence": "CC BY-NC 4.0",
    },
    {"data": "AMOS slices", "source": "AMOS 2022", "licence": "CC BY 4.0"},
    {
        "data": "liver localiser / content gate training data",
        "source": "see localiser/ and gate/ cards (H4a)",
        "licence": "as listed there",
    },
]


KITS19_LICENCE = {
    "data": "KiTS19 slices (kidney tumor patients; --extra-backgrounds kits19)",
    "source": "KiTS19 challenge",
    "licence": "CC BY-NC-SA 4.0",
}


def _train_command(run: str, a: dict[str, Any]) -> list[str]:
    """The ``python -m ml_core train`` command line that reproduces a run from its saved args."""
    cmd = ["python -m ml_core train", f"--run {run}", f"--backbone {a['backbone']}"]
    for flag, key in (
        ("--input-size", "input_size"),
        ("--head", "head"),
        ("--output-stride", "output_stride"),
        ("--cell-weight", "cell_weight"),
        ("--lr", "lr"),
        ("--curriculum", "curriculum"),
        ("--min-contrast-hu", "min_contrast_hu"),
        ("--min-side-frac", "min_side_frac"),
        ("--extra-backgrounds", "extra_backgrounds"),
        ("--init", "init"),
        ("--steps", "steps"),
        ("--seed", "seed"),
    ):
        value = a.get(key)
        if isinstance(value, list):
            value = " ".join(value) or None
        if value is not None:
            cmd.append(f"{flag} {value}")
    return cmd


def _resume_commands(
    run: str, a: dict[str, Any], invocations: list[dict[str, Any]]
) -> dict[str, str]:
    """``train_then``: the resume command of each later (re)start, e.g. a lower learning rate."""
    out = {}
    for inv in invocations[1:]:
        later = {**a, "lr": inv["lr"], "steps": inv["steps"]}
        out[f"train_then_from_step_{inv['from_step']}"] = " ".join(_train_command(run, later))
    return out


def export_artifact(
    ckpt: Path,
    version: str,
    *,
    models_dir: Path = MODELS_DIR,
    set_current: bool = True,
    weights: str = BEST_WEIGHTS,
) -> Path:
    """Write ml_core/models/liverscan-<backbone>-<version>/ from a run's weights plus the staged localiser and gate.

    ``weights`` names the file in the run's folder: its best checkpoint by default, or a kept
    ``step_NNNNN.weights.h5`` (``--keep-every``) when the choice is made on another set.
    """
    state = json.loads((ckpt / "state.json").read_text())
    a = state["args"]
    name = f"liverscan-{a['backbone']}"
    folder = models_dir / f"{name}-{version}"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt / weights, folder / WEIGHTS)
    staging = models_dir / "_staging"
    for part in _staged_parts(staging):
        if (folder / part).exists():
            shutil.rmtree(folder / part)
        if (staging / part).is_dir():
            shutil.copytree(
                staging / part, folder / part, ignore=shutil.ignore_patterns("*.log", "__pycache__")
            )
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CARD
    }
    old: dict[str, Any] = {}
    if (folder / CARD).exists():
        old = json.loads((folder / CARD).read_text())
    card = {
        **old,
        "name": name,
        "version": version,
        "backbone": a["backbone"],
        "pretrained": "ImageNet (EfficientNet-Lite0 port)"
        if a["backbone"] == "lite0"
        else "none (trained from scratch)",
        "sha256": "",  # sealed below (files and serving fields)
        "files": files,
        "weights": WEIGHTS,
        "input": {
            "kind": "liver crop",
            "size": int(a["input_size"]),
            "channels": 3,
            "range": "0..255 grey replicated to 3 channels",
            "margin": DEFAULT_MARGIN,
            "crop": "square box around the localiser's liver mask plus 10% per side, zero-padded, resized",
            "head": a.get("head", "gap"),
            "output_stride": int(a.get("output_stride", 32)),
            # atrous stride 8: cell j covers the stride-16 tile centred at 8j px (docs/model.md)
            **({"cam_offset_cells": -0.5} if int(a.get("output_stride", 32)) == 8 else {}),
            **({"min_side_frac": float(a["min_side_frac"])} if a.get("min_side_frac") else {}),
        },
        "window": {
            "width": 400,
            "level": 50,
            "note": "HU input is windowed W400/L50 by ml_core.preprocessing; PNG/JPEG are taken as already windowed",
        },
        "threshold": old.get("threshold", 0.5),
        "temperature": old.get("temperature", 1.0),
        "training": {
            "data": LICENCES
            + ([KITS19_LICENCE] if "kits19" in (a.get("extra_backgrounds") or ()) else []),
            "synthetic_lesions": "ml_core.synthesis (Hu et al., CVPR 2023, 2-D adaptation), paired batches",
            "steps": state["step"],
            "best_step": state["best_step"],
            "exported_weights": weights,
            "synthetic_validation_auc": state["best_auc"],
            "split_manifest": "split_manifest.json",
            "args": a,
            "schedule": state.get("invocations", []),
        },
        "commands": {
            "train": " ".join(_train_command(ckpt.name, a)),
            **_resume_commands(ckpt.name, a, state.get("invocations", [])),
            "export": f"python -m ml_core train --run {ckpt.name} --export {version}"
            + ("" if weights == BEST_WEIGHTS else f" --export-weights {weights}"),
        },
        "intended_use": "decision support for liver tumor screening on axial CT slices; never a diagnosis",
    }
    if (ckpt / "split_manifest.json").exists():
        shutil.copyfile(ckpt / "split_manifest.json", folder / "split_manifest.json")
        files["split_manifest.json"] = sha256_file(folder / "split_manifest.json")
        card["files"] = files
    (folder / CARD).write_text(json.dumps(seal_card(card), indent=2))
    if set_current:
        _check_loads(folder)  # never point CURRENT at a model every job would fail to load
        (models_dir / "CURRENT").write_text(folder.name + "\n")
    return folder


def _staged_parts(staging: Path) -> list[str]:
    """The staged folders an export copies: the localiser and the gate, the gate's second
    localiser (``gate.SECOND_LOCALISER_DIR``) only when the staged gate was calibrated with one,
    and a staged second gate (``gate.EITHER_GATE_DIR``)."""
    from ml_core import gate as G

    return ["localiser", "gate", *G.optional_parts(staging)]


def _check_loads(folder: Path) -> None:
    """Load the exported artifact as the worker will (classifier, and its gate if it has one)."""
    from ml_core.classifier import Classifier

    clf = Classifier.load(folder, runtime="tf")
    if (folder / "gate").is_dir():
        clf.gate()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m ml_core.training")
    add_arguments(p)
    raise SystemExit(run(p.parse_args()))
