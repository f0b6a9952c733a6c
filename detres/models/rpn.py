"""Region Proposal Network on the C4 feature map (Ren et al. 2015, section 3.1; He et al.
2015, Appendix A: the RPN shares conv1..conv4_x with the detector).

Shapes: N images, C feature channels (1024 for conv4_x of ResNet-50/101), H, W the stride-16
feature size, A anchors per cell, R = H * W * A anchors, M ground-truth boxes of one image,
P proposals of one image.
Nouns: ``logits`` objectness before the sigmoid, ``deltas`` encoded box offsets (weights 1, 1,
1, 1), ``proposals`` decoded, clipped, NMS-ed boxes that the RoI head receives, detached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detres import boxes as box_ops
from detres.models.anchors import AnchorGenerator
from detres.models.losses import BoxLoss, box_regression_loss
from detres.models.matching import Matcher, sample_balanced
from detres.structures import Targets


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then sibling 1x1 layers for A objectness logits and 4A deltas.

    One logit per anchor with a sigmoid (binary cross-entropy), as torchvision and detectron2;
    the paper's 2A-way softmax is equivalent.
    """

    def __init__(self, in_channels: int, num_anchors: int,
                 conv_channels: int | None = None) -> None:
        super().__init__()
        conv_channels = conv_channels or in_channels
        self.conv = nn.Conv2d(in_channels, conv_channels, kernel_size=3, padding=1)
        self.cls_logits = nn.Conv2d(conv_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(conv_channels, 4 * num_anchors, kernel_size=1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)  # Ren et al. 2015, 3.1.3: N(0, 0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(N, C, H, W) -> logits (N, R), deltas (N, R, 4), flattened (H, W, A)."""
        x = F.relu(self.conv(features))
        logits = self.cls_logits(x)                                     # (N, A, H, W)
        deltas = self.bbox_pred(x)                                      # (N, 4A, H, W)
        n, a, h, w = logits.shape
        logits = logits.permute(0, 2, 3, 1).reshape(n, h * w * a)
        deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, h * w * a, 4)
        return logits, deltas


class RPN(nn.Module):
    """RPN head, proposal selection and losses.

    Args:
        head: the conv layers.
        anchor_generator: anchors matching ``head``'s A.
        pre_nms_topk_train / pre_nms_topk_test: best-scoring anchors kept before NMS
            (py-faster-rcnn: 12000 / 6000).
        post_nms_topk_train / post_nms_topk_test: proposals kept after NMS; the paper trains
            the detector on 2000 and tests on 300 (Ren et al. 2015, 3.3 and 4.1); modern 1000.
        nms_threshold: IoU of the proposal NMS, 0.7 (Ren et al. 2015, 3.3).
        min_box_size: proposals with width or height below this many pixels of the original
            image (times the image's scale, ``ImageBatch.scales``) are dropped; Faster R-CNN
            (py-faster-rcnn RPN_MIN_SIZE): 16.
        iou_thresholds: (low, high) = (0.3, 0.7) for negative / positive anchors (3.1.2).
        batch_size_per_image / positive_fraction: 256 anchors per image, up to half positive.
        box_loss / smooth_l1_beta: "smooth_l1" with beta 1/9 (py-faster-rcnn sigma 3) or "l1".
        boundary_threshold: if set, anchors crossing the image border by more than this many
            pixels are ignored in training (paper: 0, "cross-boundary anchors are ignored",
            3.3); None keeps them (torchvision, detectron2). Either way an anchor centred in
            the batch padding, outside its image, is never sampled.
    """

    def __init__(self, head: RPNHead, anchor_generator: AnchorGenerator, *,
                 pre_nms_topk_train: int = 12000, pre_nms_topk_test: int = 6000,
                 post_nms_topk_train: int = 2000, post_nms_topk_test: int = 300,
                 nms_threshold: float = 0.7, min_box_size: float = 0.0,
                 iou_thresholds: tuple[float, float] = (0.3, 0.7),
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 box_loss: BoxLoss = "smooth_l1", smooth_l1_beta: float = 1.0 / 9,
                 boundary_threshold: float | None = None) -> None:
        super().__init__()
        if head.cls_logits.out_channels != anchor_generator.num_anchors:
            raise ValueError(f"RPNHead predicts {head.cls_logits.out_channels} anchors per cell "
                             f"but the anchor generator makes {anchor_generator.num_anchors}")
        if box_loss not in ("smooth_l1", "l1"):
            raise ValueError(f"box_loss must be 'smooth_l1' or 'l1', got {box_loss!r}")
        self.head = head
        self.anchor_generator = anchor_generator
        self.pre_nms_topk_train, self.pre_nms_topk_test = pre_nms_topk_train, pre_nms_topk_test
        self.post_nms_topk_train, self.post_nms_topk_test = post_nms_topk_train, post_nms_topk_test
        self.nms_threshold = nms_threshold
        self.min_box_size = min_box_size
        self.matcher = Matcher(*iou_thresholds, allow_low_quality_matches=True)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.boundary_threshold = boundary_threshold

    def forward(self, features: Tensor, image_sizes: list[tuple[int, int]],
                targets: list[Targets] | None = None, image_scales: list[float] | None = None
                ) -> tuple[list[Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Proposes boxes; computes the RPN losses when targets are given.

        Args:
            features: (N, C, H, W) stride-16 features.
            image_sizes: (h, w) of each image before padding; proposals are clipped to it.
            targets: ground truth per image, or None.
            image_scales: resized / original per image (None: 1), for ``min_box_size``.

        Returns:
            proposals: N tensors (P_i, 4) float32, detached, best objectness first.
            losses: {"loss_rpn_cls", "loss_rpn_box"} when targets are given, else empty.
            stats: {"rpn_num_pos_anchors", "rpn_num_neg_anchors"} (means per image) with losses.
        """
        logits, deltas = self.head(features)                           # (N, R), (N, R, 4)
        anchors = self.anchor_generator(features)                       # (R, 4)
        proposals, _ = self.select_proposals(logits.detach(), deltas.detach(), anchors,
                                             image_sizes, image_scales)
        if targets is None:
            return proposals, {}, {}
        losses, stats = self.losses(logits, deltas, anchors, image_sizes, targets)
        return proposals, losses, stats

    @torch.no_grad()
    def propose(self, features: Tensor, image_sizes: list[tuple[int, int]],
                image_scales: list[float] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Inference only: N proposals (P_i, 4) and their objectness logits (P_i,)."""
        logits, deltas = self.head(features)
        return self.select_proposals(logits, deltas, self.anchor_generator(features),
                                     image_sizes, image_scales)

    def select_proposals(self, logits: Tensor, deltas: Tensor, anchors: Tensor,
                         image_sizes: list[tuple[int, int]],
                         image_scales: list[float] | None = None
                         ) -> tuple[list[Tensor], list[Tensor]]:
        """Top-k by objectness, decode, clip, drop tiny boxes, NMS, top-k (Ren et al. 3.3).

        (N, R) logits, (N, R, 4) deltas, (R, 4) anchors -> N proposals (P_i, 4) and their
        logits (P_i,), best first.
        """
        num_images, num_anchors = logits.shape
        pre_k, post_k = ((self.pre_nms_topk_train, self.post_nms_topk_train) if self.training
                         else (self.pre_nms_topk_test, self.post_nms_topk_test))
        k = min(pre_k, num_anchors)
        top_logits, top_idx = logits.float().topk(k, dim=1)               # (N, k), sorted
        top_deltas = torch.gather(deltas, 1, top_idx.unsqueeze(-1).expand(-1, -1, 4))
        boxes = box_ops.decode(top_deltas, anchors[top_idx])            # (N, k, 4) float32
        candidates, candidate_logits = [], []
        for i, size in enumerate(image_sizes):
            boxes_i = box_ops.clip(boxes[i], size)
            scale = image_scales[i] if image_scales is not None else 1.0
            keep = box_ops.nonempty(boxes_i, self.min_box_size * scale)
            candidates.append(boxes_i[keep])                            # host sync, as NMS
            candidate_logits.append(top_logits[i][keep])
        kept = box_ops.nms_each(candidates, candidate_logits, self.nms_threshold)
        proposals = [b[k[:post_k]] for b, k in zip(candidates, kept)]  # sorted by score
        proposal_logits = [s[k[:post_k]] for s, k in zip(candidate_logits, kept)]
        return proposals, proposal_logits

    def label_anchors(self, anchors: Tensor, image_sizes: list[tuple[int, int]],
                      targets: list[Targets]) -> tuple[Tensor, Tensor]:
        """Matches anchors to ground truth and samples 256 per image.

        Returns:
            labels: (N, R) int8 in {-1, 0, 1}, -1 also for anchors outside the mini-batch.
            gt_deltas: (N, R, 4) float32 regression targets (meaningful where labels == 1).
        """
        labels_per_image, gt_deltas_per_image = [], []
        for size, target in zip(image_sizes, targets):
            gt_boxes = target.boxes.to(device=anchors.device, dtype=torch.float32)
            matched_idxs, labels = self.matcher(box_ops.box_iou(gt_boxes, anchors))
            h, w = size
            if self.boundary_threshold is not None:
                t = self.boundary_threshold
                inside = ((anchors[:, 0] >= -t) & (anchors[:, 1] >= -t)
                          & (anchors[:, 2] <= w + t) & (anchors[:, 3] <= h + t))
            else:  # the batch padding is not image: no negatives sampled from it
                inside = (((anchors[:, 0] + anchors[:, 2]) / 2 < w)
                          & ((anchors[:, 1] + anchors[:, 3]) / 2 < h))
            labels = labels.masked_fill(~inside, -1)
            sampled = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
            labels_per_image.append(labels.masked_fill(~sampled, -1))
            # With no ground truth every anchor is negative; regress it onto itself (deltas 0).
            matched = gt_boxes[matched_idxs] if len(gt_boxes) else anchors
            gt_deltas_per_image.append(box_ops.encode(matched, anchors))
        return torch.stack(labels_per_image), torch.stack(gt_deltas_per_image)

    def losses(self, logits: Tensor, deltas: Tensor, anchors: Tensor,
               image_sizes: list[tuple[int, int]], targets: list[Targets]
               ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Binary cross-entropy over the sampled anchors and box regression over the positive
        ones, both summed and divided by 256 * N (a constant: "normalised by the mini-batch
        size", Ren et al. 2015, eq. 1, as detectron2)."""
        labels, gt_deltas = self.label_anchors(anchors, image_sizes, targets)
        pos, sampled = labels == 1, labels >= 0
        normalizer = self.batch_size_per_image * len(targets)
        cls_loss = F.binary_cross_entropy_with_logits(logits.float(), pos.float(), reduction="none")
        box_loss = box_regression_loss(deltas, gt_deltas, self.box_loss, self.smooth_l1_beta)
        # where, not multiply: whatever sits at unsampled positions never reaches the loss.
        loss_cls = torch.where(sampled, cls_loss, 0.0).sum() / normalizer
        loss_box = torch.where(pos.unsqueeze(-1), box_loss, 0.0).sum() / normalizer
        num_images = float(len(targets))
        stats = {"rpn_num_pos_anchors": pos.sum() / num_images,
                 "rpn_num_neg_anchors": (labels == 0).sum() / num_images}
        return {"loss_rpn_cls": loss_cls, "loss_rpn_box": loss_box}, stats
