import math

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder

from detres import boxes as B


def random_boxes(n: int, size: float = 100.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_area_matches_torchvision_and_is_never_negative():
    b = random_boxes(50)
    torch.testing.assert_close(B.area(b), torchvision.ops.box_area(b))
    assert B.area(torch.tensor([[5.0, 5.0, 2.0, 9.0]])).item() == 0.0


def test_iou_matches_torchvision_and_hand_values():
    a, b = random_boxes(20, seed=1), random_boxes(30, seed=2)
    torch.testing.assert_close(B.box_iou(a, b), torchvision.ops.box_iou(a, b))
    iou = B.box_iou(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[5.0, 0, 15, 10], [20.0, 20, 30, 30]]))
    torch.testing.assert_close(iou, torch.tensor([[50 / 150, 0.0]]))


def test_clip_matches_torchvision():
    b = random_boxes(40, size=150) - 20
    torch.testing.assert_close(B.clip(b, (90, 110)), torchvision.ops.clip_boxes_to_image(b, (90, 110)))
    batched = b.reshape(2, 20, 4)
    torch.testing.assert_close(B.clip(batched, (90, 110)).reshape(40, 4), B.clip(b, (90, 110)))


def test_nonempty_and_hflip():
    b = torch.tensor([[0.0, 0, 10, 10], [0, 0, 0.5, 10], [3, 3, 3, 8]])
    assert B.nonempty(b).tolist() == [True, True, False]
    assert B.nonempty(b, min_size=1.0).tolist() == [True, False, False]
    flipped = B.hflip(torch.tensor([[10.0, 5, 30, 20]]), width=100)
    torch.testing.assert_close(flipped, torch.tensor([[70.0, 5, 90, 20]]))
    b = random_boxes(10)
    torch.testing.assert_close(B.hflip(B.hflip(b, 200), 200), b)


def test_boxes_to_rois_hand_values_and_empty():
    boxes = [torch.tensor([[1.0, 2, 3, 4], [5, 6, 7, 8]]), torch.zeros(0, 4),
             torch.tensor([[9, 10, 11, 12]], dtype=torch.float64)]
    rois = B.boxes_to_rois(boxes)
    assert rois.dtype == torch.float32
    torch.testing.assert_close(rois, torch.tensor([[0.0, 1, 2, 3, 4], [0, 5, 6, 7, 8],
                                                   [2, 9, 10, 11, 12]]), rtol=0, atol=0)
    assert B.boxes_to_rois([]).shape == (0, 5)
    assert B.boxes_to_rois([torch.zeros(0, 4)] * 2).shape == (0, 5)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_match_torchvision_box_coder(weights):
    anchors, gt = random_boxes(64, seed=3), random_boxes(64, seed=4)
    coder = BoxCoder(weights, bbox_xform_clip=B.DELTA_CLAMP)
    deltas = B.encode(gt, anchors, weights)
    torch.testing.assert_close(deltas, coder.encode_single(gt, anchors))
    noisy = deltas + 0.1 * torch.randn_like(deltas)
    torch.testing.assert_close(B.decode(noisy, anchors, weights), coder.decode_single(noisy, anchors))
    torch.testing.assert_close(B.decode(deltas, anchors, weights), gt, rtol=1e-4, atol=1e-3)


def test_encode_hand_values():
    anchor = torch.tensor([[0.0, 0, 10, 20]])     # centre (5, 10), size (10, 20)
    gt = torch.tensor([[2.0, 4, 22, 24]])         # centre (12, 14), size (20, 20)
    expected = torch.tensor([[0.7, 0.2, math.log(2.0), 0.0]])
    torch.testing.assert_close(B.encode(gt, anchor), expected)
    torch.testing.assert_close(B.encode(gt, anchor, (10, 10, 5, 5)), expected * torch.tensor([10, 10, 5, 5]))


def test_decode_class_specific_deltas_and_clamp():
    anchors = random_boxes(5)
    deltas = torch.randn(5, 3 * 4)
    out = B.decode(deltas, anchors, (10.0, 10.0, 5.0, 5.0))
    assert out.shape == (5, 12)
    for c in range(3):
        torch.testing.assert_close(out[:, 4 * c:4 * c + 4],
                                   B.decode(deltas[:, 4 * c:4 * c + 4], anchors, (10.0, 10.0, 5.0, 5.0)))
    huge = B.decode(torch.tensor([[0.0, 0, 100, 100]]), torch.tensor([[0.0, 0, 16, 16]]))
    torch.testing.assert_close(B.area(huge), torch.tensor([1000.0 ** 2]), rtol=1e-4, atol=0)


def test_encode_is_float32_under_half_inputs():
    a, g = random_boxes(8).half(), random_boxes(8, seed=5).half()
    assert B.encode(g, a).dtype == torch.float32


def test_nms_each_equals_torchvisions_nms_image_by_image():
    g = torch.Generator().manual_seed(0)
    boxes, scores, labels = [], [], []
    for n in (300, 0, 1, 500, 50):                 # an image without boxes among them
        xy = torch.rand(n, 2, generator=g) * 200
        boxes.append(torch.cat((xy, xy + 10 + torch.rand(n, 2, generator=g) * 60), 1))
        scores.append(torch.rand(n, generator=g))
        labels.append(torch.randint(3, (n,), generator=g))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)                   # the images in parallel threads
        got = B.nms_each(boxes, scores, 0.5)
        got_per_class = B.nms_each(boxes, scores, 0.5, labels)
    finally:
        torch.set_num_threads(threads)
    for i in range(len(boxes)):
        torch.testing.assert_close(got[i], torchvision.ops.nms(boxes[i], scores[i], 0.5))
        torch.testing.assert_close(got_per_class[i], torchvision.ops.batched_nms(
            boxes[i], scores[i], labels[i], 0.5))
    assert B.nms_each([], [], 0.5) == []
