"""ILSVRC DET AP (metric ``imagenet_det``) against hand-computed cases: the devkit's per-box
IoU threshold min(0.5, wh / ((w + 10)(h + 10))), its greedy matching that skips boxes already
taken, and the metric reached from the detection evaluation and the configs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image
from torch import nn

from detres.config import load_config
from detres.data.ilsvrc_det import ILSVRCDetection
from detres.evaluation.detection import VOCEvaluator, evaluate_files
from detres.evaluation.inference import inference_on_dataset
from detres.evaluation.ilsvrc_det_eval import evaluate_imagenet_det, ilsvrc_iou_thresholds
from detres.evaluation.voc_eval import evaluate_voc
from detres.structures import DetectorOutput, Detections, ImageBatch, Targets
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.detection.inference import dataset_info, ready_detector


def test_iou_threshold_per_box_size():
    boxes = np.array([[0, 0, 10, 10],        # 100 / (20 * 20)            = 0.25
                      [5, 5, 25, 25],        # 400 / (30 * 30)            = 4/9
                      [0, 0, 30, 20],        # 600 / (40 * 30)            = 0.5 exactly
                      [0, 0, 100, 100],      # 10000 / 12100 = 0.83 -> capped at 0.5
                      [0, 0, 1, 1]], float)  # 1 / 121
    np.testing.assert_allclose(ilsvrc_iou_thresholds(boxes), [0.25, 4 / 9, 0.5, 0.5, 1 / 121])


def single(boxes, scores, labels=None):
    return {"boxes": np.array(boxes, float), "scores": np.array(scores, float),
            "labels": np.zeros(len(scores), int) if labels is None else np.array(labels)}


def test_small_box_matched_at_iou_03_and_large_box_needs_05():
    small = [{"boxes": np.array([[0, 0, 10, 10]]), "labels": np.array([0])}]
    iou_03 = [single([[0, 0, 10, 3]], [0.9])]        # 30 / 100 = 0.3 >= 0.25, < 0.5
    assert evaluate_imagenet_det(small, iou_03, ["a"])["mAP"] == pytest.approx(100.0)
    assert evaluate_voc(small, iou_03, ["a"], metric="voc12")["mAP"] == 0.0
    large = [{"boxes": np.array([[0, 0, 100, 100]]), "labels": np.array([0])}]
    assert evaluate_imagenet_det(large, [single([[0, 0, 100, 49]], [0.9])],    # 0.49
                                 ["a"])["mAP"] == 0.0
    assert evaluate_imagenet_det(large, [single([[0, 0, 100, 50]], [0.9])],    # 0.50
                                 ["a"])["mAP"] == pytest.approx(100.0)


# Class 0 on two images; boxes in detres's coordinates (x1, y1 one less than the XML's), where
# x2 - x1 is the devkit's pixel-inclusive width.
#   image A: a [0,0,10,10]   (10 x 10: threshold 0.25)
#   image B: b [0,0,100,100] (threshold 0.5)
# Detections of class 0, by score:             imagenet_det   voc12
#   .9 A [0,0,10,3]      IoU 0.3 with a        TP             FP
#   .8 B [0,0,100,49]    IoU 0.49 with b       FP             FP
#   .7 B [0,0,100,50]    IoU 0.5 with b        TP             TP
#   .6 A [50,50,60,60]   no overlap            FP             FP
# imagenet_det: recall 1/2 1/2 1 1, precision 1 1/2 2/3 1/2; envelope 1 2/3 2/3 1/2:
#   AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
# voc12: recall 0 0 1/2 1/2, precision 0 0 1/3 1/4: AP = 1/2 * 1/3 = 1/6
# Class 1 has a detection and no box -> nan, left out; class 2 has a box, no detection -> 0.
NAMES = ["thing", "ghost", "missed"]


def hand_case() -> tuple[list[dict], list[dict]]:
    gt = [{"boxes": np.array([[0, 0, 10, 10]]), "labels": np.array([0])},
          {"boxes": np.array([[0, 0, 100, 100], [20, 20, 80, 80]]), "labels": np.array([0, 2])}]
    dets = [single([[0, 0, 10, 3], [50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.6, 0.5], [0, 0, 1]),
            single([[0, 0, 100, 49], [0, 0, 100, 50]], [0.8, 0.7])]
    return gt, dets


def test_hand_computed_ap_over_two_images():
    gt, dets = hand_case()
    ours = evaluate_imagenet_det(gt, dets, NAMES)
    assert ours["per_class"]["thing"] == pytest.approx(500 / 6)
    assert math.isnan(ours["per_class"]["ghost"])
    assert ours["per_class"]["missed"] == 0.0
    assert ours["mAP"] == pytest.approx(500 / 6 / 2)
    assert evaluate_voc(gt, dets, NAMES, metric="voc12")["per_class"]["thing"] == \
        pytest.approx(100 / 6)


def test_taken_boxes_are_skipped_not_false_positives():
    # g1 [0,0,100,100] and g2 [50,0,150,100], both 100 x 100 (threshold 0.5).
    #   .9 [0,0,100,100]   IoU 1 with g1, 1/3 with g2            TP (g1)      TP (g1)
    #   .8 [20,0,120,100]  IoU 8000/12000 = 2/3 with g1 (taken),
    #                      7000/13000 = 7/13 = 0.54 with g2      TP (g2)      FP (g1 taken)
    #   .7 [0,0,100,100]   both boxes taken                      FP           FP
    # imagenet_det: recall 1/2 1 1, precision 1 1 2/3 -> AP 1
    # voc12: recall 1/2 1/2 1/2, precision 1 1/2 1/3 -> AP 1/2
    gt = [{"boxes": np.array([[0, 0, 100, 100], [50, 0, 150, 100]]), "labels": np.array([0, 0])}]
    dets = [single([[0, 0, 100, 100], [20, 0, 120, 100], [0, 0, 100, 100]], [0.9, 0.8, 0.7])]
    assert evaluate_imagenet_det(gt, dets, ["a"])["mAP"] == pytest.approx(100.0)
    assert evaluate_voc(gt, dets, ["a"], metric="voc12")["mAP"] == pytest.approx(50.0)


def test_best_free_box_wins_and_difficult_boxes_stay_free():
    # g1 [0,0,100,100], g2 [40,0,140,100]; one detection [30,0,130,100]:
    # IoU 7000/13000 = 0.54 with g1, 9000/11000 = 0.82 with g2 -> takes g2, then
    # [0,0,100,100] takes g1: TP TP, AP 1 (were it to take g1 first, the second would miss).
    gt = [{"boxes": np.array([[0, 0, 100, 100], [40, 0, 140, 100]]), "labels": np.array([0, 0])}]
    dets = [single([[30, 0, 130, 100], [0, 0, 100, 100]], [0.9, 0.8])]
    assert evaluate_imagenet_det(gt, dets, ["a"])["mAP"] == pytest.approx(100.0)
    # a difficult 10 x 10 box: detections matching it (IoU 0.3, then 1) are ignored and it
    # stays free; [50,50,60,60] is a TP -> AP 1 (voc12: the IoU 0.3 one is a FP -> AP 1/2)
    gt = [{"boxes": np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), "labels": np.array([0, 0]),
           "difficult": np.array([True, False])}]
    dets = [single([[0, 0, 10, 3], [0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.7])]
    assert evaluate_imagenet_det(gt, dets, ["a"])["mAP"] == pytest.approx(100.0)
    assert evaluate_voc(gt, dets, ["a"], metric="voc12")["mAP"] == pytest.approx(50.0)


class FixedDetector(nn.Module):
    """Returns the given detections, one image per call (the loader holds one per batch)."""

    def __init__(self, detections: list[Detections]) -> None:
        super().__init__()
        self.pending = list(detections)

    def forward(self, images: ImageBatch) -> DetectorOutput:
        return DetectorOutput(detections=[self.pending.pop(0)])


def write_ilsvrc(root) -> None:
    """Images A and B of hand_case as ILSVRC DET val files (XML boxes 1-based inclusive)."""
    objects = {"A": [("n01", (1, 1, 10, 10))],
               "B": [("n01", (1, 1, 100, 100)), ("n03", (21, 21, 80, 80))]}
    for name, objs in objects.items():
        xml = "".join(f"<object><name>{c}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                      f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                      for c, b in objs)
        for sub, text in (("Annotations", xml), ("Data", None)):
            path = root / sub / "DET" / "val" / (name + (".xml" if text else ".JPEG"))
            path.parent.mkdir(parents=True, exist_ok=True)
            if text is None:
                Image.new("RGB", (120, 120)).save(path, format="JPEG")
            else:
                path.write_text(f"<annotation><size><width>120</width><height>120</height>"
                                f"</size>{text}</annotation>")
    (root / "ImageSets" / "DET").mkdir(parents=True)
    (root / "ImageSets" / "DET" / "val2.txt").write_text("A 1\nB 2\n")


def test_metric_reached_from_detection_evaluation(tmp_path):
    write_ilsvrc(tmp_path)
    dataset = ILSVRCDetection(tmp_path, ["val2"], class_names=["n01", "n02", "n03"])
    gt, dets = hand_case()
    scale = 2.0                        # detections in resized pixels, mapped back by evaluation
    loader = [(ImageBatch.from_tensors([torch.zeros(3, 240, 240)]),
               [Targets(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), int(i), scale)])
              for i in dataset.image_ids]
    model = [Detections(torch.tensor(d["boxes"] * scale, dtype=torch.float32),
                        torch.tensor(d["scores"], dtype=torch.float32),
                        torch.tensor(d["labels"])) for d in dets]
    metrics = {}
    for metric in ("imagenet_det", "voc12"):
        evaluator = VOCEvaluator(dataset_info(dataset), metric, summary_only=False)
        metrics[metric] = inference_on_dataset(
            ready_detector(FixedDetector(model), "cpu", fast_path=False), loader, evaluator,
            "cpu", progress=False)
    assert metrics["imagenet_det"]["per_class"]["n01"] == pytest.approx(500 / 6)
    assert metrics["imagenet_det"]["mAP"] == pytest.approx(500 / 6 / 2)
    assert metrics["voc12"]["mAP"] == pytest.approx(100 / 6 / 2)


def test_metric_from_files_and_configs(tmp_path):
    # the small-box case as COCO files ([x, y, w, h]): IoU 0.3 with a 10 x 10 box
    gt = {"images": [{"id": 1, "width": 50, "height": 50}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10],
                           "area": 100, "iscrowd": 0}]}
    dt = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 3], "score": 0.9}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    files = (tmp_path / "gt.json", tmp_path / "dt.json")
    assert evaluate_files(*files, metric="imagenet_det")["mAP"] == pytest.approx(100.0)
    assert evaluate_files(*files, metric="voc12")["mAP"] == 0.0
    cfg = load_config(ROOT / "configs" / "frcnn_r101_imagenet_det.yaml", schema=DetectionConfig)
    assert cfg.test.metric == "imagenet_det"
    cfg = load_config(ROOT / "configs" / "frcnn_r18_shapes.yaml", ["test.metric=imagenet_det"],
                      schema=DetectionConfig)
    assert cfg.test.metric == "imagenet_det"
