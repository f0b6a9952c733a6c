"""PASCAL VOC box AP: VOC2007 11-point and VOC2010+ ("voc12") area under the PR curve.

Shapes: M ground-truth boxes and D detections of one image, K classes. Boxes are (.., 4) xyxy.

Rules of the VOC devkit (Everingham et al. 2010, sec. 4.4; devkit ``VOCevaldet.m``):
- a detection is matched to the ground-truth box of its class with which it has the highest
  IoU; IoU >= 0.5 (the devkit's ``>=``; py-faster-rcnn's port used ``>``) makes it a true
  positive unless that box was already taken by a higher-scoring detection (then a false
  positive); below 0.5 it is a false positive;
- a detection whose best box is "difficult" is neither a true nor a false positive, and
  difficult boxes are not counted in the recall denominator;
- VOC2007 AP is the mean over recall r in {0, 0.1, ..., 1} of the highest precision at recall
  >= r; VOC2010+ AP is the area under the precision envelope (precision made monotone from the
  right), summed where recall changes.

Widths are ``x2 - x1`` without the devkit's "+1": data/voc.py subtracts 1 from x1 and y1 of the
1-based inclusive VOC boxes, which gives the devkit's IoU exactly. Detections must use the same
coordinates.

A class with no non-difficult ground truth has AP ``nan`` and is left out of the mAP. Results are
percent (0-100), like the COCO metrics.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from detres.boxes import box_iou_numpy

METRICS = ("voc07", "voc12")

# (detection boxes (D, 4) of one image and class in decreasing score, its ground-truth boxes
# (M, 4), their difficult flags (M,)) -> true-positive and ignore flags (D,)
Matcher = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: str = "voc12") -> float:
    """AP (fraction 0..1) of one class from its recall and precision after each detection.

    Args:
        recall, precision: (D,) arrays, detections sorted by decreasing score.
        metric: ``"voc07"`` (11-point) or ``"voc12"`` (area).
    """
    recall, precision = np.asarray(recall, np.float64), np.asarray(precision, np.float64)
    if metric == "voc07":
        points = np.linspace(0.0, 1.0, 11)
        # highest precision at recall >= r, 0 if recall never reaches r
        best = [precision[recall >= r].max() if (recall >= r).any() else 0.0 for r in points]
        return float(np.mean(best))
    if metric != "voc12":
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # envelope: best precision to the right
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def _get(obj: Any, name: str, default: Any = None) -> np.ndarray | None:
    value = obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)
    if value is None:
        return None
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _match_image(det_boxes: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray,
                 iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """True-positive and ignore flags (D,) for one image and class; detections sorted by score.

    Each detection looks only at its best-overlapping box (as the devkit does), so "taken by a
    higher-scoring detection" is "not the first detection, in score order, to pick that box".
    """
    num_dets = len(det_boxes)
    if len(gt_boxes) == 0:
        return np.zeros(num_dets, bool), np.zeros(num_dets, bool)
    iou = box_iou_numpy(det_boxes, gt_boxes)                           # (D, M)
    best = iou.argmax(axis=1)                                 # (D,) first box among equals
    hit = iou[np.arange(num_dets), best] >= iou_threshold
    ignore = hit & gt_difficult[best]
    candidates = np.flatnonzero(hit & ~ignore)                # in score order
    _, first = np.unique(best[candidates], return_index=True)
    tp = np.zeros(num_dets, bool)
    tp[candidates[first]] = True
    return tp, ignore


def evaluate_voc(
    gt_per_image: Sequence[Any],
    detections_per_image: Sequence[Any],
    class_names: Sequence[str],
    metric: str = "voc07",
    iou_threshold: float = 0.5,
) -> dict[str, Any]:
    """VOC AP per class and its mean.

    Args:
        gt_per_image: per image, a mapping or object with ``boxes`` (M, 4) xyxy, ``labels``
            (M,) in [0, K) and optionally ``difficult`` (M,) bool (default: none difficult).
        detections_per_image: per image (aligned with ``gt_per_image``), ``boxes`` (D, 4),
            ``scores`` (D,), ``labels`` (D,); e.g. ``Detections`` or dicts of arrays.
        class_names: the K class names.
        metric: ``"voc07"`` (11-point) or ``"voc12"`` (area, VOC2010 and later).
        iou_threshold: IoU needed for a match (VOC: 0.5).

    Returns:
        ``{"mAP": percent, "per_class": {name: percent or nan}}``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return evaluate_matched(gt_per_image, detections_per_image, class_names,
                            functools.partial(_match_image, iou_threshold=iou_threshold), metric)


def evaluate_matched(gt_per_image: Sequence[Any], detections_per_image: Sequence[Any],
                     class_names: Sequence[str], match: Matcher, metric: str = "voc12"
                     ) -> dict[str, Any]:
    """AP per class and its mean with detections judged by ``match``, per image and class.

    The inputs and the result are those of :func:`evaluate_voc`; ``match`` is the dataset's
    rule (VOC's here, ILSVRC DET's in ilsvrc_det_eval.py) and ``metric`` the AP
    (``voc07`` or ``voc12``). Difficult boxes are left out of the recall denominator whatever
    the rule; detections flagged "ignore" by ``match`` are left out of the curve.
    """
    if len(gt_per_image) != len(detections_per_image):
        raise ValueError(f"{len(gt_per_image)} ground-truth images but {len(detections_per_image)} "
                         "detection lists")
    num_classes = len(class_names)
    # Per class: lists over images of (scores, tp, ignore) and the count of non-difficult boxes.
    scores_c = [[] for _ in range(num_classes)]
    tp_c = [[] for _ in range(num_classes)]
    keep_c = [[] for _ in range(num_classes)]
    num_pos = np.zeros(num_classes, np.int64)
    for i, (gt, dets) in enumerate(zip(gt_per_image, detections_per_image)):
        gt_boxes = _get(gt, "boxes").reshape(-1, 4).astype(np.float64)
        gt_labels = _get(gt, "labels").reshape(-1).astype(np.int64)
        difficult = _get(gt, "difficult")
        difficult = (np.zeros(len(gt_labels), bool) if difficult is None
                     else difficult.reshape(-1).astype(bool))
        det_boxes = _get(dets, "boxes").reshape(-1, 4).astype(np.float64)
        det_scores = _get(dets, "scores").reshape(-1).astype(np.float64)
        det_labels = _get(dets, "labels").reshape(-1).astype(np.int64)
        for labels, what in ((gt_labels, "ground-truth"), (det_labels, "detection")):
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"image {i}: {what} label outside [0, {num_classes})")
        num_pos += np.bincount(gt_labels[~difficult], minlength=num_classes)
        for c in np.unique(det_labels):
            sel = np.flatnonzero(det_labels == c)
            sel = sel[np.argsort(-det_scores[sel], kind="stable")]
            in_class = gt_labels == c
            tp, ignore = match(det_boxes[sel], gt_boxes[in_class], difficult[in_class])
            scores_c[c].append(det_scores[sel])
            tp_c[c].append(tp)
            keep_c[c].append(~ignore)
    per_class = {}
    for c, name in enumerate(class_names):
        per_class[name] = _class_ap(scores_c[c], tp_c[c], keep_c[c], int(num_pos[c]), metric)
    valid = [ap for ap in per_class.values() if not math.isnan(ap)]
    return {"mAP": float(np.mean(valid)) if valid else math.nan, "per_class": per_class}


def _class_ap(scores: list[np.ndarray], tp: list[np.ndarray], keep: list[np.ndarray],
              num_pos: int, metric: str) -> float:
    if num_pos == 0:
        return math.nan
    if not scores:
        return 0.0
    keep_all = np.concatenate(keep)                            # drop "difficult" detections
    scores_all, tp_all = np.concatenate(scores)[keep_all], np.concatenate(tp)[keep_all]
    order = np.argsort(-scores_all, kind="stable")             # all images, decreasing score
    tp_cum = np.cumsum(tp_all[order])
    recall = tp_cum / num_pos
    precision = tp_cum / np.arange(1, len(tp_cum) + 1)
    return voc_ap(recall, precision, metric) * 100


def coco_to_voc_inputs(gt_dataset: Mapping[str, Any], results: Sequence[Mapping[str, Any]]
                       ) -> tuple[list[dict], list[dict], list[str]]:
    """VOC evaluation inputs from a COCO-format ground truth and COCO results.

    An annotation is difficult when its ``difficult`` or ``ignore`` flag is set (the names VOC
    and LVIS-style COCO exports use) or it is a crowd region (``iscrowd``). Labels are the index
    of the category id among the sorted category ids; boxes go from [x, y, w, h] to xyxy.
    ``results`` should be validated first (coco_eval.load_results).

    Returns:
        ``gt_per_image``, ``detections_per_image`` (dicts of arrays, in ``images`` order) and the
        class names.
    """
    categories = sorted(gt_dataset["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k for k, c in enumerate(categories)}
    index_of = {img["id"]: i for i, img in enumerate(gt_dataset["images"])}
    gts = [{"boxes": [], "labels": [], "difficult": []} for _ in index_of]
    dets = [{"boxes": [], "scores": [], "labels": []} for _ in index_of]
    for ann in gt_dataset["annotations"]:
        g = gts[index_of[ann["image_id"]]]
        g["boxes"].append(ann["bbox"])
        g["labels"].append(label_of[ann["category_id"]])
        flags = (ann.get("difficult", 0), ann.get("ignore", 0), ann.get("iscrowd", 0))
        g["difficult"].append(any(bool(f) for f in flags))
    for r in results:
        d = dets[index_of[r["image_id"]]]
        d["boxes"].append(r["bbox"])
        d["scores"].append(r["score"])
        d["labels"].append(label_of[r["category_id"]])
    for item in (*gts, *dets):
        xywh = np.asarray(item["boxes"], np.float64).reshape(-1, 4)
        item["boxes"] = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    return gts, dets, [c.get("name", str(c["id"])) for c in categories]
