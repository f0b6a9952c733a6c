"""Test-time pieces of the localizer (He et al. 2015, Appendix C), used by
``Localizer.predict`` and by the R-CNN's training proposals: the test settings, the views of
the images that the data side makes (``detres.data.loc_transforms``), and the dense per-class
proposals of several scales merged into one list per class.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.ops import nms

from detres.structures import ImageBatch

if TYPE_CHECKING:  # localizer.py imports this module
    from detres.models.localizer import PerClassRPN


@dataclass(frozen=True)
class LocTestSettings:
    """Test-time choices (config ``test`` plus the classifier's test view)."""

    scales: tuple[int, ...] = (256,)
    max_size: int | None = None
    topk_classes: int = 5
    proposals_per_class: int = 200
    pre_nms_topk: int = 6000
    nms_threshold: float | None = 0.7
    cls_test_size: int = 256
    cls_crop: int | None = 224          # None: the whole image, fully convolutional


@dataclass
class LocViews:
    """N images as the three networks see them at test time (CPU, uint8).

    Attributes:
        classifier: per image (3, h, w): centre crops (one size) or whole resized images.
        scales: per test scale, the padded batch and each image's resized/original factor.
        originals: the original images, for the R-CNN's crops (None without an R-CNN).
    """

    classifier: list[Tensor]
    scales: list[tuple[ImageBatch, list[float]]]
    originals: ImageBatch | None = None


@torch.no_grad()
def dense_proposals(rpn: PerClassRPN, scales: Sequence[tuple[ImageBatch, Sequence[float]]],
                    classes: list[Tensor], settings: LocTestSettings, device: torch.device
                    ) -> list[list[tuple[Tensor, Tensor]]]:
    """Per image, per requested class: (boxes (P, 4) in original pixels, scores (P,)) on the
    CPU, best first; proposals of several scales are merged by NMS (or by score without)."""
    per_scale = []
    for batch, factors in scales:
        out = rpn.propose(batch.to(device), [c.to(device) for c in classes],
                          topk=settings.proposals_per_class, pre_nms_topk=settings.pre_nms_topk,
                          nms_threshold=settings.nms_threshold)
        per_scale.append([[(b.cpu() / f, s.cpu()) for b, s in image_out]
                          for image_out, f in zip(out, factors)])
    if len(per_scale) == 1:
        return per_scale[0]
    merged = []
    for i, wanted in enumerate(classes):
        per_class = []
        for j in range(len(wanted)):
            boxes = torch.cat([scale_out[i][j][0] for scale_out in per_scale])
            scores = torch.cat([scale_out[i][j][1] for scale_out in per_scale])
            keep = (nms(boxes, scores, settings.nms_threshold) if settings.nms_threshold
                    is not None else scores.argsort(descending=True))
            keep = keep[:settings.proposals_per_class]
            per_class.append((boxes[keep], scores[keep]))
        merged.append(per_class)
    return merged


def best_box(boxes: Tensor, scores: Tensor) -> Tensor:
    """The highest-scoring box, or a degenerate box when there is none (counts as a miss)."""
    return boxes[int(scores.argmax())] if len(boxes) else boxes.new_zeros(4)


def flat_proposals(per_class: list[tuple[Tensor, Tensor]], classes: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """One image's proposals of all its classes as (boxes (P, 4), classes (P,)), class by
    class in ``classes`` order."""
    if not per_class:
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
    return (torch.cat([b for b, _ in per_class]),
            torch.cat([torch.full((len(b),), int(c), dtype=torch.int64)
                       for (b, _), c in zip(per_class, classes.tolist())]))
