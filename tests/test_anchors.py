"""Anchors vs torchvision's AnchorGenerator; box coding vs torchvision's BoxCoder."""
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detres import boxes as box_ops
from detres.models.anchors import (ANCHOR_SIZES_COCO, ANCHOR_SIZES_MODERN, ANCHOR_SIZES_VOC,
                                   ASPECT_RATIOS, AnchorGenerator, cell_anchors)


@pytest.mark.parametrize("sizes", [ANCHOR_SIZES_VOC, ANCHOR_SIZES_COCO, ANCHOR_SIZES_MODERN])
def test_anchors_equal_torchvision(sizes):
    ours = AnchorGenerator(sizes, ASPECT_RATIOS, stride=16)
    ref = TVAnchorGenerator(sizes=(sizes,), aspect_ratios=(ASPECT_RATIOS,))
    features = torch.zeros(2, 8, 5, 7)
    images = ImageList(torch.zeros(2, 3, 80, 112), [(80, 112), (70, 100)])
    expected = ref(images, [features])
    got = ours(features)
    assert got.shape == (5 * 7 * len(sizes) * 3, 4)
    assert ours.num_anchors == ref.num_anchors_per_location()[0]
    for e in expected:
        torch.testing.assert_close(got, e, rtol=0, atol=0)


def test_cell_anchors_areas_and_ratios():
    a = cell_anchors([128.0], [0.5, 1.0, 2.0])
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    torch.testing.assert_close(h / w, torch.tensor([0.5, 1.0, 2.0]), rtol=0.02, atol=0)
    torch.testing.assert_close(w * h, torch.full((3,), 128.0**2), rtol=0.02, atol=0)
    torch.testing.assert_close((a[:, :2] + a[:, 2:]) / 2, torch.zeros(3, 2))


def test_grid_is_cached_and_follows_device():
    gen = AnchorGenerator((32,), (1.0,), stride=16)
    a = gen(torch.zeros(1, 1, 3, 4))
    assert a.data_ptr() == gen(torch.zeros(2, 1, 3, 4)).data_ptr()
    # Cell (y=1, x=2) is centred on pixel (32, 16).
    torch.testing.assert_close(a[1 * 4 + 2], torch.tensor([16.0, 0.0, 48.0, 32.0]))


def test_invalid_sizes_raise():
    with pytest.raises(ValueError):
        AnchorGenerator((0, 32), (1.0,))
    with pytest.raises(ValueError):
        AnchorGenerator((), (1.0,))


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_equal_torchvision_box_coder(weights):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 200
    anchors = torch.cat((xy, xy + 5 + torch.rand(50, 2, generator=g) * 100), dim=1)
    xy = torch.rand(50, 2, generator=g) * 200
    gt = torch.cat((xy, xy + 5 + torch.rand(50, 2, generator=g) * 100), dim=1)
    coder = BoxCoder(weights)
    deltas = box_ops.encode(gt, anchors, weights)
    torch.testing.assert_close(deltas, coder.encode_single(gt, anchors), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(box_ops.decode(deltas, anchors, weights),
                               coder.decode_single(deltas, anchors), rtol=1e-4, atol=1e-3)
    # Class-specific (R, 4K) deltas decode like torchvision's per-class decode.
    deltas_k = torch.randn(50, 12, generator=g)
    expected = coder.decode_single(deltas_k, anchors)
    torch.testing.assert_close(box_ops.decode(deltas_k, anchors, weights), expected,
                               rtol=1e-4, atol=1e-3)
