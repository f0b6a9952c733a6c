"""ImageNet localization with a per-class RPN and an R-CNN refinement (He et al. 2015, Appendix C).

Three networks, as in the paper's Table 13:

- a **classifier** (``models/classifier.py``) predicts the image's classes (top-5);
- a **per-class RPN** (:class:`PerClassRPN`): a ResNet trunk (conv1..conv4_x, stride 16), a 3x3
  conv, and sibling 1x1 layers giving, per anchor, K binary logistic scores (one per class) and
  4K box deltas. Anchors are the translation-invariant anchors of the RPN. It is trained on
  random crops with a few anchors sampled per image (paper: 8) at 1:1 positive:negative, and
  applied fully convolutionally to the whole image at test time;
- an **R-CNN refiner** (:class:`RCNNRefiner`): each of a class's top proposals (paper: 200) is
  cropped from the original image and warped to the classifier's input size (one RoIAlign over
  the image, which is R-CNN's crop-and-warp with bilinear, area-averaged sampling), run through
  a ResNet with global pooling, and rescored and regressed by two sibling per-class layers.

Test time (:meth:`Localizer.predict`, i.e. ``loc_inference.localize``, per image, original
pixels throughout the output): the classifier's top-k classes (paper: top-5) are the guesses,
its softmax scores averaged over the test views (one crop, ten crops or several whole-image
scales, Sec. 3.4); the per-class RPN runs densely at each test scale (or on one centre crop,
Table 13's "1-crop") and, for each guessed class (and each ground-truth class, for the oracle
"error on the ground-truth class"), the proposals of all scales are merged, NMS-ed and cut to
the top ``proposals_per_class``; the RPN-only answer is the class's best proposal, and with the
R-CNN the best-scoring refined proposal (the R-CNN runs on pieces of at most
``rcnn_chunk`` proposals, under CUDA autocast). The resized views come from the data side
(``models/loc_inference.py``'s ``LocViews``, made by ``data/loc_transforms.py``); several
trained localizers are tested as one by ``loc_inference.LocalizerEnsemble``. The pipeline
lives in ``loc_inference.py``, which runs any model with ``Localizer``'s test methods and
imports nothing from here (this module imports it).

Shapes: N images, K classes, A anchors per cell, R = H * W * A anchors of a stride-16 map,
P proposals of one class in one image.

Per-class losses. An anchor (or proposal) belongs to a class through the ground truth: a
positive is matched to a box of class c and trains output c to 1 and the deltas of class c; a
negative trains to 0 the outputs of the image's ground-truth classes. The other K - 1 outputs
get no gradient from that image: at test time a class's outputs are only read for the classes
that the classifier predicts, so each output only has to tell its class's objects from the
background of images of that class.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, roi_align

from detres import boxes as box_ops
from detres.models.anchors import AnchorGenerator
from detres.models.classifier import Classifier, mean_softmax
from detres.models.loc_inference import (ClassProposals, LocTestSettings, LocViews, RPNView,
                                         dense_proposals, flat_proposals, localize)
from detres.models.losses import BoxLoss, box_regression_loss
from detres.models.matching import Matcher, sample_balanced
from detres.models.pixels import channel_values, normalize
from detres.models.resnet import ResNet, ResNetTrunk
from detres.models.roi_head import BOX_WEIGHTS, init_box_predictor
from detres.structures import ImageBatch, Targets


@dataclass
class LocOutput:
    """What a training forward returns: losses and scalar stats (see engine/loop.py)."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class PerClassRPNHead(nn.Module):
    """3x3 conv + ReLU, then sibling 1x1 layers: A * K logits and A * K * 4 deltas."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int,
                 conv_channels: int | None = None) -> None:
        super().__init__()
        conv_channels = conv_channels or in_channels
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.conv = nn.Conv2d(in_channels, conv_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(conv_channels, num_anchors * num_classes, kernel_size=1)
        self.bbox_pred = nn.Conv2d(conv_channels, num_anchors * num_classes * 4, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)  # as the RPN (Ren et al. 2015, 3.1.3)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) -> logits (N, R, K), deltas (N, R, K, 4), anchors flattened (H, W, A)."""
        x = F.relu(self.conv(features))
        n, _, h, w = x.shape
        a, k = self.num_anchors, self.num_classes
        logits = self.cls_logits(x).view(n, a, k, h, w).permute(0, 3, 4, 1, 2)
        deltas = self.bbox_pred(x).view(n, a, k, 4, h, w).permute(0, 4, 5, 1, 2, 3)
        return logits.reshape(n, h * w * a, k), deltas.reshape(n, h * w * a, k, 4)


class PerClassRPN(nn.Module):
    """The per-class RPN of Appendix C: trunk -> head, with its anchors and losses.

    Args:
        trunk: conv1..conv4_x of a ResNet (``ResNet.c4_split()[0]``).
        head: the per-class head for ``anchor_generator.num_anchors`` anchors.
        pixel_mean, pixel_std: RGB in 0..255; inputs are ImageBatch tensors in 0..255.
        iou_thresholds: (low, high): negative below, positive at or above (RPN: 0.3, 0.7).
        anchors_per_image: anchors sampled per training image (paper: 8).
        positive_fraction: at most this share of them positive (paper: 1:1, 0.5).
        box_loss, smooth_l1_beta: as the RPN's.
    """

    def __init__(self, trunk: ResNetTrunk, head: PerClassRPNHead,
                 anchor_generator: AnchorGenerator, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], *, iou_thresholds: tuple[float, float] = (0.3, 0.7),
                 anchors_per_image: int = 8, positive_fraction: float = 0.5,
                 box_loss: BoxLoss = "smooth_l1", smooth_l1_beta: float = 1.0 / 9) -> None:
        super().__init__()
        if head.num_anchors != anchor_generator.num_anchors:
            raise ValueError(f"the head predicts {head.num_anchors} anchors per cell but the "
                             f"anchor generator makes {anchor_generator.num_anchors}")
        self.trunk, self.head, self.anchor_generator = trunk, head, anchor_generator
        self.register_buffer("pixel_mean", channel_values(pixel_mean))
        self.register_buffer("pixel_std", channel_values(pixel_std))
        self.matcher = Matcher(*iou_thresholds, allow_low_quality_matches=True)
        self.anchors_per_image = anchors_per_image
        self.positive_fraction = positive_fraction
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def predict(self, images: ImageBatch) -> tuple[Tensor, Tensor, Tensor]:
        """logits (N, R, K), deltas (N, R, K, 4) and anchors (R, 4) of a batch."""
        features = self.trunk(normalize(images.tensor, self.pixel_mean, self.pixel_std))
        logits, deltas = self.head(features)
        return logits, deltas, self.anchor_generator(features)

    def forward(self, images: ImageBatch, targets: list[Targets]) -> LocOutput:
        """Training: the per-class logistic and box losses over the sampled anchors, summed
        and divided by ``anchors_per_image * N`` (as the RPN's mini-batch normalisation)."""
        logits, deltas, anchors = self.predict(images)
        # Only the sampled (image, anchor, class) entries enter the loss: gather them rather
        # than weight a dense (N, R, K) target (K = 1000 makes that gigabytes per batch).
        cls_idx, cls_target, box_idx, box_target = [], [], [], []
        for i, target in enumerate(targets):
            gt_boxes = target.boxes.to(anchors.device, torch.float32)
            gt_labels = target.labels.to(anchors.device)
            if len(gt_boxes) == 0:  # a crop that lost every box teaches nothing per class
                continue
            matched, labels = self.matcher(box_ops.box_iou(gt_boxes, anchors))
            sampled = sample_balanced(labels, self.anchors_per_image, self.positive_fraction)
            pos = (sampled & (labels == 1)).nonzero().squeeze(1)
            neg = (sampled & (labels == 0)).nonzero().squeeze(1)
            pos_labels = gt_labels[matched[pos]]
            image_classes = torch.unique(gt_labels)
            neg_anchor = neg.repeat_interleave(len(image_classes))
            neg_class = image_classes.repeat(len(neg))
            image = torch.full((len(pos) + len(neg_anchor),), i, device=anchors.device)
            cls_idx.append(torch.stack([image, torch.cat([pos, neg_anchor]),
                                        torch.cat([pos_labels, neg_class])]))
            cls_target.append(torch.cat([torch.ones(len(pos), device=anchors.device),
                                         torch.zeros(len(neg_anchor), device=anchors.device)]))
            box_idx.append(torch.stack([image[:len(pos)], pos, pos_labels]))
            box_target.append(box_ops.encode(gt_boxes[matched[pos]], anchors[pos]))
        normalizer = float(self.anchors_per_image * len(targets))
        if not cls_idx:  # no image with a box: zero losses that still reach every output
            zero = logits.sum() * 0.0 + deltas.sum() * 0.0
            return LocOutput({"loss_cls": zero, "loss_box": zero},
                             {"num_pos_anchors": zero.detach()})
        i, a, c = torch.cat(cls_idx, 1)
        loss_cls = F.binary_cross_entropy_with_logits(
            logits[i, a, c].float(), torch.cat(cls_target), reduction="sum") / normalizer
        i, a, c = torch.cat(box_idx, 1)
        loss_box = box_regression_loss(deltas[i, a, c], torch.cat(box_target), self.box_loss,
                                       self.smooth_l1_beta).sum() / normalizer
        stats = {"num_pos_anchors": torch.tensor(len(i) / len(targets))}
        return LocOutput({"loss_cls": loss_cls, "loss_box": loss_box}, stats)

    @torch.no_grad()
    def propose(self, images: ImageBatch, classes: list[Tensor], *, topk: int = 200,
                pre_nms_topk: int = 6000, nms_threshold: float | None = 0.7
                ) -> ClassProposals:
        """Dense (fully convolutional) proposals for the given classes of each image.

        Args:
            classes: per image a (C_i,) int64 tensor of the classes to propose for.
            topk: proposals kept per class (paper: 200).
            pre_nms_topk: best anchors kept per class before NMS.
            nms_threshold: IoU of the per-class NMS, or None for none.

        Returns:
            per image, per requested class: (boxes (P, 4) float32 in the batch's pixels,
            clipped to the image; scores (P,) sigmoid probabilities), best first.
        """
        logits, deltas, anchors = self.predict(images)
        out = []
        for i, (size, wanted) in enumerate(zip(images.sizes, classes)):
            if len(wanted) == 0:
                out.append([])
                continue
            # All requested classes at once: (k, C) best anchors per class, one decode, one NMS
            # with the class as group; many small per-class ops cost more than the work on CPU.
            k = min(pre_nms_topk, logits.shape[1])
            scores, idx = logits[i][:, wanted].float().topk(k, dim=0)          # (k, C)
            column = torch.arange(len(wanted), device=idx.device).expand(k, -1)
            boxes = box_ops.clip(box_ops.decode(deltas[i][idx, wanted[None, :]], anchors[idx]),
                                 size)                                       # (k, C, 4)
            boxes, scores, column = boxes.reshape(-1, 4), scores.reshape(-1), column.reshape(-1)
            keep = box_ops.nonempty(boxes)
            boxes, scores, column = boxes[keep], scores[keep], column[keep]
            if nms_threshold is not None:
                keep = batched_nms(boxes, scores, column, nms_threshold)   # best first
            else:
                keep = scores.argsort(descending=True)
            keep = keep[torch.sort(column[keep], stable=True).indices]        # grouped by class
            counts = torch.bincount(column[keep], minlength=len(wanted)).tolist()
            out.append([(boxes[group[:topk]], scores[group[:topk]].sigmoid())
                        for group in keep.split(counts)])
        return out


def crop_and_warp(images: Tensor, boxes: list[Tensor], size: int, context_padding: int = 0
                  ) -> Tensor:
    """R-CNN's region warp: each box of image i, resampled to (size, size).

    ``images`` (N, 3, H, W) float; ``boxes[i]`` (P_i, 4) xyxy in its pixels. RoIAlign with an
    adaptive sampling grid averages about one sample per source pixel, so shrinking a large box
    is anti-aliased. With ``context_padding`` p the box is first dilated so that, once warped,
    p pixels of context surround it on every side (R-CNN, Girshick et al. 2014, Appendix A:
    p = 16 at 227 px); the box itself then fills the central ``size - 2p`` pixels. Samples
    outside the tensor are 0. Returns (sum P_i, 3, size, size).
    """
    if not 0 <= 2 * context_padding < size:
        raise ValueError(f"context_padding must be in [0, size / 2), got {context_padding} "
                         f"for size {size}")
    boxes = [pad_boxes(b, size, context_padding) for b in boxes] if context_padding else boxes
    rois = box_ops.boxes_to_rois(boxes).to(images.device)
    return roi_align(images.float(), rois, size, 1.0, 0, aligned=True)


def pad_boxes(boxes: Tensor, size: int, context_padding: int) -> Tensor:
    """Boxes dilated by ``p / (size - 2p)`` of their width (height) on each side: the context
    that ``context_padding`` = p warped pixels cover."""
    grow = context_padding / (size - 2 * context_padding)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return boxes + torch.stack([-w, -h, w, h], 1) * grow


class RCNNRefiner(nn.Module):
    """R-CNN stage of Appendix C: warped proposal -> ResNet -> per-class score and deltas.

    Args:
        net: a ResNet built with ``num_classes=None`` (the features before pooling).
        num_classes: K.
        input_size: the warp size (paper: 224, the classification network's input).
        pixel_mean, pixel_std: RGB in 0..255.
        fg_iou_threshold: a proposal of class c is foreground when it overlaps a ground-truth
            box of class c by at least this (R-CNN: 0.5).
        context_padding: warped pixels of context around each box (R-CNN: 16 at 227 px;
            0: the tight box); see ``crop_and_warp``.
    """

    def __init__(self, net: ResNet, num_classes: int, input_size: int,
                 pixel_mean: Sequence[float], pixel_std: Sequence[float], *,
                 fg_iou_threshold: float = 0.5, box_loss: BoxLoss = "smooth_l1",
                 smooth_l1_beta: float = 1.0,
                 box_weights: tuple[float, float, float, float] = BOX_WEIGHTS,
                 context_padding: int = 0) -> None:
        super().__init__()
        if not 0 <= 2 * context_padding < input_size:
            raise ValueError(f"context_padding must be in [0, input_size / 2), got "
                             f"{context_padding} for input_size {input_size}")
        self.context_padding = context_padding
        if net.fc is not None:
            raise ValueError("RCNNRefiner needs a ResNet built with num_classes=None")
        self.net, self.num_classes, self.input_size = net, num_classes, input_size
        channels = net.feature_specs[list(net.feature_specs)[-1]].channels
        self.cls_score = nn.Linear(channels, num_classes)
        self.bbox_pred = nn.Linear(channels, 4 * num_classes)
        init_box_predictor(self.cls_score, self.bbox_pred)
        self.register_buffer("pixel_mean", channel_values(pixel_mean))
        self.register_buffer("pixel_std", channel_values(pixel_std))
        self.fg_iou_threshold = fg_iou_threshold
        self.box_loss, self.smooth_l1_beta = box_loss, smooth_l1_beta
        self.box_weights = tuple(box_weights)

    def predict(self, images: ImageBatch, boxes: list[Tensor], classes: list[Tensor]
                ) -> tuple[Tensor, Tensor]:
        """Logit (P,) and deltas (P, 4) of each box for its own class; boxes in image pixels,
        ``classes[i]`` (P_i,) the class of each box of image i."""
        # normalized first, padding at 0 (the mean colour): context past an image's border is
        # filled with the mean, as R-CNN does
        pixels = normalize(images.tensor, self.pixel_mean, self.pixel_std, images.sizes)
        x = self.net(crop_and_warp(pixels, boxes, self.input_size, self.context_padding))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        cls = torch.cat(classes)
        logits = self.cls_score(x).gather(1, cls[:, None]).squeeze(1)
        deltas = self.bbox_pred(x).view(len(x), -1, 4)[torch.arange(len(x)), cls]
        return logits, deltas

    def forward(self, images: ImageBatch, proposals: list[Tensor], classes: list[Tensor],
                targets: list[Targets]) -> LocOutput:
        """Training (RoI-centric): binary logistic loss of every proposal for its class and box
        loss on the foreground ones, both averaged over the proposals of the batch."""
        labels, gt_deltas = [], []
        for boxes, cls, target in zip(proposals, classes, targets):
            gt_boxes = target.boxes.to(boxes.device, torch.float32)
            same = target.labels.to(boxes.device)[None, :] == cls[:, None]    # (P, M)
            iou = torch.where(same, box_ops.box_iou(boxes, gt_boxes), -1.0) if len(gt_boxes) \
                else boxes.new_full((len(boxes), 1), -1.0)
            best, idx = iou.max(1)
            labels.append(best >= self.fg_iou_threshold)
            matched = gt_boxes[idx] if len(gt_boxes) else boxes
            gt_deltas.append(box_ops.encode(matched, boxes, self.box_weights))
        logits, deltas = self.predict(images, proposals, classes)
        fg = torch.cat(labels)
        num = max(len(fg), 1)
        loss_cls = F.binary_cross_entropy_with_logits(logits.float(), fg.float(), reduction="sum")
        box_loss = box_regression_loss(deltas, torch.cat(gt_deltas), self.box_loss,
                                       self.smooth_l1_beta)
        loss_box = torch.where(fg[:, None], box_loss, 0.0).sum()
        stats = {"fg_fraction": fg.float().sum() / num}
        return LocOutput({"loss_cls": loss_cls / num, "loss_box": loss_box / num}, stats)

    @torch.no_grad()
    def refine(self, images: ImageBatch, boxes: list[Tensor], classes: list[Tensor]
               ) -> tuple[list[Tensor], list[Tensor]]:
        """Rescored and regressed boxes: per image (P_i, 4) boxes clipped to the image and
        (P_i,) sigmoid scores, in input order."""
        if sum(len(b) for b in boxes) == 0:
            return list(boxes), [b.new_zeros(len(b)) for b in boxes]
        logits, deltas = self.predict(images, boxes, classes)
        refined = box_ops.decode(deltas, torch.cat(boxes), self.box_weights)
        out_boxes, out_scores, start = [], [], 0
        for b, size in zip(boxes, images.sizes):
            end = start + len(b)
            out_boxes.append(box_ops.clip(refined[start:end], size))
            out_scores.append(logits[start:end].float().sigmoid())
            start = end
        return out_boxes, out_scores


class Localizer(nn.Module):
    """The three networks of Appendix C in one module (one checkpoint); ``rcnn`` may be None
    (RPN-only localization)."""

    def __init__(self, classifier: Classifier, rpn: PerClassRPN,
                 rcnn: RCNNRefiner | None) -> None:
        super().__init__()
        if classifier.num_classes != rpn.num_classes or (
                rcnn is not None and rcnn.num_classes != rpn.num_classes):
            raise ValueError(f"class counts differ: classifier {classifier.num_classes}, RPN "
                             f"{rpn.num_classes}, R-CNN {rcnn.num_classes if rcnn else '-'}")
        self.classifier, self.rpn, self.rcnn = classifier, rpn, rcnn

    @property
    def num_classes(self) -> int:
        return self.rpn.num_classes

    @property
    def has_rcnn(self) -> bool:
        return self.rcnn is not None

    def predict(self, views: LocViews, gt_classes: Sequence[Sequence[int]],
                settings: LocTestSettings, device: torch.device) -> list[dict]:
        """The pipeline (module docstring) on N images; see ``loc_inference.localize``."""
        return localize(self, views, gt_classes, settings, device)

    def class_scores(self, views: list[list[Tensor]], device: torch.device) -> Tensor:
        """(N, K) softmax scores, averaged over each image's views (10-crop or multi-scale
        testing); views of one size run as one batch, whole images of other sizes alone (so
        no padding enters their global average)."""
        return mean_softmax(self.classifier, views, device)

    def proposals(self, views: Sequence[RPNView], wanted: list[Tensor],
                  settings: LocTestSettings, device: torch.device) -> ClassProposals:
        return dense_proposals(self.rpn, views, wanted, settings, device)

    def refine(self, originals: ImageBatch, proposals: ClassProposals, wanted: list[Tensor],
               device: torch.device) -> ClassProposals:
        """The R-CNN's rescored and regressed proposals, grouped as ``proposals``, in one
        forward (``loc_inference.refine_in_chunks`` calls it on pieces of a bounded size)."""
        flat = [flat_proposals(per_class, w) for per_class, w in zip(proposals, wanted)]
        boxes, classes = [b.to(device) for b, _ in flat], [c.to(device) for _, c in flat]
        new_boxes, new_scores = self.rcnn.refine(originals.to(device), boxes, classes)
        refined = []
        for per_class, nb, ns in zip(proposals, new_boxes, new_scores):
            sizes = [len(b) for b, _ in per_class]
            refined.append(list(zip(nb.cpu().split(sizes), ns.cpu().split(sizes))))
        return refined
