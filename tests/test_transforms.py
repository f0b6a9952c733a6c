"""Transforms: hand-computed resize and flip, label alignment, boxes still enclose objects."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from detres.data.builtin import render_shapes_image
from detres.data.transforms import (DetectionTransform, PerProcessRng, eval_transform,
                                    resize_scale, train_transform)

BOXES = np.array([[10, 20, 50, 60], [0, 0, 200, 100]], np.float32)
LABELS = np.array([3, 1], np.int64)


def _image(h: int = 100, w: int = 200) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_resize_scale_hand_computed():
    assert resize_scale(100, 200, 600, 1000) == 5.0      # short side 100 -> 600 would make
    assert resize_scale(480, 640, 600, 1000) == 1.25     # 1200 > 1000, so capped: 1000 / 200
    assert resize_scale(427, 640, 600, 1000) == 600 / 427
    assert resize_scale(200, 1000, 600, 1000) == 1.0     # long side already at the cap
    assert resize_scale(100, 200, 600, None) == 6.0


def test_eval_resize_hand_computed():
    out = eval_transform(600, 1000)(_image(), BOXES, LABELS)
    assert out.image.shape == (500, 1000, 3) and out.scale == 5.0
    np.testing.assert_array_equal(out.boxes, [[50, 100, 250, 300], [0, 0, 1000, 500]])
    assert out.labels.tolist() == [3, 1] and out.boxes.dtype == np.float32
    # Rounded size: 427 x 640 at 600 / 427 -> 600 x 899.3 -> 600 x 899; boxes * scale exactly,
    # then clipped to the rounded image.
    out = eval_transform(600, 1000)(_image(427, 640), np.array([[0, 0, 640, 427.0]]), [0])
    assert out.image.shape == (600, 899, 3) and out.scale == 600 / 427
    np.testing.assert_allclose(out.boxes, [[0, 0, 899, 600]], rtol=0, atol=1e-4)
    out = eval_transform(600, 1000)(_image(427, 640), np.array([[100, 50, 200, 150.0]]), [0])
    np.testing.assert_allclose(out.boxes / out.scale, [[100, 50, 200, 150]], atol=1e-4)


def test_flip_hand_computed_and_twice_is_identity():
    flip = DetectionTransform(100, None, flip_prob=1.0)   # short side 100 of 100 x 200: scale 1
    image = _image()
    once = flip(image, BOXES, LABELS)
    assert once.scale == 1.0
    np.testing.assert_array_equal(once.image, image[:, ::-1])
    np.testing.assert_allclose(once.boxes, [[150, 20, 190, 60], [0, 0, 200, 100]], atol=1e-3)
    twice = flip(once.image, once.boxes, once.labels)
    np.testing.assert_array_equal(twice.image, image)
    np.testing.assert_allclose(twice.boxes, BOXES, atol=1e-3)
    assert twice.labels.tolist() == LABELS.tolist()


def test_empty_boxes_pass_through():
    out = train_transform((64, 80), 128, color_jitter=0.4, seed=0)(
        _image(), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert out.boxes.shape == (0, 4) and out.labels.shape == (0,)


def test_labels_stay_aligned_when_a_crop_drops_boxes():
    import albumentations as A
    crop = A.Crop(x_min=0, y_min=0, x_max=100, y_max=100)
    t = DetectionTransform(100, None, extra=[crop])
    boxes = np.array([[150, 10, 190, 50], [10, 10, 40, 40], [90, 10, 120, 40]], np.float32)
    out = t(_image(), boxes, np.array([7, 8, 9]))
    assert out.labels.tolist() == [8, 9]  # the first box is cropped away
    np.testing.assert_allclose(out.boxes, [[10, 10, 40, 40], [90, 10, 100, 40]], atol=1e-3)


def test_multiscale_draws_every_scale_and_caps_long_side():
    t = train_transform((32, 48, 64), 90, seed=1)
    sizes = {t(_image(), BOXES, LABELS).image.shape[:2] for _ in range(40)}
    assert sizes == {(32, 64), (45, 90)}  # 48 and 64 are capped by the long side 90


@pytest.mark.parametrize("seed", [0, 1])
def test_boxes_enclose_their_objects_after_augmentation(seed):
    """Render shapes, augment each shape's mask as an image with the boxes of all shapes:
    the transformed mask lies inside the transformed box, and touches its sides."""
    t = train_transform((96, 128, 160, 200), 240, flip_prob=0.5, color_jitter=0.4, seed=seed)
    flips = 0
    for i in range(6):
        image, boxes, labels, masks = render_shapes_image(np.random.default_rng([9, seed, i]))
        t(image, boxes, labels)  # the real image goes through too
        for k, mask in enumerate(masks):
            as_image = np.repeat(mask[:, :, None].astype(np.uint8) * 255, 3, axis=2)
            out = t(as_image, boxes, labels)
            assert out.labels.tolist() == labels.tolist()
            x1, y1, x2, y2 = out.boxes[k]
            ys, xs = np.nonzero(out.image[:, :, 0] > 127)
            assert xs.min() >= np.floor(x1) - 1 and xs.max() + 1 <= np.ceil(x2) + 1
            assert ys.min() >= np.floor(y1) - 1 and ys.max() + 1 <= np.ceil(y2) + 1
            assert abs(xs.min() - x1) <= 2 * out.scale and abs(ys.max() + 1 - y2) <= 2 * out.scale
            flips += bool(abs(x1 - boxes[k, 0] * out.scale) > 1)
    assert flips > 0  # some were flipped


class _Draws(torch.utils.data.Dataset):
    """Each item: which worker drew it and the draw, from one shared ``PerProcessRng``."""

    def __init__(self) -> None:
        self.rng = PerProcessRng(seed=0)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, int]:
        rng, _ = self.rng.get()
        return torch.utils.data.get_worker_info().id, int(rng.integers(2**62))


def test_per_process_rng_gives_each_worker_its_own_repeatable_stream():
    def draws() -> dict[int, list[int]]:
        loader = torch.utils.data.DataLoader(_Draws(), batch_size=None, num_workers=2,
                                             generator=torch.Generator().manual_seed(3))
        out: dict[int, list[int]] = {}
        for worker, value in loader:
            out.setdefault(int(worker), []).append(int(value))
        return out
    first = draws()
    assert sorted(first) == [0, 1] and first[0] != first[1]      # no worker repeats another
    assert draws() == first                                      # the loader's seed fixes them
    rng = PerProcessRng(seed=0)
    a, fresh = rng.get(sample_seed=5)
    assert fresh and a.integers(2**62) == np.random.default_rng(5).integers(2**62)

