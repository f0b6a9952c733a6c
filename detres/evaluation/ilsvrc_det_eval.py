"""ILSVRC DET box AP (metric ``imagenet_det``): VOC's area AP with the ILSVRC devkit's matching.

Shapes: M ground-truth boxes and D detections of one image and class; boxes are (.., 4) xyxy.

Rules of the ILSVRC 2013-2017 devkit (``evaluation/eval_detection.m``; Russakovsky et al.
2015, sec. 4.3), where they differ from VOC's (voc_eval.py):
- each box needs its own IoU, ``min(0.5, wh / ((w + 10)(h + 10)))`` for a w x h box, because
  a few pixels of annotation error alone keep a small box under 0.5: a 10 x 10 box is
  detected at IoU 0.25; 0.5 holds once (w - 10)(h - 10) >= 200 (30 x 20, 25 x 25 px);
- detections of an image, in decreasing score, take the box with the highest IoU among those
  not yet taken that reach their own threshold (``if gt_detected(k) > 0 continue``). VOC looks
  at the best box overall and calls the detection a false positive when that box is taken, so
  a detection that also covers a second, free box counts here and not in VOC;
- AP is the area under the precision envelope (the devkit's ``VOCap``, VOC2010+), the mAP
  the mean over the classes with ground truth.

The devkit measures w, h and IoU on pixel-inclusive boxes (``x2 - x1 + 1``); data/ilsvrc_det.py
subtracts 1 from x1 and y1 as data/voc.py does, so ``x2 - x1`` here is the devkit's width.
Detections must use the same coordinates.

ILSVRC DET has no "difficult" boxes (data/ilsvrc_det.py marks none). The devkit's blacklist
(image/class pairs of val left out of the evaluation) is not read; other inputs' difficult
flags (e.g. COCO-format ``iscrowd``) follow VOC: the box is not counted in the recall and a
detection whose chosen box it is counts neither way, the box staying free.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from detres.boxes import box_iou_numpy
from detres.evaluation.voc_eval import evaluate_matched

MAX_IOU_THRESHOLD = 0.5      # the devkit's defaultIOUthr
PIXEL_TOLERANCE = 10         # the devkit's pixelTolerance


def ilsvrc_iou_thresholds(gt_boxes: np.ndarray) -> np.ndarray:
    """(M, 4) boxes -> (M,) IoU each needs to be detected: ``min(0.5, wh / ((w+10)(h+10)))``."""
    w = gt_boxes[:, 2] - gt_boxes[:, 0]
    h = gt_boxes[:, 3] - gt_boxes[:, 1]
    return np.minimum(MAX_IOU_THRESHOLD,
                      w * h / ((w + PIXEL_TOLERANCE) * (h + PIXEL_TOLERANCE)))


def match_ilsvrc_image(det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """True-positive and ignore flags (D,) for one image and class; detections sorted by
    decreasing score (the devkit's greedy loop)."""
    num_dets = len(det_boxes)
    tp, ignore = np.zeros(num_dets, bool), np.zeros(num_dets, bool)
    if len(gt_boxes) == 0:
        return tp, ignore
    iou = box_iou_numpy(det_boxes, gt_boxes)                             # (D, M)
    # iou > 0: the devkit only compares boxes that intersect (iw > 0 & ih > 0)
    reach = (iou > 0) & (iou >= ilsvrc_iou_thresholds(gt_boxes))         # (D, M)
    taken = np.zeros(len(gt_boxes), bool)
    for d in np.flatnonzero(reach.any(axis=1)):          # the others are false positives
        free = np.where(reach[d] & ~taken, iou[d], -1.0)
        g = int(free.argmax())                           # first box among equals (ov > ovmax)
        if free[g] < 0:
            continue                                     # every box it reaches is taken
        if gt_difficult[g]:
            ignore[d] = True
        else:
            tp[d] = taken[g] = True
    return tp, ignore


def evaluate_imagenet_det(gt_per_image: Sequence[Any], detections_per_image: Sequence[Any],
                          class_names: Sequence[str]) -> dict[str, Any]:
    """ILSVRC DET AP per class and its mean (percent); inputs and result as
    :func:`detres.evaluation.voc_eval.evaluate_voc`."""
    return evaluate_matched(gt_per_image, detections_per_image, class_names,
                            match_ilsvrc_image, metric="voc12")
