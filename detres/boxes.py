"""Pure functions on boxes: (..., 4) float tensors in xyxy pixel coordinates.

Widths are ``x2 - x1`` (no "+1"), as in torchvision and detectron2; VOC's 1-based inclusive
boxes are converted when they are read (data/voc.py), never here.

Box deltas follow Faster R-CNN (Ren et al. 2015, eq. 2): ``dx = wx * (x - xa) / wa``,
``dy = wy * (y - ya) / ha``, ``dw = ww * log(w / wa)``, ``dh = wh * log(h / ha)`` with centres
(x, y) and sizes (w, h); the weights are (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for the
RoI head.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms
from torchvision.ops import box_iou as _box_iou
from torchvision.ops import nms

# Largest dw/dh accepted by decode: exp(4.135) = 1000/16, so a box grows at most from a
# 16 px anchor to a 1000 px image (as in torchvision and detectron2).
DELTA_CLAMP = math.log(1000.0 / 16)


def area(boxes: Tensor) -> Tensor:
    """(..., 4) -> (...) area; degenerate boxes give 0, never a negative number."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """(P, 4), (Q, 4) -> (P, Q) intersection over union."""
    return _box_iou(boxes1, boxes2)


def clip(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clips (..., 4) boxes to an image of ``size = (h, w)``; returns a new tensor."""
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def nonempty(boxes: Tensor, min_size: float = 0.0) -> Tensor:
    """(..., 4) -> (...) bool: width and height both larger than ``min_size``."""
    return ((boxes[..., 2] - boxes[..., 0]) > min_size) & ((boxes[..., 3] - boxes[..., 1]) > min_size)


def hflip(boxes: Tensor, width: int) -> Tensor:
    """Mirrors (..., 4) boxes in an image of the given width."""
    return torch.stack((width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]), dim=-1)


def boxes_to_rois(boxes_per_image: list[Tensor]) -> Tensor:
    """N tensors (P_i, 4) -> (sum P_i, 5) float32 [image index, x1, y1, x2, y2], the RoI
    format of torchvision's roi_pool / roi_align; (0, 5) when there are no boxes."""
    if not boxes_per_image:
        return torch.zeros(0, 5)
    return torch.cat([torch.cat((torch.full_like(b[:, :1], i), b), dim=1)
                      for i, b in enumerate(boxes_per_image)]).float()


def centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(..., 4) xyxy -> centre x, centre y, width, height, each (...)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(gt_boxes: Tensor, anchors: Tensor,
           weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Deltas that turn ``anchors`` into ``gt_boxes``; (..., 4), (..., 4) -> (..., 4).

    Computed in float32 even under autocast: log of small ratios loses too much in half
    precision.
    """
    gt_boxes, anchors = gt_boxes.float(), anchors.float()
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = centre_size(anchors)
    gx, gy, gw, gh = centre_size(gt_boxes)
    return torch.stack((wx * (gx - ax) / aw, wy * (gy - ay) / ah,
                        ww * torch.log(gw / aw), wh * torch.log(gh / ah)), dim=-1)


def decode(deltas: Tensor, anchors: Tensor,
           weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Applies deltas to anchors; (..., 4) deltas and broadcastable (..., 4) anchors -> boxes.

    ``deltas`` may also be (R, 4 * C) class-specific deltas with (R, 4) anchors, giving
    (R, 4 * C) boxes.
    """
    deltas = deltas.float()
    anchors = anchors.float()
    if deltas.shape[-1] != 4:  # (R, 4C) class-specific deltas against (R, 4) boxes
        num = deltas.shape[-1] // 4
        return decode(deltas.reshape(*deltas.shape[:-1], num, 4), anchors.unsqueeze(-2),
                      weights).reshape(deltas.shape)
    wx, wy, ww, wh = weights
    ax, ay, aw, ah = centre_size(anchors)
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=DELTA_CLAMP)
    dh = (deltas[..., 3] / wh).clamp(max=DELTA_CLAMP)
    cx, cy = dx * aw + ax, dy * ah + ay
    w, h = torch.exp(dw) * aw, torch.exp(dh) * ah
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def vote(boxes: Tensor, labels: Tensor, pool_boxes: Tensor, pool_scores: Tensor,
         pool_labels: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Box voting (Gidaris & Komodakis 2015, used by He et al. 2015, Appendix B).

    Each kept box (D, 4) of class ``labels`` becomes the score-weighted mean of the pool's
    boxes (P, 4) of its class whose IoU with it is >= ``iou_threshold`` (itself included when
    it is in the pool, so the set is never empty then). A box with no such neighbour is kept.
    Scores are unchanged.
    """
    if len(boxes) == 0 or len(pool_boxes) == 0:
        return boxes
    iou = box_iou(boxes.float(), pool_boxes.float())                       # (D, P)
    same = labels[:, None] == pool_labels[None, :]
    weights = torch.where(same & (iou >= iou_threshold), pool_scores.float()[None, :], 0.0)
    total = weights.sum(dim=1, keepdim=True)                              # (D, 1)
    voted = weights @ pool_boxes.float() / total.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.where(total > 0, voted, boxes.float()).to(boxes.dtype)


def box_iou_numpy(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """(P, 4), (Q, 4) numpy xyxy -> (P, Q) IoU, widths without +1; degenerate boxes give 0.

    For evaluation, where the arrays of one image are tiny and a tensor round trip would cost
    several times the arithmetic.
    """
    lt = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area1 = np.prod(np.clip(boxes1[:, 2:] - boxes1[:, :2], 0, None), axis=1)
    area2 = np.prod(np.clip(boxes2[:, 2:] - boxes2[:, :2], 0, None), axis=1)
    union = area1[:, None] + area2[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None   # (pid, workers, pool)


def _nms_pool(workers: int) -> ThreadPoolExecutor:
    """One thread pool per process (a forked DataLoader worker makes its own)."""
    global _POOL
    if _POOL is None or _POOL[:2] != (os.getpid(), workers):
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="nms"))
    return _POOL[2]


def nms_each(boxes: Sequence[Tensor], scores: Sequence[Tensor], threshold: float,
             labels: Sequence[Tensor] | None = None) -> list[Tensor]:
    """torchvision's NMS (per class with ``labels``: ``batched_nms``) on each image's boxes:
    kept indices, by decreasing score. On the CPU the images run in parallel threads, as the
    kernel is single-threaded and releases the GIL (the RPN's NMS of a demo batch of 8 took
    about a tenth of its training step)."""
    def one(i: int) -> Tensor:
        if labels is None:
            return nms(boxes[i], scores[i], threshold)
        return batched_nms(boxes[i], scores[i], labels[i], threshold)
    workers = min(len(boxes), torch.get_num_threads())
    if workers < 2 or boxes[0].device.type != "cpu":
        return [one(i) for i in range(len(boxes))]
    return list(_nms_pool(workers).map(one, range(len(boxes))))
