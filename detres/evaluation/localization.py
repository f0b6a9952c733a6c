"""ILSVRC localization error (top-1 / top-5, and on the ground-truth class), in percent.

The paper's ImageNet localization (Appendix C, Tables 13 and 14) is scored by the ILSVRC 2012
CLS-LOC rules (task 2). An image has n distinct ground-truth classes C_1..C_n, class C_j with one
or more boxes B_jm; the method gives guesses (c_i, b_i), a class and a box each, ranked best
first. With d(c, C) = 0 if c == C else 1 and f(b, B) = 0 if IoU(b, B) >= 0.5 else 1:

- top-k localization error of the image:
  ``e = 1/n * sum_j min_{i <= k} min_m max(d(c_i, C_j), f(b_i, B_jm))``.
  Class C_j is found when one of the first k guesses names it and that guess's box has
  IoU >= 0.5 with any box of C_j; the error is the share of classes not found. ILSVRC CLS-LOC
  images have a single class (n = 1), where this is simply "0 if one of the first k guesses
  counts, else 1"; the average over classes is the challenge's formula for n > 1.
- top-k classification error of the image: the same without boxes,
  ``1/n * sum_j min_{i <= k} d(c_i, C_j)``.
- error on the ground-truth class (Table 13, "LOC error on GT CLS"): an oracle hands the
  localizer each ground-truth class C_j and it returns one box g_j;
  ``e = 1/n * sum_j min_m f(g_j, B_jm)``. This isolates localization from classification.

IoU at exactly the threshold counts (``>=``). Boxes are float xyxy in continuous pixel
coordinates, width ``x2 - x1`` without "+1", as everywhere in the project; a degenerate box has
IoU 0 with anything, so it never counts. Fewer than k guesses are allowed: the missing ones simply
do not count. A class may appear more than once among the guesses (the formula does not care).
Dataset errors are the mean of the per-image errors, in percent (0-100), like the classification
errors in classification.py.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detres.boxes import box_iou_numpy

# (key of localization_errors, column title of format_table), in Table 13's order
COLUMNS = (
    ("gt_cls_loc_err", "LOC err on GT CLS"),
    ("top1_loc_err", "top-1 LOC err"),
    ("top5_loc_err", "top-5 LOC err"),
    ("top1_cls_err", "top-1 CLS err"),
    ("top5_cls_err", "top-5 CLS err"),
)


@dataclass
class LocalizationResult:
    """What the pipeline produced for one image (numpy arrays or tensors).

    Attributes:
        guess_labels: (G,) int classes, ranked best first (G is usually 5).
        guess_boxes: (G, 4) xyxy, the box predicted for each guessed class.
        gt_class_boxes: oracle boxes, ``{class: (4,) box}`` for each of the image's ground-truth
            classes (extra classes are ignored); None when the oracle was not run.
    """

    guess_labels: Any
    guess_boxes: Any
    gt_class_boxes: Mapping[int, Any] | None = None


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(labels: Any, what: str) -> np.ndarray:
    labels = _numpy(labels)
    # an empty list comes out as float64; anything else must be integer, not silently truncated
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise ValueError(f"{what} must be a 1-D integer array, got shape {labels.shape} "
                         f"dtype {labels.dtype}")
    return labels.astype(np.int64)


def _boxes(boxes: Any, what: str) -> np.ndarray:
    boxes = _numpy(boxes).astype(np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must have shape (N, 4), got {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError(f"{what} has non-finite coordinates")
    return boxes


def _guesses(guess_labels: Any, guess_boxes: Any) -> tuple[np.ndarray, np.ndarray]:
    labels = _labels(guess_labels, "guess_labels")
    boxes = _boxes(guess_boxes, "guess_boxes")
    if len(boxes) != len(labels):
        raise ValueError(f"{len(labels)} guess_labels but {len(boxes)} guess_boxes")
    return labels, boxes


def _ground_truth(gt_labels: Any, gt_boxes: Any) -> tuple[np.ndarray, np.ndarray]:
    labels = _labels(gt_labels, "gt_labels")
    boxes = _boxes(gt_boxes, "gt_boxes")
    if len(boxes) != len(labels):
        raise ValueError(f"{len(labels)} gt_labels but {len(boxes)} gt_boxes")
    if len(boxes) == 0:
        raise ValueError("no ground-truth boxes (the error would be 0/0)")
    return labels, boxes


def _check_threshold(iou_threshold: float) -> None:
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")


def _found(classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n,) bool: class C_j is among ``labels`` (np.isin, without its overhead on tiny arrays)."""
    return (classes[:, None] == labels[None, :]).any(axis=1)


def _class_hits(labels: np.ndarray, boxes: np.ndarray, gt_labels: np.ndarray,
                gt_boxes: np.ndarray, iou_threshold: float) -> np.ndarray:
    """(P, n) bool: box p names class C_j and has IoU >= threshold with a box of C_j.

    Classes C_j are ``np.unique(gt_labels)``, so a class with several boxes is counted once.
    """
    classes = np.unique(gt_labels)
    iou = box_iou_numpy(boxes, gt_boxes)                                                    # (P, M)
    good = (iou >= iou_threshold) & (labels[:, None] == gt_labels[None, :])        # (P, M)
    box_of_class = gt_labels[:, None] == classes[None, :]                          # (M, n)
    return (good.astype(np.int64) @ box_of_class.astype(np.int64)) > 0


def _oracle_boxes(gt_class_boxes: Mapping[int, Any], classes: np.ndarray) -> np.ndarray:
    """(n, 4) oracle box of each ground-truth class, in ``classes`` order."""
    by_class = {int(c): box for c, box in gt_class_boxes.items()}   # np / tensor keys -> int
    missing = [int(c) for c in classes if int(c) not in by_class]
    if missing:
        raise ValueError(f"gt_class_boxes has no box for ground-truth class(es) {missing}")
    rows = []
    for c in classes:
        box = _numpy(by_class[int(c)]).astype(np.float64)
        if box.shape != (4,):
            raise ValueError(f"gt_class_boxes[{int(c)}] must have shape (4,), got {box.shape}")
        rows.append(box)
    return _boxes(np.stack(rows), "gt_class_boxes")


def _image_errors(result: Any, gt_labels: Any, gt_boxes: Any, iou_threshold: float,
                  with_oracle: bool) -> dict[str, float]:
    """All errors of one image (fractions), validating its inputs once."""
    labels, boxes = _guesses(result.guess_labels, result.guess_boxes)
    gt_labels, gt_boxes = _ground_truth(gt_labels, gt_boxes)
    classes = np.unique(gt_labels)
    hits = _class_hits(labels[:5], boxes[:5], gt_labels, gt_boxes, iou_threshold)  # (<=5, n)
    errors = {
        "top1_loc_err": (~hits[:1].any(axis=0)).mean(),
        "top5_loc_err": (~hits.any(axis=0)).mean(),
        "top1_cls_err": (~_found(classes, labels[:1])).mean(),
        "top5_cls_err": (~_found(classes, labels[:5])).mean(),
    }
    if with_oracle:
        oracle = _class_hits(classes, _oracle_boxes(result.gt_class_boxes, classes), gt_labels,
                             gt_boxes, iou_threshold)
        errors["gt_cls_loc_err"] = (~np.diag(oracle)).mean()
    return errors


def localization_errors(results: Sequence[LocalizationResult], gt_labels: Sequence[Any],
                        gt_boxes: Sequence[Any], iou_threshold: float = 0.5,
                        image_ids: Sequence[Any] | None = None) -> dict[str, float]:
    """Dataset errors in percent: the mean over images of each per-image error.

    Args:
        results: per image, a ``LocalizationResult`` (or any object with its attributes).
        gt_labels, gt_boxes: per image (aligned with ``results``), (M,) classes and (M, 4) boxes.
        iou_threshold: IoU a box needs to count (ILSVRC: 0.5).
        image_ids: optional names of the images, only for error messages.

    Returns:
        ``{"top1_loc_err", "top5_loc_err", "top1_cls_err", "top5_cls_err"}`` and
        ``"gt_cls_loc_err"`` when every result has ``gt_class_boxes``.

    Raises:
        ValueError naming the image (position, and id when given) on malformed input.
    """
    _check_threshold(iou_threshold)
    if not len(results) == len(gt_labels) == len(gt_boxes):
        raise ValueError(f"{len(results)} results but {len(gt_labels)} gt_labels and "
                         f"{len(gt_boxes)} gt_boxes")
    if image_ids is not None and len(image_ids) != len(results):
        raise ValueError(f"{len(results)} results but {len(image_ids)} image_ids")
    if len(results) == 0:
        raise ValueError("no images to evaluate")
    with_oracle = all(r.gt_class_boxes is not None for r in results)
    totals: dict[str, float] = {}
    for i, (result, labels, boxes) in enumerate(zip(results, gt_labels, gt_boxes)):
        try:
            errors = _image_errors(result, labels, boxes, iou_threshold, with_oracle)
        except ValueError as e:
            name = f"image {i}" if image_ids is None else f"image {i} (id {image_ids[i]!r})"
            raise ValueError(f"{name}: {e}") from None
        for key, value in errors.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    return {key: 100.0 * total / len(results) for key, total in totals.items()}


def format_table(rows: Mapping[str, Mapping[str, float]], digits: int = 1) -> str:
    """A console table, one row per method, in Table 13's column order; "-" where missing.

    Args:
        rows: ``{method: localization_errors(...)}``, e.g. ``{"RPN": ..., "RPN+R-CNN": ...}``.
        digits: decimals of the percentages (the paper prints one).
    """
    header = ["method", *(title for _, title in COLUMNS)]
    body = [[str(name), *("-" if errors.get(key) is None else f"{errors[key]:.{digits}f}"
                          for key, _ in COLUMNS)]
            for name, errors in rows.items()]
    widths = [max(len(row[c]) for row in [header, *body]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        # names left-aligned, numbers right-aligned so the decimal points line up
        return "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                         for c, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in body)])
