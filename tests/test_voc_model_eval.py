"""VOC07 evaluation of a model end to end: ``detres.tasks.detection.evaluate(cfg, weights,
metric="voc07")`` on a tiny VOCdevkit written here, against ``evaluate_voc`` run directly on the
model's own detections (images resized by hand, boxes divided by the scale, ground truth read
from the XML files here)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT

from detres.config import load_config, to_dict
from detres.data.transforms import resize
from detres.data.voc import VOC_CLASSES
from detres.engine.checkpoint import atomic_save
from detres.evaluation.voc_eval import evaluate_voc
from detres.structures import ImageBatch
from detres.tasks import detection
from detres.tasks.detection.build import build_detector
from detres.tasks.detection.config import DetectionConfig

W, H = 60, 50                    # every image; shorter side 50 -> 96 px: scale 1.92
SCALE = 96 / 50
# (name, 1-based VOC box, difficult) per image; big boxes, so that a random detector's
# 100 detections per image match some of them and the AP is not 0 by construction
IMAGES = {
    "000001": [("dog", (3, 3, 58, 48), 0), ("person", (10, 5, 40, 45), 0)],
    "000002": [("dog", (2, 4, 50, 49), 0), ("cat", (20, 10, 59, 50), 1)],
    "000003": [("person", (1, 1, 60, 50), 0)],
}


def write_devkit(root: Path) -> Path:
    voc = root / "VOCdevkit" / "VOC2007"
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, objects in IMAGES.items():
        xml = "".join(
            f"<object><name>{c}</name><truncated>0</truncated><difficult>{d}</difficult>"
            f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
            f"<ymax>{b[3]}</ymax></bndbox></object>" for c, b, d in objects)
        (voc / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>{W}</width>"
            f"<height>{H}</height><depth>3</depth></size>{xml}</annotation>")
        pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
    (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(IMAGES) + "\n")
    return root / "VOCdevkit"


def oracle_inputs(model, devkit: Path) -> tuple[list[dict], list[dict]]:
    """Ground truth from IMAGES (VOC boxes are 1-based: x1 - 1, y1 - 1) and the model's
    detections on each image resized by SCALE, divided by SCALE."""
    gts, dets = [], []
    for name, objects in IMAGES.items():
        gts.append({"boxes": np.array([[b[0] - 1, b[1] - 1, b[2], b[3]] for _, b, _ in objects],
                                      np.float32),
                    "labels": np.array([VOC_CLASSES.index(c) for c, _, _ in objects]),
                    "difficult": np.array([d for _, _, d in objects], bool)})
        image = np.asarray(Image.open(devkit / "VOC2007" / "JPEGImages" / f"{name}.jpg")
                           .convert("RGB"))
        resized, _ = resize(image, np.zeros((0, 4), np.float32), SCALE)
        assert resized.shape[:2] == (96, 115)
        with torch.no_grad():
            d = model(ImageBatch.from_tensors([torch.from_numpy(resized).permute(2, 0, 1)]))
        d = d.detections[0]
        dets.append({"boxes": d.boxes.numpy() / SCALE, "scores": d.scores.numpy(),
                     "labels": d.labels.numpy()})
    return gts, dets


def test_voc07_evaluation_of_a_checkpoint_matches_evaluate_voc_on_its_detections(tmp_path):
    devkit = write_devkit(tmp_path)
    out = tmp_path / "out"
    cfg = load_config(ROOT / "configs" / "frcnn_r18_shapes.yaml", [
        "model.backbone.width=8", "model.roi_head.score_threshold=0.0",
        "data.val.type=voc", f"data.val.root={devkit}", "data.val.splits=[2007/test]",
        "data.min_size_test=96", "data.max_size_test=128", "test.ims_per_batch=2",
        "train.device=cpu", "train.num_workers=0", f"train.output_dir={out}",
        "test.cpu_amp=none", "test.scales=[]"],  # the oracle: one scale, float32
        schema=DetectionConfig)
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=len(VOC_CLASSES)).eval()
    with torch.no_grad():  # untrained, but detecting: boxes = clipped anchors, scores favour
        for layer in (model.rpn.head.bbox_pred, model.roi_head.bbox_pred):  # 3 classes
            layer.weight.zero_()
            layer.bias.zero_()
        bias = model.roi_head.cls_score.bias
        bias.fill_(-2.0)
        bias[[VOC_CLASSES.index(c) for c in ("dog", "person", "cat")]] = 2.0
    weights = tmp_path / "model_final.pth"
    atomic_save({"model": model.state_dict(), "task": "detection", "iteration": 0,
                 "config": to_dict(cfg), "class_names": list(VOC_CLASSES)}, weights)

    metrics = detection.evaluate(cfg, str(weights), metric="voc07", summary_only=False)

    expected = evaluate_voc(*oracle_inputs(model, devkit), list(VOC_CLASSES), metric="voc07")
    assert expected["mAP"] > 0                       # the comparison is not 0 == 0
    assert metrics["mAP"] == pytest.approx(expected["mAP"], abs=1e-3)
    assert set(metrics["per_class"]) == set(VOC_CLASSES)
    for name in VOC_CLASSES:                         # nan where a class has no (easy) box
        assert metrics["per_class"][name] == pytest.approx(expected["per_class"][name],
                                                           abs=1e-3, nan_ok=True), name
    assert math.isnan(metrics["per_class"]["cat"])   # its only box is difficult
    (folder,) = (out / "eval_only").iterdir()          # an evaluation-only run's own folder
    stored = json.loads((folder / "eval" / "metrics.json").read_text())["bbox"]
    assert stored["mAP"] == pytest.approx(metrics["mAP"])
    assert stored["per_class"]["cat"] is None         # nan written as null
    assert stored["per_class"]["dog"] == pytest.approx(metrics["per_class"]["dog"])
