"""C4 RoI head: RoI pooling on conv4_x, conv5_x per region, global average pooling, and two
sibling layers (He et al. 2015, Appendix A: "we pool ... RoI features from conv4_x ... the RoI
pooled features are fed into all conv5_x and up layers, which play the role of the VGG fc
layers").

Shapes: N images, C = 1024 conv4_x channels, D = 2048 conv5_x channels, P_i proposals of image
i, R RoIs of the batch, S = pooled_size (14), K foreground classes, M ground-truth boxes.
Nouns: ``logits`` (R, K + 1) class scores before softmax, the background last (index K, as
detectron2; the dataset's labels 0..K-1 are used unchanged); ``scores`` after softmax;
``deltas`` (R, 4K) class-specific box offsets with weights (10, 10, 5, 5); ``detections``
the post-processed boxes.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from detres import boxes as box_ops
from detres.models.losses import BoxLoss, box_regression_loss
from detres.models.matching import Matcher, gather_sampled, sample_balanced
from detres.models.roi_ops import roi_align_gather, roi_max_pool
from detres.structures import Detections, Targets

RoIOp = Literal["pool", "align"]
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # Fast R-CNN target normalisation (std 0.1, 0.1, 0.2, 0.2)


def pool_rois(features: Tensor, rois: Tensor, roi_op: RoIOp, output_size: int,
              spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    """(N, C, H, W) features, (R, 5) rois [image index, x1, y1, x2, y2] -> (R, C, S, S).

    "pool": RoI max pooling (Fast R-CNN, the paper); "align": RoIAlign (He et al. 2017),
    ``aligned=True`` samples pixel centres at half-pixel offsets (detectron2 ROIAlignV2);
    torchvision's MultiScaleRoIAlign uses aligned=False and sampling_ratio=2. Both are
    torchvision's ops, except on CPU: :func:`roi_align_gather` and, where faster,
    :func:`~detres.models.roi_ops.roi_pool_gather`, equal and parallel.
    """
    if roi_op == "pool":
        return roi_max_pool(features, rois, output_size, spatial_scale)
    if features.device.type == "cpu" and len(rois):  # (the gather cannot shape 0 RoIs)
        return roi_align_gather(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


def init_box_predictor(cls_score: nn.Linear, bbox_pred: nn.Linear) -> None:
    """Fast R-CNN 2.3 / detectron2: weights N(0, 0.01) for scores, N(0, 0.001) for deltas;
    zero biases."""
    nn.init.normal_(cls_score.weight, std=0.01)
    nn.init.normal_(bbox_pred.weight, std=0.001)
    nn.init.zeros_(cls_score.bias)
    nn.init.zeros_(bbox_pred.bias)


class C4RoIHead(nn.Module):
    """RoI sampling, pooling, conv5_x, classification and box regression, post-processing.

    Args:
        res5: conv5_x (torchvision ``layer4``), first block with stride 2 so that S x S pooled
            features become S/2 x S/2 (14 -> 7), D output channels.
        num_classes: K foreground classes.
        out_channels: D (2048 for ResNet-50/101, 512 for ResNet-18/34 or narrower widths).
        roi_op, pooled_size, sampling_ratio, aligned: see :func:`pool_rois`; paper: "pool", 14.
        feature_stride: stride of the features the RoIs are pooled from (conv4_x: 16).
        batch_size_per_image / positive_fraction / fg_iou_threshold: 512 RoIs per image, up to
            25% foreground with IoU >= 0.5, the rest background (Fast R-CNN 2.3; the lower
            background bound of 0.1 is dropped, as in detectron2 and torchvision).
        box_loss / smooth_l1_beta: smooth-L1 with beta 1 (Fast R-CNN eq. 3) or "l1" (modern).
        score_threshold / nms_threshold / detections_per_image: inference, 0.05 / 0.5 / 100.
        min_box_size: detections with width or height <= this (pixels) are dropped.
        global_context: append to each region's conv5_x feature the image's own, pooled with
            the whole image as the RoI through the same layers, before the sibling layers
            (Appendix B, "Global context"); the sibling layers then take 2D inputs.
    """

    def __init__(self, res5: nn.Module, num_classes: int, out_channels: int, *,
                 roi_op: RoIOp = "pool", pooled_size: int = 14, sampling_ratio: int = 0,
                 aligned: bool = True, feature_stride: int = 16,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 fg_iou_threshold: float = 0.5,
                 box_weights: tuple[float, float, float, float] = BOX_WEIGHTS,
                 box_loss: BoxLoss = "smooth_l1", smooth_l1_beta: float = 1.0,
                 score_threshold: float = 0.05, nms_threshold: float = 0.5,
                 detections_per_image: int = 100, min_box_size: float = 0.0,
                 global_context: bool = False) -> None:
        super().__init__()
        if roi_op not in ("pool", "align"):
            raise ValueError(f"roi_op must be 'pool' or 'align', got {roi_op!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.res5 = res5
        in_features = out_channels * (2 if global_context else 1)
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 * num_classes)
        self.global_context = global_context
        init_box_predictor(self.cls_score, self.bbox_pred)
        self.num_classes = num_classes
        self.roi_op: RoIOp = roi_op
        self.pooled_size = pooled_size
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.spatial_scale = 1.0 / feature_stride
        self.matcher = Matcher(fg_iou_threshold, fg_iou_threshold, allow_low_quality_matches=False)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.box_weights = tuple(box_weights)
        self.box_loss = box_loss
        self.smooth_l1_beta = smooth_l1_beta
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.detections_per_image = detections_per_image
        self.min_box_size = min_box_size

    def forward(self, features: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                targets: list[Targets] | None = None
                ) -> tuple[dict[str, Tensor], list[Detections] | None, dict[str, Tensor]]:
        """Losses on sampled RoIs when targets are given; detections on all proposals when not
        training (both in eval mode with targets, e.g. for a validation loss).

        Args:
            features: (N, C, H, W) conv4_x features.
            proposals: N tensors (P_i, 4) float32 xyxy in image pixels, detached.
            image_sizes: (h, w) per image, for clipping detections.

        Returns:
            losses {"loss_cls", "loss_box"} or {}; N Detections or None; stats.
        """
        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        if targets is not None:
            rois, gt_labels, gt_deltas, valid = self.sample_rois(proposals, targets)
            logits, deltas = self.predict(features, rois, image_sizes)
            losses = self.losses(logits, deltas, gt_labels, gt_deltas, valid)
            fg = valid & (gt_labels < self.num_classes)
            stats = {"roi_num_fg": fg.sum() / float(len(targets)),
                     "roi_num_bg": (valid & ~fg).sum() / float(len(targets))}
        detections = None
        if not self.training:
            rois = box_ops.boxes_to_rois(proposals)
            logits, deltas = self.predict(features, rois, image_sizes)
            detections = self.detect(logits, deltas, rois, [len(p) for p in proposals], image_sizes)
        return losses, detections, stats

    def predict(self, features: Tensor, rois: Tensor,
                image_sizes: list[tuple[int, int]] | None = None) -> tuple[Tensor, Tensor]:
        """(N, C, H, W), (R, 5) -> logits (R, K + 1), deltas (R, 4K); ``image_sizes`` (h, w)
        are needed with global context."""
        return self.box_predictor(self.box_features(features, rois, image_sizes))

    def box_predictor(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The sibling layers: (R, D or 2D) -> logits (R, K + 1), deltas (R, 4K)."""
        return self.cls_score(x), self.bbox_pred(x)

    def box_features(self, features: Tensor, rois: Tensor,
                     image_sizes: list[tuple[int, int]] | None = None) -> Tensor:
        """What the sibling layers see: (R, D), or (R, 2D) with global context.

        The context RoI of image i is its whole unpadded extent (0, 0, w_i, h_i): "global
        Spatial Pyramid Pooling (with a single-level pyramid), implemented as RoI pooling
        using the entire image's bounding box as the RoI" (Appendix B); it runs through
        conv5_x in the same batch as the regions.
        """
        if not self.global_context:
            return self.region_features(features, rois)
        if image_sizes is None:
            raise ValueError("a C4RoIHead with global_context needs the image sizes")
        whole = torch.tensor([[i, 0.0, 0.0, w, h] for i, (h, w) in enumerate(image_sizes)],
                             dtype=rois.dtype, device=rois.device)            # (N, 5)
        x = self.region_features(features, torch.cat((rois, whole)))        # (R + N, D)
        regions, context = x[: len(rois)], x[len(rois):]
        return torch.cat((regions, context[rois[:, 0].long()]), dim=1)     # (R, 2D)

    def region_features(self, features: Tensor, rois: Tensor) -> Tensor:
        """RoI pooling, conv5_x, global average pooling: (R, 5) -> (R, D)."""
        x = pool_rois(features, rois, self.roi_op, self.pooled_size, self.spatial_scale,
                      self.sampling_ratio, self.aligned)               # (R, C, 14, 14)
        # conv5_x runs in the trunk's layout (NHWC when FasterRCNN(channels_last=True)).
        nhwc = (features.is_contiguous(memory_format=torch.channels_last)
                and not features.is_contiguous())
        x = x.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        x = self.res5(x)                                                # (R, D, 7, 7)
        # global average pool as a sum scaled after: mean's backward divides the whole
        # (R, D, 7, 7) gradient, the sum's is a broadcast view (a tenth of its time)
        return x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3])            # (R, D)

    @torch.no_grad()
    def sample_rois(self, proposals: list[Tensor], targets: list[Targets]
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Adds the ground-truth boxes to the proposals (so that every box has a positive RoI
        early in training), matches and samples 512 RoIs per image.

        Returns:
            rois: (R, 5) [image index, box]; gt_labels: (R,) int64 in 0..K (K background);
            gt_deltas: (R, 4) float32; valid: (R,) bool (False for padding RoIs, see
            :func:`gather_sampled`). R = sum_i min(512, P_i + M_i).
        """
        boxes_all, labels_all, deltas_all, valid_all = [], [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes = target.boxes.to(device=props.device, dtype=torch.float32)
            gt_classes = target.labels.to(props.device)
            boxes = torch.cat((props.float(), gt_boxes))
            matched_idxs, match_labels = self.matcher(box_ops.box_iou(gt_boxes, boxes))
            sampled = sample_balanced(match_labels, self.batch_size_per_image,
                                      self.positive_fraction)
            idx, valid = gather_sampled(sampled, self.batch_size_per_image)
            boxes, matched_idxs, match_labels = boxes[idx], matched_idxs[idx], match_labels[idx]
            if len(gt_boxes):
                matched = gt_boxes[matched_idxs]
                classes = torch.where(match_labels == 1, gt_classes[matched_idxs], self.num_classes)
            else:  # background image: every RoI is background, regress onto itself (unused)
                matched = boxes
                classes = torch.full_like(matched_idxs, self.num_classes)
            boxes_all.append(boxes)
            labels_all.append(classes)
            deltas_all.append(box_ops.encode(matched, boxes, self.box_weights))
            valid_all.append(valid)
        return (box_ops.boxes_to_rois(boxes_all), torch.cat(labels_all), torch.cat(deltas_all),
                torch.cat(valid_all))

    def losses(self, logits: Tensor, deltas: Tensor, gt_labels: Tensor, gt_deltas: Tensor,
               valid: Tensor) -> dict[str, Tensor]:
        """Cross-entropy over K + 1 classes averaged over the sampled RoIs, and box regression
        of the true class summed over foreground RoIs divided by the number of sampled RoIs
        (Fast R-CNN eq. 1 with lambda = 1, as detectron2 and torchvision)."""
        num_sampled = valid.sum().clamp(min=1)
        ce = F.cross_entropy(logits.float(), gt_labels, reduction="none")
        loss_cls = torch.where(valid, ce, 0.0).sum() / num_sampled
        fg = valid & (gt_labels < self.num_classes)
        cls_idx = gt_labels.clamp(max=self.num_classes - 1)           # any column for bg; masked
        pred = deltas.view(deltas.shape[0], self.num_classes, 4)
        pred = pred[torch.arange(pred.shape[0], device=pred.device), cls_idx]   # (R, 4)
        box_loss = box_regression_loss(pred, gt_deltas, self.box_loss, self.smooth_l1_beta)
        loss_box = torch.where(fg.unsqueeze(-1), box_loss, 0.0).sum() / num_sampled
        return {"loss_cls": loss_cls, "loss_box": loss_box}

    @torch.no_grad()
    def detect(self, logits: Tensor, deltas: Tensor, rois: Tensor, rois_per_image: list[int],
               image_sizes: list[tuple[int, int]]) -> list[Detections]:
        """Softmax, class-specific decode, then :meth:`postprocess`.

        (R, K + 1) logits, (R, 4K) deltas, (R, 5) rois ordered by image -> N Detections.
        """
        scores, boxes = self.scores_and_boxes(logits, deltas, rois)
        return self.postprocess(scores, boxes, rois_per_image, image_sizes)

    def scores_and_boxes(self, logits: Tensor, deltas: Tensor, rois: Tensor
                         ) -> tuple[Tensor, Tensor]:
        """(R, K + 1) logits, (R, 4K) deltas -> foreground probabilities (R, K) and decoded,
        unclipped class boxes (R, K, 4)."""
        scores = F.softmax(logits.float(), dim=-1)[:, :-1]             # (R, K), drop background
        boxes = box_ops.decode(deltas, rois[:, 1:], self.box_weights)  # (R, 4K)
        return scores, boxes.view(-1, self.num_classes, 4)

    @torch.no_grad()
    def postprocess(self, scores: Tensor, boxes: Tensor, rois_per_image: list[int],
                    image_sizes: list[tuple[int, int]], voting_iou: float | None = None
                    ) -> list[Detections]:
        """Clip, score threshold, per-class NMS, top 100; then, with ``voting_iou``, box
        voting (:func:`detres.boxes.vote`) among the thresholded boxes of the same class.

        (R, K) scores, (R, K, 4) boxes, rows ordered by image -> N Detections.
        """
        classes = torch.arange(self.num_classes, device=boxes.device)
        candidates = []
        per_image = zip(boxes.split(rois_per_image), scores.split(rois_per_image), image_sizes)
        for boxes_i, scores_i, size in per_image:
            labels_i = classes.repeat(boxes_i.shape[0])                 # (P_i * K,)
            boxes_i = box_ops.clip(boxes_i, size).reshape(-1, 4)        # (P_i * K, 4)
            scores_i = scores_i.reshape(-1)
            keep = (scores_i > self.score_threshold) & box_ops.nonempty(boxes_i, self.min_box_size)
            candidates.append((boxes_i[keep], scores_i[keep], labels_i[keep]))
        boxes_n, scores_n, labels_n = zip(*candidates) if candidates else ((), (), ())
        kept_per_image = box_ops.nms_each(boxes_n, scores_n, self.nms_threshold, labels_n)
        detections = []
        for (boxes_i, scores_i, labels_i), keep in zip(candidates, kept_per_image):
            keep = keep[: self.detections_per_image]
            kept = boxes_i[keep]
            if voting_iou is not None:
                kept = box_ops.vote(kept, labels_i[keep], boxes_i, scores_i, labels_i, voting_iou)
            detections.append(Detections(kept, scores_i[keep], labels_i[keep]))
        return detections

