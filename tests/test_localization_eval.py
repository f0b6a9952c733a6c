"""ILSVRC localization error against hand-computed cases and a slow loop over the challenge's
formula (see detres/evaluation/localization.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detres.evaluation.localization import (LocalizationResult, format_table,
                                            localization_errors)

BOX = [0, 0, 10, 10]          # the ground-truth box of most cases; area 100


def errors(labels, boxes, gt_labels, gt_boxes, oracle=None, **kw):
    """The errors of one image, as fractions: a one-image set through localization_errors."""
    result = LocalizationResult(np.array(labels, np.int64),
                                np.array(boxes, np.float64).reshape(-1, 4), oracle)
    percent = localization_errors([result], [np.array(gt_labels)],
                                  [np.array(gt_boxes, np.float64)], **kw)
    return {key: value / 100 for key, value in percent.items()}


def loc_err(labels, boxes, gt_labels, gt_boxes, k, **kw):
    return errors(labels, boxes, gt_labels, gt_boxes, **kw)[f"top{k}_loc_err"]


def cls_err(labels, gt_labels, k):
    return errors(labels, np.zeros((len(labels), 4)), gt_labels, [BOX] * len(gt_labels))[
        f"top{k}_cls_err"]


def test_right_class_bad_box_is_an_error():
    # [5,0,15,10] vs [0,0,10,10]: intersection 5*10 = 50, union 150 -> IoU 1/3 < 0.5
    assert loc_err([3], [[5, 0, 15, 10]], [3], [BOX], k=1) == 1.0
    assert loc_err([3], [[5, 0, 15, 10]], [3], [BOX], k=5) == 1.0
    assert cls_err([3], [3], k=1) == 0.0


def test_right_box_wrong_class_is_an_error():
    assert loc_err([4], [BOX], [3], [BOX], k=5) == 1.0
    assert cls_err([4], [3], k=5) == 1.0
    assert loc_err([3], [BOX], [3], [BOX], k=1) == 0.0        # the same box with the right class


def test_any_box_of_the_class_will_do():
    # class 3 has two boxes; the guess misses the first (IoU 0) and overlaps the second:
    # [22,20,40,40] vs [20,20,40,40]: intersection 18*20 = 360, union 400 -> IoU 0.9
    gt = [BOX, [20, 20, 40, 40]]
    assert loc_err([3], [[22, 20, 40, 40]], [3, 3], gt, k=1) == 0.0
    # a box of another class does not help: the second box now belongs to class 4
    assert loc_err([3], [[22, 20, 40, 40]], [3, 4], gt, k=1) == 1.0


def test_correct_guess_at_rank_three():
    # rank 1: wrong class, right box; rank 2: right class, IoU 1/3; rank 3: right class and box
    labels = [4, 3, 3, 1, 2]
    boxes = [BOX, [5, 0, 15, 10], [0, 0, 10, 9], BOX, BOX]     # rank 3: IoU 90/100
    errs = {k: loc_err(labels, boxes, [3], [BOX], k=k) for k in (1, 5)}
    assert errs == {1: 1.0, 5: 0.0}
    assert loc_err(labels[:2], boxes[:2], [3], [BOX], k=5) == 1.0     # rank 3 is the one
    assert cls_err(labels, [3], k=1) == 1.0
    assert cls_err(labels, [3], k=5) == 0.0


def test_iou_of_exactly_the_threshold_counts():
    # [0,0,10,5] inside [0,0,10,10]: intersection 50, union 100 -> IoU exactly 0.5
    assert loc_err([3], [[0, 0, 10, 5]], [3], [BOX], k=1) == 0.0
    # [0,0,20,10] contains it: intersection 100, union 200 -> IoU exactly 0.5
    assert loc_err([3], [[0, 0, 20, 10]], [3], [BOX], k=1) == 0.0
    # [0,0,10,4.99]: intersection 49.9, union 100 -> 0.499
    assert loc_err([3], [[0, 0, 10, 4.99]], [3], [BOX], k=1) == 1.0
    # the threshold is a parameter: 0.5 < 0.6, while [0,0,10,6] has 60/100 = 0.6
    assert loc_err([3], [[0, 0, 10, 5]], [3], [BOX], k=1, iou_threshold=0.6) == 1.0
    assert loc_err([3], [[0, 0, 10, 6]], [3], [BOX], k=1, iou_threshold=0.6) == 0.0
    # degenerate boxes have IoU 0 (not 0/0), even with an identical degenerate box
    assert loc_err([3], [[3, 3, 3, 3]], [3], [[3, 3, 3, 3]], k=1) == 1.0


def test_multi_class_image_averages_over_its_classes():
    # classes 1 (two boxes) and 2 (one box): n = 2 distinct classes, not 3 boxes
    gt_labels = [1, 1, 2]
    gt_boxes = [BOX, [50, 50, 60, 60], [20, 20, 30, 30]]
    # class 1 found at rank 1; class 2 named at rank 2 but with class 1's box (IoU 0)
    labels, boxes = [1, 2], [BOX, BOX]
    assert loc_err(labels, boxes, gt_labels, gt_boxes, k=1) == 0.5
    assert loc_err(labels, boxes, gt_labels, gt_boxes, k=5) == 0.5
    assert cls_err(labels, gt_labels, k=1) == 0.5
    assert cls_err(labels, gt_labels, k=5) == 0.0
    # only class 2 found -> also 0.5 (1/2, not 2/3 or 1/3 as a count over boxes would give)
    assert loc_err([2], [[20, 20, 30, 30]], gt_labels, gt_boxes, k=1) == 0.5
    # both found
    assert loc_err([2, 1], [[20, 20, 30, 30], [50, 50, 60, 60]], gt_labels, gt_boxes, k=5) == 0.0


def test_gt_class_oracle_error():
    gt_labels = np.array([1, 2])
    gt_boxes = np.array([BOX, [20, 20, 30, 30]], np.float64)
    oracle = {1: np.array([0, 0, 10, 5.0]),      # IoU 0.5 -> found
              2: np.array([20, 20, 30, 22.0]),   # 20/100 -> missed
              7: np.array([0, 0, 1, 1.0])}       # not a ground-truth class: ignored
    oracle_err = lambda o: errors([], [], gt_labels, gt_boxes, o)["gt_cls_loc_err"]  # noqa: E731
    assert oracle_err(oracle) == 0.5
    oracle[2] = np.array([20, 21, 30, 30.0])     # 90/100 -> found
    assert oracle_err(oracle) == 0.0
    # keys may be numpy or torch integers
    keys = {np.int64(1): torch.tensor([0, 0, 10, 10.0]), torch.tensor(2): [0, 0, 1, 1]}
    assert oracle_err(keys) == 0.5


def test_fewer_than_five_guesses():
    assert loc_err([4, 5], [BOX, BOX], [3], [BOX], k=5) == 1.0
    assert loc_err([4, 3], [BOX, BOX], [3], [BOX], k=5) == 0.0
    assert loc_err([], np.zeros((0, 4)), [3], [BOX], k=5) == 1.0      # no guess at all
    assert cls_err([], [3], k=5) == 1.0


def dataset():
    """Four images; per-image errors (top-1 LOC, top-5 LOC, top-1 CLS, top-5 CLS, GT CLS):
    A: right at rank 1                         0    0    0    0    0   (oracle IoU 1)
    B: right at rank 3, 3 guesses              1    0    1    0    1   (oracle IoU 1/3)
    C: right class, bad box (IoU 1/3)          1    1    0    0    0   (oracle IoU 0.5)
    D: classes 1 and 2, only class 1 found     .5   .5   .5   0    .5  (oracle: 1 yes, 2 no)
       (rank 1: class 1 right box; rank 2: class 2 wrong box; top-1 names only class 1)
    means in percent:                          62.5 37.5 37.5 0    37.5
    """
    gt_labels = [np.array([3]), np.array([3]), np.array([3]), np.array([1, 2])]
    gt_boxes = [np.array([BOX], np.float64)] * 3 + [np.array([BOX, [20, 20, 30, 30]], np.float64)]
    results = [
        LocalizationResult(np.array([3, 1]), np.array([BOX, BOX], np.float64),
                           {3: np.array(BOX, np.float64)}),
        LocalizationResult(np.array([4, 5, 3]), np.array([BOX, BOX, BOX], np.float64),
                           {3: np.array([5, 0, 15, 10.0])}),
        LocalizationResult(np.array([3]), np.array([[5, 0, 15, 10]], np.float64),
                           {3: np.array([0, 0, 10, 5.0])}),
        LocalizationResult(np.array([1, 2]), np.array([BOX, BOX], np.float64),
                           {1: np.array(BOX, np.float64), 2: np.array([0, 0, 5, 5.0])}),
    ]
    return results, gt_labels, gt_boxes


def test_dataset_means_in_percent():
    results, gt_labels, gt_boxes = dataset()
    errs = localization_errors(results, gt_labels, gt_boxes)
    assert errs == pytest.approx({"top1_loc_err": 62.5, "top5_loc_err": 37.5,
                                  "top1_cls_err": 37.5, "top5_cls_err": 0.0,
                                  "gt_cls_loc_err": 37.5})
    # one image without the oracle -> no GT-class column at all
    results[1].gt_class_boxes = None
    assert "gt_cls_loc_err" not in localization_errors(results, gt_labels, gt_boxes)


def test_tensors_are_accepted():
    results, gt_labels, gt_boxes = dataset()
    results = [LocalizationResult(torch.as_tensor(r.guess_labels), torch.as_tensor(r.guess_boxes),
                                  r.gt_class_boxes) for r in results]
    errs = localization_errors(results, [torch.as_tensor(x) for x in gt_labels],
                               [torch.as_tensor(x) for x in gt_boxes])
    assert errs["top5_loc_err"] == pytest.approx(37.5)


def _no_gt(results, gt_labels, gt_boxes):
    gt_labels[2], gt_boxes[2] = np.zeros(0, np.int64), np.zeros((0, 4))


# name: (image broken, how, what the message must say after "image i: ")
BROKEN = {
    "box shape": (2, lambda r, gl, gb: setattr(r[2], "guess_boxes", np.zeros((1, 3))),
                  r"guess_boxes .*\(1, 3\)"),
    "count": (2, lambda r, gl, gb: setattr(r[2], "guess_labels", np.array([3, 4])),
              "2 guess_labels but 1 guess_boxes"),
    "nan guess": (2, lambda r, gl, gb: setattr(r[2], "guess_boxes", np.array([[0, 0, np.nan, 1]])),
                  "guess_boxes has non-finite"),
    "inf gt": (2, lambda r, gl, gb: gb.__setitem__(2, np.array([[0, 0, np.inf, 1]])),
               "gt_boxes has non-finite"),
    "no gt": (2, _no_gt, "no ground-truth boxes"),
    "float labels": (2, lambda r, gl, gb: setattr(r[2], "guess_labels", np.array([3.5])),
                     "guess_labels must be a 1-D integer array"),
    "oracle class": (3, lambda r, gl, gb: r[3].gt_class_boxes.pop(2),
                     r"gt_class_boxes has no box for ground-truth class\(es\) \[2\]"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_bad_input_names_the_image(case):
    image, change, message = BROKEN[case]
    results, gt_labels, gt_boxes = dataset()
    change(results, gt_labels, gt_boxes)
    with pytest.raises(ValueError, match=f"^image {image}: {message}"):
        localization_errors(results, gt_labels, gt_boxes)
    ids = ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match=f"^image {image} \\(id '{ids[image]}'\\): {message}"):
        localization_errors(results, gt_labels, gt_boxes, image_ids=ids)


def test_bad_input_of_the_whole_set():
    results, gt_labels, gt_boxes = dataset()
    with pytest.raises(ValueError, match="4 results but 3 gt_labels"):
        localization_errors(results, gt_labels[:3], gt_boxes)
    with pytest.raises(ValueError, match="no images"):
        localization_errors([], [], [])
    with pytest.raises(ValueError, match="iou_threshold"):
        localization_errors(results, gt_labels, gt_boxes, iou_threshold=0.0)


def test_format_table():
    results, gt_labels, gt_boxes = dataset()
    full = localization_errors(results, gt_labels, gt_boxes)
    table = format_table({"RPN": {k: v for k, v in full.items() if k != "gt_cls_loc_err"},
                          "RPN+R-CNN": full})
    header, rule, rpn, both = table.splitlines()
    assert header.split("  ")[0].strip() == "method"
    for title in ("LOC err on GT CLS", "top-1 LOC err", "top-5 LOC err", "top-1 CLS err",
                  "top-5 CLS err"):
        assert title in header
    assert set(rule) == {"-"}
    assert rpn.split() == ["RPN", "-", "62.5", "37.5", "37.5", "0.0"]
    assert both.split() == ["RPN+R-CNN", "37.5", "62.5", "37.5", "37.5", "0.0"]
    assert len({len(header), len(rpn), len(both)}) == 1        # columns line up


# ---- slow reference: explicit loops over the ILSVRC formula -------------------------------

def ref_iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def ref_image(guesses, gt, k, thr, oracle=None):
    """guesses: [(class, box)] ranked; gt: [(class, box)] -> (loc err, cls err, oracle err)."""
    classes = sorted({c for c, _ in gt})
    loc = cls = orc = 0.0
    for cj in classes:
        boxes_j = [b for c, b in gt if c == cj]
        best_loc = best_cls = 1
        for ci, bi in guesses[:k]:
            d = 0 if ci == cj else 1
            best_cls = min(best_cls, d)
            for bm in boxes_j:
                f = 0 if ref_iou(bi, bm) >= thr else 1
                best_loc = min(best_loc, max(d, f))
        loc += best_loc
        cls += best_cls
        if oracle is not None:
            orc += min(0 if ref_iou(oracle[cj], bm) >= thr else 1 for bm in boxes_j)
    n = len(classes)
    return loc / n, cls / n, orc / n


def random_box(rng):
    x1, y1 = rng.integers(0, 8, 2)
    return [float(x1), float(y1), float(x1 + rng.integers(1, 5)), float(y1 + rng.integers(1, 5))]


def jitter(rng, box):
    # integer shifts/resizes of a box on a small grid: IoUs fall on both sides of 0.5 and,
    # being ratios of small integers, often exactly on it
    x1, y1, x2, y2 = box
    d = rng.integers(-1, 2, 4)
    return [x1 + d[0], y1 + d[1], max(x2 + d[2], x1 + d[0] + 1), max(y2 + d[3], y1 + d[1] + 1)]


def random_image(rng):
    num_classes = 4
    gt = [(int(rng.integers(num_classes)), random_box(rng)) for _ in range(rng.integers(1, 4))]
    guesses = []
    for _ in range(rng.integers(0, 8)):
        if rng.random() < 0.7:        # near some ground-truth box, class often its own
            c, b = gt[rng.integers(len(gt))]
            c = c if rng.random() < 0.7 else int(rng.integers(num_classes))
            guesses.append((c, jitter(rng, b)))
        else:
            guesses.append((int(rng.integers(num_classes)), random_box(rng)))
    oracle = {c: jitter(rng, b) for c, b in gt}
    return guesses, gt, oracle


def test_matches_slow_reference_on_random_images():
    rng = np.random.default_rng(0)
    images = [random_image(rng) for _ in range(300)]
    thr = 0.5
    results, gt_labels, gt_boxes = [], [], []
    expected = {"top1_loc_err": 0.0, "top5_loc_err": 0.0, "top1_cls_err": 0.0,
                "top5_cls_err": 0.0, "gt_cls_loc_err": 0.0}
    ious = []
    for guesses, gt, oracle in images:
        labels = np.array([c for c, _ in guesses], np.int64)
        boxes = np.array([b for _, b in guesses], np.float64).reshape(-1, 4)
        g_labels = np.array([c for c, _ in gt], np.int64)
        g_boxes = np.array([b for _, b in gt], np.float64)
        loc1, cls1, orc = ref_image(guesses, gt, 1, thr, oracle)
        loc5, cls5, _ = ref_image(guesses, gt, 5, thr)
        oracle = {c: np.array(b) for c, b in oracle.items()}
        one = errors(labels, boxes, g_labels, g_boxes, oracle, iou_threshold=thr)
        assert one == pytest.approx(dict(zip(expected, (loc1, loc5, cls1, cls5, orc))))
        for key, value in zip(expected, (loc1, loc5, cls1, cls5, orc)):
            expected[key] += 100 * value / len(images)
        results.append(LocalizationResult(labels, boxes, oracle))
        gt_labels.append(g_labels)
        gt_boxes.append(g_boxes)
        ious += [ref_iou(b, bm) for c, b in guesses for cm, bm in gt if c == cm]
    assert localization_errors(results, gt_labels, gt_boxes, thr) == pytest.approx(expected)
    # the random set exercises both sides of the threshold and the boundary itself
    ious = np.array(ious)
    assert (ious > 0.5).sum() > 50 and ((ious > 0) & (ious < 0.5)).sum() > 50
    assert (ious == 0.5).sum() > 5
    assert 0.1 < expected["top5_loc_err"] / 100 < 0.9
    assert not math.isclose(expected["top1_loc_err"], expected["top5_loc_err"])
