"""Test-time improvements of He et al. 2015, Appendix B, around trained Faster R-CNN C4 models:
box refinement with box voting, multi-scale testing with maxout, horizontal flips, ensembles.

    images -> each model's trunk -> each model's RPN -> union of proposals -> NMS -> top P
      -> score(RoIs): per model, per scale pair and flip: RoI pool + conv5_x (+ context)
         -> maxout over the two scales -> sibling layers -> softmax, decoded boxes
         -> mean over flips and models
      -> [box refinement: score(top-class boxes) again; union of both sets]
      -> clip, threshold, per-class NMS, top 100 [-> box voting]

Shapes: N images, P_i proposals of image i, R RoIs of the batch, K foreground classes, D' the
sibling layers' input width (D, or 2D with global context), S test scales.
Choices the paper leaves open (docs/architecture.md, Test-time improvements):
- refinement pools each RoI's box regressed for its best-scoring foreground class (one new
  RoI per RoI, as the "300 new predictions" of the paper);
- scale pair: NoC [33] runs each RoI on two adjacent pyramid scales; we take the pair whose
  scaled RoI areas bracket 224 x 224 (the ImageNet crop SPPnet and Fast R-CNN aim at), the
  first or last pair when none does;
- the pyramid is the test batch resized by s / ``base_size`` (bilinear, antialiased when
  shrinking), so the longer side grows in proportion; the RPN runs at the base scale only;
- flips average the softmax scores and the (unflipped) decoded boxes; ensembles average the
  same over models, each model with its own scales and flips.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from detres import boxes as box_ops
from detres.models.faster_rcnn import FasterRCNN
from detres.structures import DetectorOutput, ImageBatch, Targets

SCALE_TARGET_AREA = 224.0 * 224.0


def select_scale_pairs(rois: Tensor, factors: Sequence[float]) -> Tensor:
    """(R, 5) RoIs at the base scale, S ascending pyramid factors -> (R,) index j of the pair
    (j, j + 1) whose scaled areas bracket 224^2; with one scale, 0 (both "scales" the same)."""
    if len(factors) < 2:
        return torch.zeros(len(rois), dtype=torch.long, device=rois.device)
    f = torch.tensor(list(factors), dtype=torch.float32, device=rois.device)
    area = box_ops.area(rois[:, 1:].float())                                # (R,)
    scaled = area[:, None] * f[None, :] ** 2                                # (R, S)
    below = (scaled <= SCALE_TARGET_AREA).sum(dim=1)                        # scales not above
    return (below - 1).clamp(0, len(factors) - 2)


def resize_batch(images: ImageBatch, factor: float) -> ImageBatch:
    """Each image of the batch resized by ``factor`` and re-padded."""
    if factor == 1.0:
        return images
    resized = []
    for i, (h, w) in enumerate(images.sizes):
        size = (max(int(round(h * factor)), 1), max(int(round(w * factor)), 1))
        x = images.tensor[i: i + 1, :, :h, :w]
        resized.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                     antialias=factor < 1.0)[0])
    scales = [s * factor for s in images.scales] if images.scales is not None else None
    return ImageBatch.from_tensors(resized, scales=scales)


def flip_batch(images: ImageBatch) -> ImageBatch:
    """Each image mirrored within its own width (the padding stays at the right)."""
    out = torch.zeros_like(images.tensor)
    for i, (h, w) in enumerate(images.sizes):
        out[i, :, :h, :w] = images.tensor[i, :, :h, :w].flip(-1)
    return ImageBatch(out, list(images.sizes), images.scales)


def flip_rois(rois: Tensor, sizes: Sequence[tuple[int, int]]) -> Tensor:
    widths = torch.tensor([w for _, w in sizes], dtype=rois.dtype, device=rois.device)
    w = widths[rois[:, 0].long()]
    return torch.stack((rois[:, 0], w - rois[:, 3], rois[:, 2], w - rois[:, 1], rois[:, 4]), 1)


class _Views:
    """One model's trunk features on the test views (scale factor, flipped), on first use."""

    def __init__(self, model: FasterRCNN, images: ImageBatch) -> None:
        self.model, self.images = model, images
        self.cache: dict[tuple[float, bool], tuple[Tensor, ImageBatch]] = {}

    def features(self, factor: float, flipped: bool) -> tuple[Tensor, ImageBatch]:
        if (factor, flipped) not in self.cache:
            images = resize_batch(flip_batch(self.images) if flipped else self.images, factor)
            self.cache[factor, flipped] = (self.model.trunk(self.model.normalize(images)), images)
        return self.cache[factor, flipped]


class TestTimeDetector(nn.Module):
    """One or more trained detectors with the test-time improvements switched on.

    Args:
        models: FasterRCNN models over one class list (an ensemble when several).
        box_refinement: pool the regressed boxes again and take the union of both predictions
            (Appendix B, "Box refinement"); NMS at the heads' ``nms_threshold`` (0.3 in the
            paper), then box voting.
        voting_iou: box voting's IoU threshold (Gidaris & Komodakis 2015: 0.5).
        scales: the shorter sides of the test pyramid, e.g. (200, 400, 600, 800, 1000); empty:
            single-scale.
        base_size: the shorter side the batch was resized to (``data.min_size_test``).
        flip: also score each RoI on the mirrored image.
    """

    __test__ = False  # a model, not a pytest test class

    def __init__(self, models: Sequence[FasterRCNN], *, box_refinement: bool = False,
                 voting_iou: float = 0.5, scales: Sequence[int] = (), base_size: int = 600,
                 flip: bool = False) -> None:
        super().__init__()
        if not models:
            raise ValueError("TestTimeDetector needs at least one model")
        if len({m.num_classes for m in models}) != 1:
            raise ValueError(f"ensemble members predict different class counts: "
                             f"{[m.num_classes for m in models]}")
        self.models = nn.ModuleList(models)
        self.box_refinement = box_refinement
        self.voting_iou = voting_iou
        self.factors = sorted(s / base_size for s in scales) or [1.0]
        self.flip = flip

    @property
    def num_classes(self) -> int:
        return self.models[0].num_classes

    @torch.no_grad()
    def forward(self, images: ImageBatch, targets: list[Targets] | None = None
                ) -> DetectorOutput:
        """Detections only (test time); ``targets`` are accepted and ignored."""
        views = [_Views(m, images) for m in self.models]
        proposals = self.propose(views, images)
        rois = box_ops.boxes_to_rois(proposals)
        per_image = [len(p) for p in proposals]
        scores, boxes = self.score(views, images, rois)
        if self.box_refinement:
            best = scores.argmax(dim=1)                                      # (R,)
            refined = boxes[torch.arange(len(rois), device=rois.device), best]
            refined = torch.cat([box_ops.clip(b, s) for b, s in
                                 zip(refined.split(per_image), images.sizes)])
            new_scores, new_boxes = self.score(views, images,
                                               torch.cat((rois[:, :1], refined), 1))
            order = torch.cat((rois[:, 0], rois[:, 0])).argsort(stable=True)  # by image
            scores = torch.cat((scores, new_scores))[order]
            boxes = torch.cat((boxes, new_boxes))[order]
            per_image = [2 * n for n in per_image]
        head = self.models[0].roi_head
        detections = head.postprocess(scores, boxes, per_image, images.sizes,
                                      self.voting_iou if self.box_refinement else None)
        return DetectorOutput(losses={}, detections=detections, stats={})

    def propose(self, views: list[_Views], images: ImageBatch) -> list[Tensor]:
        """Each model's RPN at the base scale; an ensemble takes the union, then NMS and the
        top ``proposals_test`` of the first model's RPN (Appendix B, "Ensemble")."""
        per_model = []
        for view in views:
            features, _ = view.features(1.0, False)
            per_model.append(view.model.rpn.propose(features, images.sizes, images.scales))
        if len(per_model) == 1:
            return per_model[0][0]
        rpn = self.models[0].rpn
        proposals = []
        for i in range(len(images)):
            boxes = torch.cat([boxes[i] for boxes, _ in per_model])
            objectness = torch.cat([logits[i].sigmoid() for _, logits in per_model])
            keep = nms(boxes, objectness, rpn.nms_threshold)[: rpn.post_nms_topk[False]]
            proposals.append(boxes[keep])
        return proposals

    def score(self, views: list[_Views], images: ImageBatch, rois: Tensor
              ) -> tuple[Tensor, Tensor]:
        """(R, 5) RoIs at the base scale -> mean foreground probabilities (R, K) and decoded
        boxes (R, K, 4) over models and flips."""
        total_scores, total_boxes, count = 0.0, 0.0, 0
        for view in views:
            for flipped in (False, True) if self.flip else (False,):
                scores, boxes = self._score_view(view, images, rois, flipped)
                total_scores, total_boxes = total_scores + scores, total_boxes + boxes
                count += 1
        return total_scores / count, total_boxes / count

    def _score_view(self, views_of_model: _Views, images: ImageBatch, rois: Tensor, flipped: bool
                    ) -> tuple[Tensor, Tensor]:
        """One model on one view (flipped or not), maxout over each RoI's scale pair."""
        head = views_of_model.model.roi_head
        view_rois = flip_rois(rois, images.sizes) if flipped else rois
        pair = select_scale_pairs(view_rois, self.factors)
        x = None
        for k, factor in enumerate(self.factors):
            use = (pair == k) | (pair + 1 == k)
            if not bool(use.any()):
                continue
            features, batch = views_of_model.features(factor, flipped)
            scaled = torch.cat((view_rois[use, :1], view_rois[use, 1:] * factor), 1)
            h = head.box_features(features, scaled, batch.sizes).float()      # (R_k, D')
            if x is None:
                x = h.new_full((len(rois), h.shape[1]), float("-inf"))
            x[use] = torch.maximum(x[use], h)                                 # maxout
        if x is None:  # no RoIs
            x = rois.new_zeros((0, head.cls_score.in_features))
        logits, deltas = head.box_predictor(x.to(head.cls_score.weight.dtype))
        scores, boxes = head.scores_and_boxes(logits, deltas, view_rois)
        if flipped:  # back to the unflipped image: x -> w - x
            w = torch.tensor([w for _, w in images.sizes], dtype=boxes.dtype,
                             device=boxes.device)[rois[:, 0].long(), None]      # (R, 1)
            boxes = torch.stack((w - boxes[..., 2], boxes[..., 1], w - boxes[..., 0],
                                 boxes[..., 3]), -1)
        return scores, boxes
