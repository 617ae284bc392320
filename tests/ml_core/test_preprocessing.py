"""Preprocessing: the one window/stretch entry for training and serving, letterbox, augmentations."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from ml_core.decoding import decode
from ml_core.preprocessing import (
    augment,
    jitter_window,
    jpeg_recompress,
    letterbox,
    random_flip,
    random_rotate_scale,
    to_model_input,
    to_slice_u8,
    unletterbox,
    window,
)


def test_window_maps_abdominal_range_to_uint8() -> None:
    hu = np.array([[-1000.0, -150.0, 50.0, 250.0, 3000.0]], dtype=np.float32)
    out = window(hu)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 128, 255, 255]]


def test_same_slice_from_dicom_png_and_jpeg_looks_the_same(make: SimpleNamespace, ircadb) -> None:  # type: ignore[no-untyped-def]
    from_dicom = to_slice_u8(decode(make.dicom(make.ct_dataset(ircadb.hu))))
    exported = make.window(ircadb.hu, 400, 50)  # a clinic's PNG/JPEG export at W400/L50
    from_png = to_slice_u8(decode(make.png(exported)))
    from_jpeg = to_slice_u8(decode(make.jpeg(exported, 95)))
    assert from_dicom.dtype == from_png.dtype == from_jpeg.dtype == np.uint8
    assert np.abs(from_dicom.astype(int) - from_png).max() <= 1
    assert np.abs(from_dicom.astype(int) - from_jpeg).mean() < 2.0


def test_mr_is_stretched_by_percentiles(read) -> None:  # type: ignore[no-untyped-def]
    img = decode(read("pydicom_abdomen/mr_abdomen_liver_lesion__MR-SIEMENS-DICOM-WithOverlays.dcm"))
    u8 = to_slice_u8(img)
    assert u8.dtype == np.uint8 and u8.shape == img.pixels.shape
    assert np.percentile(u8, 99.5) == 255 and np.percentile(u8, 0.5) == 0


def test_letterbox_keeps_aspect_and_maps_back() -> None:
    img = np.zeros((300, 600), np.uint8)
    img[100:120, 400:430] = 255  # a marker
    boxed, box = letterbox(img, 224)
    assert boxed.shape == (224, 224) and box.scale == 224 / 600
    assert boxed[: box.top].max() == 0 and boxed[box.top + box.inner[0] :].max() == 0  # padding
    heat = (boxed > 128).astype(np.float32)
    back = unletterbox(heat, box)
    assert back.shape == (300, 600)
    ys, xs = np.nonzero(back > 0.5)
    assert 95 <= ys.mean() <= 125 and 395 <= xs.mean() <= 435


def test_unletterbox_accepts_a_coarse_map() -> None:
    _, box = letterbox(np.zeros((512, 400), np.uint8), 224)
    back = unletterbox(np.ones((7, 7), np.float32), box)
    assert back.shape == (512, 400) and np.allclose(back, 1.0)


def test_model_input_batch_shape() -> None:
    batch = to_model_input([np.full((512, 512), 7, np.uint8), np.zeros((300, 200), np.uint8)], 128)
    assert batch.shape == (2, 128, 128, 3) and batch.dtype == np.float32
    assert batch[0].max() == 7.0


def test_augmentations_are_reproducible_and_keep_shape(ircadb) -> None:  # type: ignore[no-untyped-def]
    a = augment(ircadb.hu.astype(np.float32), np.random.default_rng(3), is_hu=True)
    b = augment(ircadb.hu.astype(np.float32), np.random.default_rng(3), is_hu=True)
    assert a.dtype == np.uint8 and a.shape == (512, 512)
    assert np.array_equal(a, b)
    c = augment(window(ircadb.hu), np.random.default_rng(4), is_hu=False)
    assert c.dtype == np.uint8 and c.shape == (512, 512)


def test_window_jitter_stays_in_abdominal_windows(ircadb) -> None:  # type: ignore[no-untyped-def]
    hu = np.linspace(-300, 400, 512 * 4, dtype=np.float32).reshape(4, 512)
    for seed in range(20):
        out = jitter_window(hu, np.random.default_rng(seed)).astype(int)
        # W 300–450 / L 30–70: -195 HU is always black, 295 HU always white
        assert out[hu <= -195].max() == 0 and out[hu >= 295].min() == 255


def test_flip_rotate_and_jpeg(ircadb) -> None:  # type: ignore[no-untyped-def]
    u8 = window(ircadb.hu)
    flipped = random_flip(u8, np.random.default_rng(0), p=1.0)
    assert np.array_equal(flipped, u8[:, ::-1])
    rotated = random_rotate_scale(u8, np.random.default_rng(0))
    assert rotated.shape == u8.shape and not np.array_equal(rotated, u8)
    recompressed = jpeg_recompress(u8, np.random.default_rng(0))
    assert recompressed.shape == u8.shape and np.abs(recompressed.astype(int) - u8).mean() < 6
