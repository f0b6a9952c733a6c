"""C4 RoI head: pooling ops, sampling invariants, losses, and torchvision's RoIHeads as oracle."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, roi_align, roi_pool

from detres import boxes as box_ops
from detres.models.resnet import ResNet
from detres.models.roi_head import C4RoIHead, pool_rois
from detres.structures import Targets

K = 3


def make_head(**kwargs) -> C4RoIHead:
    torch.manual_seed(0)
    _, res5 = ResNet(18, num_classes=None, width=8, norm="frozen_bn").c4_split()
    head = C4RoIHead(res5, K, res5.out_channels, **kwargs)
    nn.init.normal_(head.cls_score.weight, std=0.3)   # spread the scores out for the oracle
    nn.init.normal_(head.bbox_pred.weight, std=0.05)
    return head


def random_boxes(n, size=(96, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
    return box_ops.clip(torch.cat((xy, xy + wh), dim=1), size)


def test_roi_pool_equals_torchvision_roi_pool():
    features = torch.randn(2, 4, 6, 8)
    boxes = [random_boxes(5), random_boxes(3, seed=1)]
    got = pool_rois(features, box_ops.boxes_to_rois(boxes), "pool", 14, 1 / 16, 0, True)
    torch.testing.assert_close(got, roi_pool(features, boxes, 14, 1 / 16), rtol=0, atol=0)
    assert got.shape == (8, 4, 14, 14)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("ratio", [0, 1, 2, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_roi_align_gather_equals_torchvision_roi_align(aligned, ratio, channels_last):
    """Values and gradients, with RoIs partly outside the map, empty and tiny RoIs."""
    g = torch.Generator().manual_seed(ratio)
    features = torch.randn(2, 5, 7, 9, generator=g)
    corners = torch.rand(40, 4, generator=g) * 170 - 20
    boxes = torch.cat((torch.minimum(corners[:, :2], corners[:, 2:]),
                       torch.maximum(corners[:, :2], corners[:, 2:])), dim=1)
    boxes[:3, 2:] = boxes[:3, :2]            # empty
    boxes[3:6, 2:] = boxes[3:6, :2] + 0.3    # smaller than a feature cell
    rois = torch.cat((torch.randint(2, (40, 1), generator=g).float(), boxes), dim=1)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    ours_in = features.clone().contiguous(memory_format=layout).requires_grad_()
    ref_in = features.clone().requires_grad_()
    got = pool_rois(ours_in, rois, "align", 4, 1 / 16, ratio, aligned)
    expected = roi_align(ref_in, rois, 4, 1 / 16, ratio, aligned)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=g)
    got.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-5, atol=1e-5)


def test_roi_pool_is_max_over_the_cells_region():
    features = torch.arange(6 * 8, dtype=torch.float32).view(1, 1, 6, 8)
    # Fast R-CNN rounds the scaled corners and includes the end cell: x 32/16 = 2 .. 52/16 ~ 3,
    # y 16/16 = 1 .. 36/16 ~ 2 -> cells x 2..3, y 1..2, max-pooled to 1x1.
    got = pool_rois(features, torch.tensor([[0.0, 32, 16, 52, 36]]), "pool", 1, 1 / 16, 0, True)
    assert got.item() == features[0, 0, 1:3, 2:4].max()


def to_torchvision(head: C4RoIHead) -> RoIHeads:
    """The same weights in torchvision's RoIHeads (background first, 4(K+1) deltas)."""
    predictor = FastRCNNPredictor(head.res5.out_channels, K + 1)
    w, b = head.cls_score.weight, head.cls_score.bias
    predictor.cls_score.weight.data = torch.cat((w[K:], w[:K]))
    predictor.cls_score.bias.data = torch.cat((b[K:], b[:K]))
    zeros = torch.zeros(4, w.shape[1])
    predictor.bbox_pred.weight.data = torch.cat((zeros, head.bbox_pred.weight.data))
    predictor.bbox_pred.bias.data = torch.cat((torch.zeros(4), head.bbox_pred.bias.data))
    box_head = nn.Sequential(head.res5, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    pool = MultiScaleRoIAlign(["0"], 14, sampling_ratio=2)
    return RoIHeads(pool, box_head, predictor, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)


def test_eval_matches_torchvision_roi_heads():
    head = make_head(roi_op="align", aligned=False, sampling_ratio=2, min_box_size=1e-2).eval()
    ref = to_torchvision(head).eval()
    features = torch.randn(2, head.res5.in_channels, 6, 8)
    sizes = [(96, 128), (90, 110)]
    proposals = [random_boxes(60, sizes[0]), random_boxes(40, sizes[1], seed=2)]
    with torch.no_grad():
        tv_pooled = ref.box_roi_pool({"0": features}, proposals, sizes)
        tv_logits, _ = ref.box_predictor(ref.box_head(tv_pooled))
        expected, _ = ref({"0": features}, proposals, sizes)
        logits, _ = head.predict(features, box_ops.boxes_to_rois(proposals))
        _, detections, _ = head(features, proposals, sizes)
    torch.testing.assert_close(F.softmax(logits, -1)[:, :K], F.softmax(tv_logits, -1)[:, 1:],
                               rtol=1e-5, atol=1e-6)
    for d, e in zip(detections, expected):
        assert 10 < len(d) <= 100
        torch.testing.assert_close(d.boxes, e["boxes"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(d.scores, e["scores"], rtol=1e-5, atol=1e-6)
        assert torch.equal(d.labels, e["labels"] - 1)


def test_training_samples_invariants():
    head = make_head(batch_size_per_image=64).train()
    gt = torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]])
    proposals = [random_boxes(300), random_boxes(3)]
    targets = [Targets(gt, torch.tensor([2, 0]), 1), Targets(gt[:1], torch.tensor([1]), 2)]
    rois, labels, deltas, valid = head.sample_rois(proposals, targets)
    assert rois.shape == (64 + 4, 5) and labels.shape == (68,) and deltas.shape == (68, 4)
    assert valid.all()
    first = rois[:, 0] == 0
    fg = labels < K
    assert (fg & first).sum() <= 16 and (fg & first).sum() >= 2      # the gt boxes themselves
    assert set(labels[fg].tolist()) <= {0, 1, 2} and (labels[~fg] == K).all()
    iou = box_ops.box_iou(rois[first, 1:], gt).max(1).values
    assert (iou[fg[first]] >= 0.5).all() and (iou[~fg[first]] < 0.5).all()


def test_losses_and_empty_image():
    head = make_head().train()
    features = torch.randn(2, head.res5.in_channels, 6, 8, requires_grad=True)
    targets = [Targets(torch.tensor([[10.0, 10.0, 50.0, 60.0]]), torch.tensor([2]), 1),
               Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 2)]
    proposals = [random_boxes(50), random_boxes(50)]
    losses, detections, stats = head(features, proposals, [(96, 128)] * 2, targets)
    assert detections is None and set(losses) == {"loss_cls", "loss_box"}
    assert stats["roi_num_fg"] > 0
    sum(losses.values()).backward()
    assert features.grad.abs().sum() > 0
    losses, _, _ = head(features, [random_boxes(50)], [(96, 128)], targets[1:])
    assert losses["loss_box"].item() == 0.0 and torch.isfinite(losses["loss_cls"])


def test_losses_equal_hand_computation():
    head = make_head(box_loss="smooth_l1", smooth_l1_beta=1.0)
    logits, deltas = torch.randn(6, K + 1), torch.randn(6, 4 * K)
    labels = torch.tensor([0, 2, K, K, 1, K])
    valid = torch.tensor([True, True, True, True, True, False])
    gt_deltas = torch.randn(6, 4)
    losses = head.losses(logits, deltas, labels, gt_deltas, valid)
    ce = F.cross_entropy(logits[:5], labels[:5])
    pred = torch.stack([deltas[i].view(K, 4)[labels[i]] for i in (0, 1, 4)])
    box = F.smooth_l1_loss(pred, gt_deltas[[0, 1, 4]], beta=1.0, reduction="sum") / 5
    torch.testing.assert_close(losses["loss_cls"], ce)
    torch.testing.assert_close(losses["loss_box"], box)


def test_detections_are_clipped_capped_and_in_range():
    head = make_head(detections_per_image=7, score_threshold=0.0).eval()
    features = torch.randn(1, head.res5.in_channels, 6, 8)
    with torch.no_grad():
        _, detections, _ = head(features, [random_boxes(80)], [(90, 100)])
    d = detections[0]
    assert len(d) == 7 and (d.scores[:-1] >= d.scores[1:]).all()
    assert (d.boxes[:, 2] <= 100).all() and (d.boxes[:, 3] <= 90).all() and (d.boxes >= 0).all()
    assert ((d.labels >= 0) & (d.labels < K)).all()


@pytest.mark.parametrize("roi_op", ["pool", "align"])
def test_no_rois_give_no_detections(roi_op):
    # an RPN that keeps no proposal (e.g. random weights) must not crash the head
    head = C4RoIHead(nn.Sequential(), num_classes=3, out_channels=8, roi_op=roi_op,
                     pooled_size=4).eval()
    features = torch.randn(2, 8, 10, 10)
    _, detections, _ = head(features, [torch.zeros(0, 4), torch.zeros(0, 4)], [(160, 160)] * 2)
    assert [len(d) for d in detections] == [0, 0]
