from pathlib import Path

import numpy as np
import pytest
import torch

from detres.config import load_config
from detres.config import replace as replace_config
from detres.data.transforms import eval_transform
from detres.models.norm import FrozenBatchNorm2d
from detres.tasks.common import build_backbone
from detres.tasks.detection import build
from detres.tasks.detection.config import DetectionConfig
from detres.models.faster_rcnn import FasterRCNN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["frcnn_r101_coco", "frcnn_r101_voc0712",
                                  "frcnn_r101_coco_modern", "frcnn_r50_coco", "frcnn_r18_shapes"])
def test_detection_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml", schema=DetectionConfig)
    assert cfg.model.backbone.norm in ("frozen_bn", "bn")


def test_paper_coco_preset_reaches_the_built_model():
    """What the paper's COCO preset builds (Appendix A), read off the model, not the YAML."""
    cfg = load_config(CONFIGS / "frcnn_r101_coco.yaml", ["model.backbone.width=8",
                                                         "model.backbone.depth=18",
                                                         "model.backbone.weights=null"],
                      schema=DetectionConfig)
    model = build.build_detector(cfg.model, num_classes=4)
    assert model.rpn.post_nms_topk_test == 300             # 300 proposals at test time
    assert model.roi_head.roi_op == "pool" and model.roi_head.pooled_size == 14
    assert model.rpn.anchor_generator.sizes == (64.0, 128.0, 256.0, 512.0)
    assert model.rpn.anchor_generator.num_anchors == 12 and model.rpn.anchor_generator.stride == 16
    norms = [m for m in model.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    # smooth-L1 with the classic transitions: 1/9 in the RPN (sigma 3), 1 in Fast R-CNN
    assert model.rpn.box_loss == "smooth_l1" and model.rpn.smooth_l1_beta == pytest.approx(1 / 9)
    assert model.roi_head.box_loss == "smooth_l1" and model.roi_head.smooth_l1_beta == 1.0
    # the stem and res2 are frozen (freeze_at 2), conv4_x trains
    assert not model.trunk.conv1.weight.requires_grad
    assert all(p.requires_grad for p in model.trunk.layer3.parameters())
    # the resize settings reach the test transform's output
    image = np.zeros((300, 450, 3), np.uint8)
    out = eval_transform(cfg.data.min_size_test, cfg.data.max_size_test)(
        image, np.zeros((0, 4), np.float32), np.zeros((0,), np.int64))
    assert out.image.shape[:2] == (600, 900) and out.scale == pytest.approx(2.0)


def test_build_detector_from_config_has_the_configured_parts():
    cfg = load_config(CONFIGS / "frcnn_r18_shapes.yaml", ["model.backbone.width=8"],
                      schema=DetectionConfig)
    model = build.build_detector(cfg.model, num_classes=5)
    assert isinstance(model, FasterRCNN) and model.num_classes == 5
    assert model.roi_head.roi_op == "align" and model.roi_head.pooled_size == 7
    assert model.rpn.anchor_generator.sizes == (32.0, 64.0, 128.0, 256.0)
    assert model.rpn.anchor_generator.num_anchors == 12
    assert model.rpn.head.cls_logits.out_channels == 12
    assert model.rpn.head.bbox_pred.out_channels == 48
    assert (model.rpn.post_nms_topk_train, model.rpn.post_nms_topk_test) == (256, 100)
    assert (model.rpn.pre_nms_topk_train, model.rpn.pre_nms_topk_test) == (1000, 1000)
    assert model.roi_head.batch_size_per_image == 32
    assert model.rpn.box_loss == "l1" and model.roi_head.box_loss == "l1"
    assert model.roi_head.cls_score.out_features == 6          # K + background
    assert model.roi_head.bbox_pred.out_features == 20         # 4 per foreground class
    # norm: bn (trained from scratch) reaches the trunk as ordinary BatchNorm
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.trunk.modules())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    # channels_last (the default) converts the 4-d weights
    assert model.channels_last
    assert model.trunk.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.roi_head.res5.layer4[0].conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    plain = build.build_detector(replace_config(cfg.model, ["channels_last=false"]), 5)
    assert not plain.channels_last and plain.trunk.conv1.weight.is_contiguous()


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
