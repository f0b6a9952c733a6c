"""Per-class RPN and R-CNN refiner (models/localizer.py) against independent computations."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from detres import boxes as box_ops
from detres.models.anchors import AnchorGenerator
from detres.models.localizer import (PerClassRPN, PerClassRPNHead, RCNNRefiner, crop_and_warp)
from detres.models.resnet import ResNet
from detres.models.roi_head import BOX_WEIGHTS
from detres.models.rpn import RPNHead
from detres.structures import ImageBatch, Targets

MEAN, STD = (120.0, 110.0, 100.0), (60.0, 60.0, 60.0)


def make_rpn(num_classes: int = 3, anchors_per_image: int = 8, sizes=(16, 32)) -> PerClassRPN:
    torch.manual_seed(0)
    trunk, _ = ResNet(18, num_classes=None, width=8).c4_split()
    anchors = AnchorGenerator(sizes, (0.5, 1.0, 2.0), stride=trunk.stride)
    head = PerClassRPNHead(trunk.out_channels, anchors.num_anchors, num_classes)
    for layer in (head.cls_logits, head.bbox_pred):  # visible outputs, not N(0, 0.01) near zero
        torch.nn.init.normal_(layer.weight, std=0.5)
        torch.nn.init.normal_(layer.bias, std=0.5)
    return PerClassRPN(trunk, head, anchors, MEAN, STD, anchors_per_image=anchors_per_image)


def test_head_layout_equals_rpn_head_for_one_class():
    torch.manual_seed(0)
    ours = PerClassRPNHead(32, 6, 1)
    ref = RPNHead(32, 6)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 32, 5, 7)
    logits, deltas = ours(x)
    ref_logits, ref_deltas = ref(x)
    assert logits.shape == (2, 5 * 7 * 6, 1) and deltas.shape == (2, 5 * 7 * 6, 1, 4)
    torch.testing.assert_close(logits[..., 0], ref_logits)
    torch.testing.assert_close(deltas[:, :, 0], ref_deltas)


def test_head_class_c_is_its_own_channel_block():
    torch.manual_seed(0)
    head = PerClassRPNHead(16, 3, 4)
    x = torch.randn(1, 16, 2, 3)
    logits, deltas = head(x)
    feat = F.relu(head.conv(x))
    raw = head.cls_logits(feat).view(1, 3, 4, 2, 3)    # (N, A, K, H, W)
    raw_d = head.bbox_pred(feat).view(1, 3, 4, 4, 2, 3)
    # anchor index r = (y * W + x) * A + a
    y, xx, a, c = 1, 2, 2, 3
    r = (y * 3 + xx) * 3 + a
    assert torch.allclose(logits[0, r, c], raw[0, a, c, y, xx])
    assert torch.allclose(deltas[0, r, c], raw_d[0, a, c, :, y, xx])


def reference_rpn_loss(rpn: PerClassRPN, images: ImageBatch, targets: list[Targets]):
    """Every anchor labelled (anchors_per_image >= R, so the sampler takes them all)."""
    logits, deltas, anchors = rpn.predict(images)
    total_cls, total_box = 0.0, 0.0
    n, r, k = logits.shape
    for i, t in enumerate(targets):
        iou = box_iou(t.boxes, anchors)                 # (M, R)
        best, idx = iou.max(0)
        forced = (iou == iou.max(1, keepdim=True).values) & (iou.max(1, keepdim=True).values > 0)
        for a in range(r):
            positive = best[a] >= 0.7 or bool(forced[:, a].any())
            negative = best[a] < 0.3 and not positive
            if positive:
                c = int(t.labels[idx[a]])
                total_cls += F.binary_cross_entropy_with_logits(logits[i, a, c], torch.tensor(1.0))
                gt = box_ops.encode(t.boxes[idx[a]][None], anchors[a][None])[0]
                total_box += F.smooth_l1_loss(deltas[i, a, c], gt, beta=1 / 9, reduction="sum")
            elif negative:
                for c in set(t.labels.tolist()):
                    total_cls += F.binary_cross_entropy_with_logits(logits[i, a, c],
                                                                    torch.tensor(0.0))
    norm = rpn.anchors_per_image * n
    return total_cls / norm, total_box / norm


def test_rpn_loss_equals_explicit_per_anchor_sum():
    rpn = make_rpn(num_classes=3, anchors_per_image=10_000)
    images = ImageBatch.from_tensors([torch.rand(3, 64, 64) * 255, torch.rand(3, 64, 48) * 255])
    targets = [Targets(torch.tensor([[4.0, 6.0, 30.0, 28.0], [30.0, 30.0, 60.0, 62.0]]),
                       torch.tensor([2, 0]), 0),
               Targets(torch.tensor([[10.0, 10.0, 40.0, 30.0]]), torch.tensor([1]), 1)]
    out = rpn(images, targets)
    ref_cls, ref_box = reference_rpn_loss(rpn, images, targets)
    torch.testing.assert_close(out.losses["loss_cls"], ref_cls, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_box"], ref_box, rtol=1e-4, atol=1e-6)
    assert out.stats["num_pos_anchors"] > 0


def test_rpn_samples_at_most_anchors_per_image_half_positive():
    rpn = make_rpn(anchors_per_image=8)
    images = ImageBatch.from_tensors([torch.rand(3, 64, 64) * 255])
    targets = [Targets(torch.tensor([[4.0, 6.0, 30.0, 28.0]]), torch.tensor([1]), 0)]
    out = rpn(images, targets)
    assert 1 <= out.stats["num_pos_anchors"] <= 4
    out.losses["loss_cls"].backward()
    # only class 1's outputs get gradient: the image has no object of classes 0 and 2
    grad = rpn.head.cls_logits.bias.grad.view(-1, 3)        # (A, K)
    assert grad[:, 1].abs().sum() > 0
    assert grad[:, 0].abs().sum() == 0 and grad[:, 2].abs().sum() == 0


def test_propose_returns_decoded_best_anchor_per_class():
    rpn = make_rpn().eval()
    images = ImageBatch.from_tensors([torch.rand(3, 64, 80) * 255])
    out = rpn.propose(images, [torch.tensor([2, 0])], topk=5, nms_threshold=None)
    logits, deltas, anchors = rpn.predict(images)
    for j, c in enumerate([2, 0]):
        boxes, scores = out[0][j]
        assert len(boxes) == 5 and torch.all(scores[:-1] >= scores[1:])
        # the best-scoring anchor whose decoded, clipped box is not empty
        decoded = box_ops.clip(box_ops.decode(deltas[0, :, c], anchors), (64, 80))
        valid = (decoded[:, 2] > decoded[:, 0]) & (decoded[:, 3] > decoded[:, 1])
        best = int(torch.where(valid, logits[0, :, c], -float("inf")).argmax())
        torch.testing.assert_close(boxes[0], decoded[best])
        torch.testing.assert_close(scores[0], logits[0, best, c].sigmoid())
        assert (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 64).all() and (boxes >= 0).all()


def test_crop_and_warp_of_pixel_aligned_box_is_the_crop():
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).view(1, 3, 20, 30)
    crops = crop_and_warp(image, [torch.tensor([[5.0, 4.0, 13.0, 12.0]])], 8)
    torch.testing.assert_close(crops[0], image[0, :, 4:12, 5:13])


def make_refiner(num_classes: int = 3) -> RCNNRefiner:
    torch.manual_seed(0)
    return RCNNRefiner(ResNet(18, num_classes=None, width=8), num_classes, 32, MEAN, STD)


def test_refiner_labels_need_the_same_class():
    refiner = make_refiner().eval()   # BN statistics of a single RoI are undefined
    images = ImageBatch.from_tensors([torch.rand(3, 64, 64) * 255])
    gt = Targets(torch.tensor([[10.0, 10.0, 40.0, 40.0]]), torch.tensor([1]), 0)
    box = torch.tensor([[11.0, 10.0, 40.0, 41.0]])      # IoU > 0.9 with the ground truth
    same = refiner(images, [box], [torch.tensor([1])], [gt])
    other = refiner(images, [box], [torch.tensor([2])], [gt])
    assert same.stats["fg_fraction"] == 1.0 and other.stats["fg_fraction"] == 0.0
    assert other.losses["loss_box"] == 0
    logits, deltas = refiner.predict(images, [box], [torch.tensor([1])])
    expected = F.binary_cross_entropy_with_logits(logits, torch.ones(1))
    torch.testing.assert_close(same.losses["loss_cls"], expected)
    target = box_ops.encode(gt.boxes, box, BOX_WEIGHTS)
    torch.testing.assert_close(same.losses["loss_box"],
                               F.smooth_l1_loss(deltas, target, beta=1.0, reduction="sum"))


def test_refine_applies_class_deltas_and_scores():
    refiner = make_refiner().eval()
    images = ImageBatch.from_tensors([torch.rand(3, 64, 64) * 255, torch.rand(3, 48, 48) * 255])
    boxes = [torch.tensor([[5.0, 5.0, 30.0, 40.0], [0.0, 0.0, 64.0, 64.0]]),
             torch.tensor([[10.0, 12.0, 20.0, 30.0]])]
    classes = [torch.tensor([0, 2]), torch.tensor([1])]
    new_boxes, scores = refiner.refine(images, boxes, classes)
    logits, deltas = refiner.predict(images, boxes, classes)
    decoded = box_ops.decode(deltas, torch.cat(boxes), BOX_WEIGHTS)
    torch.testing.assert_close(new_boxes[0], box_ops.clip(decoded[:2], (64, 64)))
    torch.testing.assert_close(new_boxes[1], box_ops.clip(decoded[2:], (48, 48)))
    torch.testing.assert_close(torch.cat(scores), logits.sigmoid())


def test_rpn_overfits_two_images():
    """The per-class RPN memorises two images: its best proposal for the true class hits
    the ground truth (IoU >= 0.5)."""
    torch.manual_seed(0)
    rpn = make_rpn(num_classes=2, anchors_per_image=32, sizes=(16, 32, 48))
    torch.nn.init.normal_(rpn.head.cls_logits.weight, std=0.01)
    torch.nn.init.zeros_(rpn.head.cls_logits.bias)
    torch.nn.init.normal_(rpn.head.bbox_pred.weight, std=0.01)
    torch.nn.init.zeros_(rpn.head.bbox_pred.bias)
    g = torch.Generator().manual_seed(1)
    ims = torch.rand(2, 3, 64, 64, generator=g) * 60
    ims[0, :, 8:40, 20:44] = 230.0   # class 0: a bright block
    ims[1, 1, 30:58, 6:30] = 250.0   # class 1: a green block
    gts = [torch.tensor([[20.0, 8.0, 44.0, 40.0]]), torch.tensor([[6.0, 30.0, 30.0, 58.0]])]
    images = ImageBatch(ims, [(64, 64), (64, 64)])
    targets = [Targets(gts[0], torch.tensor([0]), 0), Targets(gts[1], torch.tensor([1]), 1)]
    opt = torch.optim.AdamW(rpn.parameters(), lr=2e-3)
    for _ in range(150):
        loss = sum(rpn(images, targets).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    rpn.eval()
    out = rpn.propose(images, [torch.tensor([0]), torch.tensor([1])], topk=1)
    for i in range(2):
        assert box_iou(out[i][0][0], gts[i]).item() >= 0.5


def test_refinement_improves_or_keeps_the_rpn_error_on_a_fixed_case():
    """Two images, a briefly trained RPN (rough proposals), an R-CNN trained on those
    proposals: RPN+R-CNN's errors are at most the RPN's (Table 13's comparison)."""
    from detres.evaluation.localization import LocalizationResult, localization_errors
    from detres.models.classifier import Classifier
    from detres.models.loc_inference import LocTestSettings
    from detres.models.localizer import Localizer
    from detres.tasks.localization.inference import localize_batch

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    ims = (torch.rand(4, 3, 64, 64, generator=g) * 60).to(torch.uint8)
    gts = [[20, 8, 44, 40], [6, 30, 30, 58], [30, 26, 60, 50], [4, 4, 28, 24]]
    for i, (x1, y1, x2, y2) in enumerate(gts):
        ims[i, i % 2, y1:y2, x1:x2] = 240         # class = i % 2: a red or a green block
    gt_boxes = [torch.tensor([b], dtype=torch.float32) for b in gts]
    gt_labels = [torch.tensor([i % 2]) for i in range(4)]
    targets = [Targets(b, lab, i) for i, (b, lab) in enumerate(zip(gt_boxes, gt_labels))]
    images = ImageBatch(ims.float(), [(64, 64)] * 4)

    rpn = make_rpn(num_classes=2, anchors_per_image=32, sizes=(16, 32, 48))
    opt = torch.optim.AdamW(rpn.parameters(), lr=2e-3)
    for _ in range(40):                           # short: proposals stay rough
        loss = sum(rpn(images, targets).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    rpn.eval()
    props = rpn.propose(images, [lab for lab in gt_labels], topk=20)
    boxes = [torch.cat([p[0][0], gt_boxes[i]]) for i, p in enumerate(props)]
    classes = [torch.full((len(b),), int(gt_labels[i]), dtype=torch.int64)
               for i, b in enumerate(boxes)]
    refiner = make_refiner(num_classes=2)
    opt = torch.optim.AdamW(refiner.parameters(), lr=1e-3)
    for _ in range(120):
        loss = sum(refiner(images, boxes, classes, targets).losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    classifier = Classifier(ResNet(18, num_classes=2, width=8), MEAN, STD)
    settings = LocTestSettings(scales=(64,), topk_classes=5, proposals_per_class=20,
                               cls_test_size=64, cls_crop=64)
    records = localize_batch(Localizer(classifier, rpn, refiner.eval()).eval(),
                             [im.permute(1, 2, 0).numpy() for im in ims],
                             [lab.numpy() for lab in gt_labels], settings, torch.device("cpu"))
    errors = {}
    for method in ("RPN", "RPN+R-CNN"):
        results = [LocalizationResult(r["guesses"], r[method]["boxes"], r[method]["gt_boxes"])
                   for r in records]
        errors[method] = localization_errors(results, [lab.numpy() for lab in gt_labels],
                                             [b.numpy() for b in gt_boxes])
    for key in ("gt_cls_loc_err", "top5_loc_err"):
        assert errors["RPN+R-CNN"][key] <= errors["RPN"][key], errors
    assert errors["RPN"]["top5_cls_err"] == 0.0   # two classes: the top-5 holds both
