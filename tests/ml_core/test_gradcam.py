"""The forward-pass CAM equals GradientTape Grad-CAM of the real architectures (both heads; a
stride-8 map scored on its stride-16 cells included: Grad-CAM of that logit over all 64 cells)."""

from __future__ import annotations

import numpy as np
import pytest

from ml_core.gradcam import cam_from_features, cam_to_slice

tf = pytest.importorskip("tensorflow")


@pytest.fixture(
    scope="module",
    params=[
        ("b0", "gap", 32, 2, None),
        ("lite0", "max", 16, 4, None),
        ("lite0", "max", 8, 8, None),
        ("lite0", "max", 8, 8, 16),
    ],
    ids=["b0-gap", "lite0-max-os16", "lite0-max-os8-atrous", "lite0-max-os8-scored-at-16"],
)
def network(request):  # type: ignore[no-untyped-def]
    """The classifier network (real B0 / Lite0 architecture, random weights) at 64 px, and its map side."""
    import keras

    from ml_core.classifier import build_network

    backbone, head, stride, side, score_stride = request.param
    keras.utils.set_random_seed(3)
    net = build_network(64, backbone, head=head, output_stride=stride, score_stride=score_stride)
    net.map_side = side
    return net


def test_forward_cam_equals_gradient_tape_gradcam(network) -> None:  # type: ignore[no-untyped-def]
    """The heatmap a clinician sees is exactly Grad-CAM, computed without a gradient tape, batched."""
    from ml_core.gradcam import gradient_tape_gradcam, make_forward

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    # Make the dense weights positive for some channels so the maps are not all clipped to zero.
    kernel = network.get_layer("logit").kernel
    kernel.assign(
        np.abs(kernel.numpy()) * np.sign(rng.standard_normal(kernel.shape)).astype(np.float32)
    )
    logits, cams = make_forward(network)(tf.constant(images))
    reference = gradient_tape_gradcam(network, images)
    side = network.map_side
    assert cams.shape == reference.shape == (4, side, side)
    np.testing.assert_allclose(cams.numpy(), reference, atol=1e-4)
    assert float(np.max(cams.numpy())) == pytest.approx(1.0, abs=1e-6)
    direct, _ = network(images, training=False)
    np.testing.assert_allclose(logits.numpy(), direct.numpy().reshape(-1), atol=1e-4)


def test_flat_or_negative_maps_are_zero_not_nan() -> None:
    """A flat or all-negative activation map gives a zero heatmap, never NaN."""
    feats = np.zeros((2, 3, 3, 4), np.float32)
    feats[1] = -1.0
    cam = cam_from_features(feats, np.ones(4, np.float32))
    assert not np.isnan(cam).any()
    assert (cam == 0).all()


def test_cam_maps_back_onto_the_full_slice() -> None:
    """The crop heatmap lands inside the crop box on the full slice, shape (H, W), range [0, 1]."""
    cam = np.zeros((4, 4), np.float32)
    cam[1, 2] = 1.0
    heat = cam_to_slice(cam, (-10, 20, 90, 120), (80, 100))
    assert heat.shape == (80, 100) and heat.dtype == np.float32
    assert 0.0 <= heat.min() and heat.max() == pytest.approx(1.0)
    yy, xx = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert 20 <= xx < 100 and 0 <= yy < 80
    assert heat[:, :20].max() == 0.0


def test_a_16_by_16_cam_maps_each_cell_to_its_place_on_the_slice() -> None:
    """The stride-8 grid (16 x 16 at 128 px) maps back like the coarser ones: a cell peaks at its centre."""
    cam = np.zeros((16, 16), np.float32)
    cam[3, 12] = 1.0
    box = (40, 20, 360, 340)  # 320 px box: 20 px per cell
    heat = cam_to_slice(cam, box, (400, 400))
    yy, xx = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert abs(yy - (40 + 3.5 * 20)) <= 1 and abs(xx - (20 + 12.5 * 20)) <= 1
    assert heat[:40].max() == 0.0 and heat[:, 340:].max() == 0.0


def test_an_atrous_cam_offset_moves_every_cell_by_half_a_cell() -> None:
    """offset_cells -0.5 (atrous stride 8 of stride-16 weights): cell j is centred at j cells, not j + 0.5."""
    cam = np.zeros((16, 16), np.float32)
    cam[3, 12] = 1.0
    box = (40, 20, 360, 340)  # 20 px per cell
    heat = cam_to_slice(cam, box, (400, 400), offset_cells=-0.5)
    yy, xx = np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert abs(yy - (40 + 3 * 20)) <= 1 and abs(xx - (20 + 12 * 20)) <= 1
    assert heat[:30].max() == 0.0 and heat[:, 330:].max() == 0.0
    np.testing.assert_array_equal(
        cam_to_slice(cam, box, (400, 400), 0.0), cam_to_slice(cam, box, (400, 400))
    )
