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
  scaled RoI areas bracket ``scale_target``^2 (default 224 x 224, the ImageNet crop SPPnet and
  Fast R-CNN aim at; a model pretrained or trained at other sizes sets its own), the first or
  last pair when none does;
- the pyramid is computed on the image: the test transform
  (``data.transforms.inference_transform``) hands over the decoded image itself, or, when it is
  larger than the pyramid's top level, the image shrunk to that level; every level, the RPN's
  base level included, is resized from it (bilinear, antialiased when shrinking) by a per-image
  factor, so no level is resized from an upsampled image. Level s has shorter side s and
  longer side at most ``max_size * top / base_size`` (top = the largest of ``scales`` and
  ``base_size``): one cap for the whole pyramid, the single-scale cap grown with the top level,
  as the paper names the levels by their shorter sides alone (a cap per level,
  ``max_size * s / base_size``, would shrink every level of a wide image, as resizing the
  capped base image does); the cap binds only on the top levels of images wider than
  ``max_size : base_size``. The base level is the single-scale image (shorter side
  ``base_size``, longer side at most ``max_size``); the RPN runs there only and its proposals
  are mapped to each level by the per-image factors. Detections come back in the pixels of
  the batch as given, whose ``scale`` evaluation divides by;
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

SCALE_TARGET = 224


def select_scale_pairs(rois: Tensor, factors: Sequence[float] | Tensor,
                       target: float = SCALE_TARGET) -> Tensor:
    """(R, 5) RoIs, S ascending factors from the RoIs' pixels to each level ((S,) for every
    RoI or (R, S) per RoI) -> (R,) index j of the pair (j, j + 1) whose scaled areas bracket
    ``target``^2; with one scale, 0 (both "scales" the same)."""
    f = torch.as_tensor(factors, dtype=torch.float32, device=rois.device)
    if f.shape[-1] < 2:
        return torch.zeros(len(rois), dtype=torch.long, device=rois.device)
    area = box_ops.area(rois[:, 1:].float())                                # (R,)
    scaled = area[:, None] * f.expand(len(rois), -1) ** 2                   # (R, S)
    below = (scaled <= float(target) ** 2).sum(dim=1)                       # scales not above
    return (below - 1).clamp(0, f.shape[-1] - 2)


def level_factors(sizes: Sequence[tuple[int, int]], short_side: int, max_size: float | None
                  ) -> list[float]:
    """Per image of (h, w) ``sizes``, the factor to shorter side ``short_side`` with the longer
    side at most ``max_size`` (the rule of ``data.transforms.resize_scale``)."""
    out = []
    for h, w in sizes:
        f = short_side / min(h, w)
        out.append(max_size / max(h, w) if max_size and max(h, w) * f > max_size else f)
    return out


def resize_batch(images: ImageBatch, factors: Sequence[float]) -> ImageBatch:
    """Image i of the batch resized by ``factors[i]`` and re-padded (antialiased when
    shrinking); ``scales`` multiplied by the factors."""
    if all(f == 1.0 for f in factors):
        return images
    resized = []
    for i, ((h, w), factor) in enumerate(zip(images.sizes, factors)):
        size = (max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1))
        x = images.tensor[i: i + 1, :, :h, :w]
        resized.append(x[0] if size == (h, w) else F.interpolate(
            x, size=size, mode="bilinear", align_corners=False, antialias=factor < 1.0)[0])
    scales = ([s * f for s, f in zip(images.scales, factors)] if images.scales is not None
              else None)
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
    """One model's trunk features on the test views (per-image factors, flipped), on first use."""

    def __init__(self, model: FasterRCNN, images: ImageBatch) -> None:
        self.model, self.images = model, images
        self.cache: dict[tuple[tuple[float, ...], bool], tuple[Tensor, ImageBatch]] = {}

    def features(self, factors: Sequence[float], flipped: bool) -> tuple[Tensor, ImageBatch]:
        key = (tuple(factors), flipped)
        if key not in self.cache:
            images = resize_batch(flip_batch(self.images) if flipped else self.images, factors)
            self.cache[key] = (self.model.trunk(self.model.normalize(images)), images)
        return self.cache[key]


class TestTimeDetector(nn.Module):
    """One or more trained detectors with the test-time improvements switched on.

    Args:
        models: FasterRCNN models over one class list (an ensemble when several).
        box_refinement: pool the regressed boxes again and take the union of both predictions
            (Appendix B, "Box refinement"); NMS at the heads' ``nms_threshold`` (0.3 in the
            paper), then box voting.
        voting_iou: box voting's IoU threshold (Gidaris & Komodakis 2015: 0.5).
        scales: the shorter sides of the test pyramid, e.g. (200, 400, 600, 800, 1000); empty:
            single-scale. The batch is then expected as ``data.transforms.inference_transform``
            gives it: the decoded images, those above the top level shrunk to it.
        base_size, max_size: the single-scale test resize (``data.min_size_test``,
            ``data.max_size_test``): the RPN's level.
        scale_target: the side of the square each RoI's scale pair brackets (``test.scale_target``).
        flip: also score each RoI on the mirrored image.
    """

    __test__ = False  # a model, not a pytest test class

    def __init__(self, models: Sequence[FasterRCNN], *, box_refinement: bool = False,
                 voting_iou: float = 0.5, scales: Sequence[int] = (), base_size: int = 600,
                 max_size: int | None = 1000, scale_target: float = SCALE_TARGET,
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
        self.scales = sorted(scales)
        self.base_size, self.max_size = base_size, max_size
        top = max(self.scales + [base_size])
        self.pyramid_max_size = max_size * top / base_size if max_size else None
        self.scale_target = scale_target
        self.flip = flip

    @property
    def num_classes(self) -> int:
        return self.models[0].num_classes

    def pyramid(self, sizes: Sequence[tuple[int, int]]) -> tuple[list[float], list[list[float]]]:
        """Per image, the factors from the batch's pixels to the base level (N,) and to each
        pyramid level (N lists of S ascending); without scales the batch itself, factor 1."""
        if not self.scales:
            return [1.0] * len(sizes), [[1.0] for _ in sizes]
        base = level_factors(sizes, self.base_size, self.max_size)
        per_scale = [level_factors(sizes, s, self.pyramid_max_size) for s in self.scales]
        return base, [list(f) for f in zip(*per_scale)]

    @torch.no_grad()
    def forward(self, images: ImageBatch, targets: list[Targets] | None = None
                ) -> DetectorOutput:
        """Detections (in the batch's pixels) only; ``targets`` are accepted and ignored."""
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
        """Each model's RPN at the base level, its proposals mapped to the batch's pixels; an
        ensemble takes the union, then NMS and the top ``proposals_test`` of the first model's
        RPN (Appendix B, "Ensemble")."""
        base, _ = self.pyramid(images.sizes)
        per_model = []
        for view in views:
            features, batch = view.features(base, False)
            boxes, logits = view.model.rpn.propose(features, batch.sizes, batch.scales)
            if any(f != 1.0 for f in base):                 # base pixels -> the batch's
                boxes = [b / f for b, f in zip(boxes, base)]
            per_model.append((boxes, logits))
        if len(per_model) == 1:
            return per_model[0][0]
        rpn = self.models[0].rpn
        proposals = []
        for i in range(len(images)):
            boxes = torch.cat([boxes[i] for boxes, _ in per_model])
            objectness = torch.cat([logits[i].sigmoid() for _, logits in per_model])
            keep = nms(boxes, objectness, rpn.nms_threshold)[: rpn.post_nms_topk_test]
            proposals.append(boxes[keep])
        return proposals

    def score(self, views: list[_Views], images: ImageBatch, rois: Tensor
              ) -> tuple[Tensor, Tensor]:
        """(R, 5) RoIs in the batch's pixels -> mean foreground probabilities (R, K) and decoded
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
        _, levels = self.pyramid(images.sizes)
        per_roi = torch.tensor(levels, dtype=torch.float32,
                               device=rois.device)[rois[:, 0].long()]         # (R, S)
        pair = select_scale_pairs(view_rois, per_roi, self.scale_target)
        x = None
        for k in range(per_roi.shape[1]):
            use = (pair == k) | (pair + 1 == k)
            if not bool(use.any()):
                continue
            features, batch = views_of_model.features([f[k] for f in levels], flipped)
            factor = per_roi[use, k, None].to(view_rois.dtype)
            scaled = (torch.cat((view_rois[use, :1], view_rois[use, 1:] * factor), 1)
                      if self.scales else view_rois[use])
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
