"""RPN: proposals equal torchvision's RegionProposalNetwork given the same weights; losses."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.models.detection.rpn import RPNHead as TVRPNHead

from detres import boxes as box_ops
from detres.models.anchors import AnchorGenerator
from detres.models.rpn import RPN, RPNHead
from detres.structures import Targets

SIZES, RATIOS = (32, 64, 128), (0.5, 1.0, 2.0)


def make_rpn(**kwargs) -> RPN:
    torch.manual_seed(0)
    head = RPNHead(16, 9)
    for p in head.parameters():  # larger than the 0.01 init so that the proposals spread out
        torch.nn.init.normal_(p, std=0.3)
    return RPN(head, AnchorGenerator(SIZES, RATIOS), **kwargs)


def test_proposals_equal_torchvision():
    ours = make_rpn(pre_nms_topk_test=300, post_nms_topk_test=50, min_box_size=1e-3).eval()
    tv_head = TVRPNHead(16, 9)
    tv_head.load_state_dict({"conv.0.0.weight": ours.head.conv.weight,
                             "conv.0.0.bias": ours.head.conv.bias,
                             "cls_logits.weight": ours.head.cls_logits.weight,
                             "cls_logits.bias": ours.head.cls_logits.bias,
                             "bbox_pred.weight": ours.head.bbox_pred.weight,
                             "bbox_pred.bias": ours.head.bbox_pred.bias})
    ref = RegionProposalNetwork(TVAnchorGenerator((SIZES,), (RATIOS,)), tv_head, 0.7, 0.3, 256, 0.5,
                                dict(training=300, testing=300), dict(training=50, testing=50),
                                0.7).eval()
    features = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(1))
    sizes = [(96, 128), (80, 100)]
    with torch.no_grad():
        expected, _ = ref(ImageList(torch.zeros(2, 3, 96, 128), sizes), {"0": features})
        got, losses, _ = ours(features, sizes)
    assert losses == {}
    for g, e in zip(got, expected):
        assert len(e) > 10
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-4)


def test_proposals_are_detached_clipped_and_capped():
    rpn = make_rpn(post_nms_topk_train=40).train()
    features = torch.randn(2, 16, 6, 8, requires_grad=True)
    sizes = [(96, 128), (60, 70)]
    targets = [Targets(torch.tensor([[10.0, 10.0, 50.0, 60.0]]), torch.tensor([0]), 1),
               Targets(torch.tensor([[5.0, 5.0, 30.0, 40.0]]), torch.tensor([1]), 2)]
    proposals, losses, stats = rpn(features, sizes, targets)
    for p, (h, w) in zip(proposals, sizes):
        assert not p.requires_grad and p.dtype == torch.float32 and 0 < len(p) <= 40
        assert (p[:, 0] >= 0).all() and (p[:, 2] <= w).all() and (p[:, 3] <= h).all()
        assert box_ops.nonempty(p).all()
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    assert stats["rpn_num_pos_anchors"] >= 1
    sum(losses.values()).backward()
    assert features.grad is not None


def test_empty_image_gives_zero_box_loss_and_finite_cls_loss():
    rpn = make_rpn().train()
    features = torch.randn(1, 16, 6, 8)
    targets = [Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 7)]
    _, losses, stats = rpn(features, [(96, 128)], targets)
    assert losses["loss_rpn_box"].item() == 0.0
    assert torch.isfinite(losses["loss_rpn_cls"]) and losses["loss_rpn_cls"] > 0
    assert stats["rpn_num_pos_anchors"] == 0 and stats["rpn_num_neg_anchors"] == 256


@pytest.mark.parametrize("box_loss", ["smooth_l1", "l1"])
def test_losses_equal_hand_computation(box_loss):
    # A mini-batch large enough to hold every labelled anchor makes sampling deterministic.
    rpn = make_rpn(batch_size_per_image=10**6, positive_fraction=0.5, box_loss=box_loss)
    features = torch.randn(1, 16, 6, 8)
    gt = torch.tensor([[20.0, 16.0, 70.0, 80.0], [60.0, 30.0, 120.0, 60.0]])
    _, losses, _ = rpn(features, [(96, 128)], [Targets(gt, torch.tensor([0, 1]), 3)])
    logits, deltas = rpn.head(features)
    anchors = rpn.anchor_generator(features)
    iou = box_ops.box_iou(gt, anchors)
    best, idx = iou.max(0)
    pos = (best >= 0.7) | (iou == iou.max(1, keepdim=True).values).any(0)
    neg = (best < 0.3) & ~pos
    n = 10**6
    sampled = pos | neg
    cls = F.binary_cross_entropy_with_logits(logits[0][sampled], pos[sampled].float(),
                                             reduction="sum") / n
    target = box_ops.encode(gt[idx[pos]], anchors[pos])
    diff = deltas[0][pos] - target
    if box_loss == "l1":
        box = diff.abs().sum() / n
    else:
        box = F.smooth_l1_loss(deltas[0][pos], target, beta=1 / 9, reduction="sum") / n
    torch.testing.assert_close(losses["loss_rpn_cls"], cls)
    torch.testing.assert_close(losses["loss_rpn_box"], box)


def test_boundary_threshold_ignores_cross_boundary_anchors():
    rpn = make_rpn(boundary_threshold=0.0)
    anchors = rpn.anchor_generator(torch.zeros(1, 1, 6, 8))
    gt = torch.tensor([[20.0, 16.0, 70.0, 80.0]])
    labels, _ = rpn.label_anchors(anchors, [(96, 128)], [Targets(gt, torch.tensor([0]), 0)])
    outside = ((anchors[:, 0] < 0) | (anchors[:, 1] < 0)
               | (anchors[:, 2] > 128) | (anchors[:, 3] > 96))
    assert (labels[0][outside] == -1).all() and (labels[0][~outside] >= 0).any()


def test_head_shapes_and_anchor_count_mismatch():
    logits, deltas = RPNHead(16, 9)(torch.zeros(2, 16, 5, 7))
    assert logits.shape == (2, 5 * 7 * 9) and deltas.shape == (2, 5 * 7 * 9, 4)
    with pytest.raises(ValueError, match="anchors per cell"):
        RPN(RPNHead(16, 3), AnchorGenerator(SIZES, RATIOS))


def test_anchors_centred_in_batch_padding_are_never_sampled():
    # a 60x70 image padded to a 96x128 batch: its negatives come from the image alone
    rpn = make_rpn(batch_size_per_image=4096, positive_fraction=0.5)
    anchors = rpn.anchor_generator(torch.zeros(1, 1, 6, 8))
    gt = torch.tensor([[5.0, 5.0, 30.0, 40.0]])
    labels, _ = rpn.label_anchors(anchors, [(60, 70)], [Targets(gt, torch.tensor([0]), 0)])
    cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    padding = (cx >= 70) | (cy >= 60)
    assert padding.any() and (labels[0][padding] == -1).all()
    assert (labels[0][~padding] == 0).sum() > 0 and (labels[0] == 1).any()


def test_min_size_is_in_original_pixels():
    # Faster R-CNN drops proposals under 16 px of the original image: 8 px of an image shown
    # at half size, 32 px of one shown at twice its size
    rpn = make_rpn(min_box_size=16.0, post_nms_topk_test=1000, nms_threshold=1.0).eval()
    features = torch.randn(2, 16, 6, 8)
    sizes = [(96, 128), (96, 128)]
    kept, _ = rpn.propose(features, sizes, image_scales=[0.5, 2.0])
    everything, _ = make_rpn(post_nms_topk_test=1000, nms_threshold=1.0).eval().propose(
        features, sizes)
    for props, all_props, limit in zip(kept, everything, (8.0, 32.0)):
        side = torch.minimum(props[:, 2] - props[:, 0], props[:, 3] - props[:, 1])
        all_side = torch.minimum(all_props[:, 2] - all_props[:, 0],
                                 all_props[:, 3] - all_props[:, 1])
        assert (side >= limit).all() and (all_side < limit).any()
        assert len(props) == int((all_side >= limit).sum())
