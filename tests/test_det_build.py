from pathlib import Path

import pytest
import torch

from detres.config import load_config
from detres.tasks.common import build_backbone, build_optimizer
from detres.tasks.detection import build
from detres.tasks.detection.config import DetectionConfig
from detres.models.faster_rcnn import FasterRCNN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["frcnn_r101_coco", "frcnn_r101_voc0712",
                                  "frcnn_r101_coco_modern", "frcnn_r50_coco", "frcnn_r18_shapes"])
def test_detection_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", schema=DetectionConfig)
    assert cfg.model.backbone.norm in ("frozen_bn", "bn")


def test_paper_coco_preset():
    cfg = load_config(CONFIGS / "frcnn_r101_coco.yaml", schema=DetectionConfig)
    assert cfg.model.roi_head.roi_op == "pool" and cfg.model.rpn.proposals_test == 300
    assert cfg.data.min_size_test == 600 and cfg.data.max_size_test == 1000
    assert cfg.model.anchors.sizes == (64, 128, 256, 512)
    assert cfg.model.backbone.norm == "frozen_bn" and cfg.model.backbone.depth == 101


def test_schedule_scales_with_the_batch():
    cfg = load_config(CONFIGS / "frcnn_r101_coco.yaml", ["solver.ims_per_batch=16"],
                      schema=DetectionConfig)
    scaled = build.scale_schedule(cfg)
    assert scaled.train.max_iter == 160000 and scaled.solver.steps == (120000,)
    assert scaled.train.checkpoint_period == 5000
    model = torch.nn.Linear(2, 2)
    assert build_optimizer(scaled.solver, model).param_groups[0]["lr"] == pytest.approx(0.002)
    same = load_config(CONFIGS / "frcnn_r101_coco.yaml", schema=DetectionConfig)
    assert build.scale_schedule(same) is same


def test_build_detector_from_config_has_the_configured_parts():
    cfg = load_config(CONFIGS / "frcnn_r18_shapes.yaml", ["model.backbone.width=8"],
                      schema=DetectionConfig)
    model = build.build_detector(cfg.model, num_classes=5)
    assert isinstance(model, FasterRCNN) and model.num_classes == 5
    assert model.roi_head.roi_op == "align" and model.roi_head.pooled_size == 7
    assert model.rpn.anchor_generator.num_anchors == 12
    assert model.roi_head.cls_score.out_features == 6


def test_backbone_weights_file_initialises_trunk_and_head(tmp_path):
    cfg = load_config(CONFIGS / "frcnn_r18_shapes.yaml", ["model.backbone.width=8"],
                      schema=DetectionConfig)
    resnet = build_backbone(cfg.model.backbone, num_classes=None)
    torch.save(resnet.state_dict(), tmp_path / "backbone.pth")
    import dataclasses
    model_cfg = dataclasses.replace(cfg.model, backbone=dataclasses.replace(
        cfg.model.backbone, weights=str(tmp_path / "backbone.pth")))
    model = build.build_detector(model_cfg, num_classes=3)
    torch.testing.assert_close(model.trunk.conv1.weight, resnet.conv1.weight)
    torch.testing.assert_close(model.roi_head.res5.layer4[0].conv1.weight,
                               resnet.layer4[0].conv1.weight)
