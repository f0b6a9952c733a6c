"""VOC AP against hand-computed cases and a slow reference loop (the devkit's algorithm)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detres.evaluation.voc_eval import coco_to_voc_inputs, evaluate_voc, voc_ap
from detres.structures import Detections

# Class 0 on two images; "d" is difficult.
#   image A: g1 [0,0,10,10], g2 [20,20,30,30], d [40,40,50,50] (difficult)
#   image B: g3 [0,0,10,10]                      -> 3 non-difficult boxes
# Detections of class 0, by score:
#   .9 A [0,0,10,10]      IoU 1 with g1          TP
#   .8 A [41,41,50,50]    IoU .81 with d         difficult: neither TP nor FP
#   .7 A [0,0,10,9]       best is g1, taken      FP
#   .6 B [0,0,10,10]      g3                     TP
#   .5 A [100,100,110,110] no overlap            FP
#   .4 A [20,20,30,30]    g2                     TP
# Without the ignored one: TP FP TP FP TP
#   recall    1/3  1/3  2/3  2/3  1
#   precision 1    1/2  2/3  1/2  3/5
# VOC07: max precision at recall >= r for r = 0, .1, ..., 1:
#   r in {0, .1, .2, .3} -> 1;  r in {.4, .5, .6} -> 2/3;  r in {.7, .8, .9, 1} -> 3/5
#   AP = (4 * 1 + 3 * 2/3 + 4 * 3/5) / 11 = 8.4 / 11
# VOC12: precision envelope from the right: 1, 2/3, 2/3, 3/5, 3/5; recall steps of 1/3 at
#   envelope 1, 2/3, 3/5:  AP = 1/3 + 2/9 + 1/5 = 34/45
# Class 1 has detections but no ground truth -> nan, left out of the mAP.
# Class 2 has a box and no detections -> AP 0, counted in the mAP.
VOC07_CLASS0 = 8.4 / 11 * 100
VOC12_CLASS0 = 34 / 45 * 100
NAMES = ["thing", "ghost", "missed"]


def hand_case() -> tuple[list[dict], list[dict]]:
    gt = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 90, 90]]),
           "labels": np.array([0, 0, 0, 2]), "difficult": np.array([False, False, True, False])},
          {"boxes": np.array([[0, 0, 10, 10]]), "labels": np.array([0]), "difficult": np.array([False])}]
    dets = [{"boxes": np.array([[0, 0, 10, 10], [41, 41, 50, 50], [0, 0, 10, 9], [100, 100, 110, 110],
                                [20, 20, 30, 30], [0, 0, 10, 10]]),
             "scores": np.array([0.9, 0.8, 0.7, 0.5, 0.4, 0.3]),
             "labels": np.array([0, 0, 0, 0, 0, 1])},
            {"boxes": np.array([[0, 0, 10, 10]]), "scores": np.array([0.6]), "labels": np.array([0])}]
    return gt, dets


@pytest.mark.parametrize("metric, expected", [("voc07", VOC07_CLASS0), ("voc12", VOC12_CLASS0)])
def test_hand_computed_case_with_difficult_boxes(metric, expected):
    gt, dets = hand_case()
    result = evaluate_voc(gt, dets, NAMES, metric=metric)
    assert result["per_class"]["thing"] == pytest.approx(expected)
    assert math.isnan(result["per_class"]["ghost"])
    assert result["per_class"]["missed"] == 0
    assert result["mAP"] == pytest.approx(expected / 2)


def test_voc_ap_on_given_curves():
    recall = np.array([1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    precision = np.array([1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    assert voc_ap(recall, precision, "voc07") == pytest.approx(8.4 / 11)
    assert voc_ap(recall, precision, "voc12") == pytest.approx(34 / 45)
    # recall stops at 0.5 with precision 1: VOC07 counts 6 of 11 points, VOC12 half the area
    assert voc_ap(np.array([0.25, 0.5]), np.array([1.0, 1.0]), "voc07") == pytest.approx(6 / 11)
    assert voc_ap(np.array([0.25, 0.5]), np.array([1.0, 1.0]), "voc12") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="metric"):
        voc_ap(recall, precision, "coco")


def test_iou_of_exactly_half_matches_and_duplicates_are_false_positives():
    gt = [{"boxes": np.array([[0, 0, 10, 10]]), "labels": np.array([0])}]
    half = [{"boxes": np.array([[0, 0, 10, 5]]), "scores": np.array([0.9]), "labels": np.array([0])}]
    assert evaluate_voc(gt, half, ["a"])["mAP"] == pytest.approx(100.0)        # IoU 0.5 >= 0.5
    twice = [{"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 10]]), "scores": np.array([0.9, 0.8]),
              "labels": np.array([0, 0])}]
    assert evaluate_voc(gt, twice, ["a"], metric="voc12")["mAP"] == pytest.approx(100.0)
    # the duplicate scores higher than the true match of a second box -> precision 1/2 at recall 1
    gt2 = [{"boxes": np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), "labels": np.array([0, 0])}]
    dup_first = [{"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]]),
                  "scores": np.array([0.9, 0.8, 0.7]), "labels": np.array([0, 0, 0])}]
    # TP FP TP: recall 1/2 1/2 1, precision 1 1/2 2/3 -> area 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert evaluate_voc(gt2, dup_first, ["a"], metric="voc12")["mAP"] == pytest.approx(500 / 6)


def test_accepts_detections_tensors():
    gt, dets = hand_case()
    as_tensors = [Detections(torch.as_tensor(d["boxes"], dtype=torch.float32),
                             torch.as_tensor(d["scores"], dtype=torch.float32),
                             torch.as_tensor(d["labels"])) for d in dets]
    assert evaluate_voc(gt, as_tensors, NAMES)["mAP"] == pytest.approx(VOC07_CLASS0 / 2)
    with pytest.raises(ValueError, match="label outside"):
        evaluate_voc(gt, dets, NAMES[:1])


def reference_voc(gt, dets, num_classes, metric):
    """The devkit's loop (py-faster-rcnn voc_eval.py, with >= as VOCevaldet.m), float64."""
    aps = []
    for c in range(num_classes):
        records = []
        taken = {}
        npos = 0
        for i, g in enumerate(gt):
            sel = g["labels"] == c
            taken[i] = np.zeros(sel.sum(), bool)
            npos += int((~g["difficult"][sel]).sum())
        for i, d in enumerate(dets):
            records += [(-s, i, b) for s, b, l in zip(d["scores"], d["boxes"], d["labels"]) if l == c]
        records.sort(key=lambda r: r[0])  # stable: ties keep image order, then detection order
        tp, fp = [], []
        for _, i, b in records:
            sel = gt[i]["labels"] == c
            boxes, difficult = gt[i]["boxes"][sel], gt[i]["difficult"][sel]
            best, jmax = -1.0, -1
            for j, g in enumerate(boxes):
                iw = max(min(b[2], g[2]) - max(b[0], g[0]), 0)
                ih = max(min(b[3], g[3]) - max(b[1], g[1]), 0)
                inter = iw * ih
                union = (b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
                if inter / union > best:
                    best, jmax = inter / union, j
            if best >= 0.5 and difficult[jmax]:
                continue
            hit = best >= 0.5 and not taken[i][jmax]
            if hit:
                taken[i][jmax] = True
            tp.append(float(hit))
            fp.append(float(not hit))
        if npos == 0:
            aps.append(math.nan)
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        aps.append(voc_ap(tp / npos, tp / np.maximum(tp + fp, 1e-12), metric) * 100 if len(tp) else 0.0)
    return aps


@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_matches_reference_loop_on_random_problem(metric):
    rng = np.random.default_rng(0)
    gt, dets = [], []
    for _ in range(20):
        m = rng.integers(0, 8)
        xy = rng.uniform(0, 80, (m, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (m, 2))], 1)
        gt.append({"boxes": boxes, "labels": rng.integers(0, 4, m), "difficult": rng.random(m) < 0.2})
        d = 15
        jitter = boxes[rng.integers(0, max(m, 1), d) % max(m, 1)] if m else np.zeros((d, 4)) + 10
        det_boxes = jitter + rng.normal(0, 3, (d, 4))
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)
        dets.append({"boxes": det_boxes, "scores": np.round(rng.random(d), 2),   # ties included
                     "labels": rng.integers(0, 4, d)})
    result = evaluate_voc(gt, dets, ["a", "b", "c", "d"], metric=metric)
    expected = reference_voc(gt, dets, 4, metric)
    assert list(result["per_class"].values()) == pytest.approx(expected, nan_ok=True)


def test_coco_to_voc_inputs_reads_difficult_flags():
    gt_dataset = {"images": [{"id": 7}, {"id": 9}],
                  "categories": [{"id": 5, "name": "b"}, {"id": 2, "name": "a"}],
                  "annotations": [
                      {"image_id": 9, "category_id": 5, "bbox": [1, 2, 3, 4]},
                      {"image_id": 9, "category_id": 2, "bbox": [0, 0, 1, 1], "difficult": 1},
                      {"image_id": 9, "category_id": 2, "bbox": [0, 0, 1, 1], "ignore": 1},
                      {"image_id": 9, "category_id": 2, "bbox": [0, 0, 1, 1], "iscrowd": 1}]}
    results = [{"image_id": 7, "category_id": 5, "bbox": [0, 0, 2, 2], "score": 0.5}]
    gts, dets, names = coco_to_voc_inputs(gt_dataset, results)
    assert names == ["a", "b"]
    assert len(gts[0]["labels"]) == 0 and gts[0]["boxes"].shape == (0, 4)
    np.testing.assert_array_equal(gts[1]["boxes"][0], [1, 2, 4, 6])
    assert gts[1]["labels"] == [1, 0, 0, 0] and gts[1]["difficult"] == [False, True, True, True]
    np.testing.assert_array_equal(dets[0]["boxes"], [[0, 0, 2, 2]])
    assert dets[0]["labels"] == [1]
