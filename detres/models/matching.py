"""IoU matching and balanced positive/negative sampling (Ren et al. 2015, section 3.1.2;
Girshick 2015, "Fast R-CNN", section 2.3).

Shapes: M ground-truth boxes, R predictions (anchors or proposals) of one image, S sampled.
Labels: 1 foreground, 0 background, -1 ignored (neither in the loss).

Both functions run without host synchronisation: counts stay on the device, the sampler sorts
random keys instead of indexing with data-dependent masks, so the loss of a batch never waits
for the GPU.
"""
from __future__ import annotations

import torch
from torch import Tensor

FOREGROUND, BACKGROUND, IGNORE = 1, 0, -1


class Matcher:
    """Assigns each prediction the ground-truth box it overlaps most, and a label.

    Labels by the best IoU of a prediction: ``< low_threshold`` -> 0, ``>= high_threshold``
    -> 1, in between -> -1.

    Args:
        low_threshold: RPN 0.3 (Ren et al. 2015, 3.1.2); RoI head 0.5 (Fast R-CNN, 2.3).
        high_threshold: RPN 0.7; RoI head 0.5.
        allow_low_quality_matches: also label 1 the predictions with the highest IoU for some
            ground-truth box (ties included), so that every box has an anchor; the RPN's
            "anchor with the highest IoU" rule. Boxes that overlap nothing (IoU 0) gain none.
    """

    def __init__(self, low_threshold: float, high_threshold: float,
                 allow_low_quality_matches: bool = False) -> None:
        if not 0.0 <= low_threshold <= high_threshold <= 1.0:
            raise ValueError(f"Matcher needs 0 <= low_threshold <= high_threshold <= 1, "
                             f"got {low_threshold}, {high_threshold}")
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> tuple[Tensor, Tensor]:
        """Matches predictions to ground truth.

        Args:
            iou: (M, R) IoU of every ground-truth box with every prediction; M may be 0.

        Returns:
            matched_idxs: (R,) int64 index of the best ground-truth box (0 when M == 0).
            labels: (R,) int8 in {-1, 0, 1}; all 0 when M == 0.
        """
        num_gt, num_pred = iou.shape
        if num_gt == 0:
            zeros = torch.zeros(num_pred, dtype=torch.int64, device=iou.device)
            return zeros, zeros.to(torch.int8)
        best_iou, matched_idxs = iou.max(dim=0)                      # (R,)
        labels = torch.full((num_pred,), IGNORE, dtype=torch.int8, device=iou.device)
        labels.masked_fill_(best_iou < self.low_threshold, BACKGROUND)
        labels.masked_fill_(best_iou >= self.high_threshold, FOREGROUND)
        if self.allow_low_quality_matches and num_pred > 0:
            best_for_gt = iou.max(dim=1, keepdim=True).values         # (M, 1)
            is_best = ((iou == best_for_gt) & (best_for_gt > 0)).any(dim=0)
            labels.masked_fill_(is_best, FOREGROUND)
        return matched_idxs, labels


def sample_balanced(labels: Tensor, num_samples: int, positive_fraction: float,
                    generator: torch.Generator | None = None) -> Tensor:
    """Draws a mini-batch of at most ``num_samples`` labelled predictions of one image.

    Up to ``int(num_samples * positive_fraction)`` positives, uniformly at random, then
    negatives fill the rest (RPN: 256, half positive; RoI head: 512, 25% foreground). With
    too few positives, more negatives are taken, as in the papers.

    Args:
        labels: (R,) in {-1, 0, 1}.
        generator: optional RNG on ``labels.device``, for reproducible draws.

    Returns:
        (R,) bool: which predictions are in the mini-batch.
    """
    num_pred = labels.shape[0]
    pos, neg = labels == FOREGROUND, labels == BACKGROUND
    num_pos_quota = int(num_samples * positive_fraction)
    # Keys in [2, 3) for positives, [1, 2) for negatives, [0, 1) for ignored: one descending
    # sort puts the positives first, then the negatives, each in a random order.
    keys = torch.rand(num_pred, generator=generator, device=labels.device)
    keys = keys + 2 * pos + neg
    order = torch.argsort(keys, descending=True)
    num_pos_all = pos.sum()
    num_pos = num_pos_all.clamp(max=num_pos_quota)
    num_neg = neg.sum().clamp(max=num_samples - num_pos)
    rank = torch.arange(num_pred, device=labels.device)
    chosen_in_order = (rank < num_pos) | ((rank >= num_pos_all) & (rank < num_pos_all + num_neg))
    return torch.zeros_like(pos).scatter_(0, order, chosen_in_order)


def gather_sampled(sampled: Tensor, num_samples: int) -> tuple[Tensor, Tensor]:
    """A fixed-size index list that covers a sampled mask, without host synchronisation.

    Args:
        sampled: (R,) bool from :func:`sample_balanced` with at most ``num_samples`` set.

    Returns:
        indices: (S,) int64, S = min(num_samples, R), every sampled prediction included.
        valid: (S,) bool, False for fillers (unsampled predictions that only pad the list
            when fewer than S were sampled; they must get zero weight in a loss).
    """
    num = min(num_samples, sampled.shape[0])
    indices = torch.topk(sampled.to(torch.float32), num, sorted=False).indices
    return indices, sampled[indices]
