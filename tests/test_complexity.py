"""Model complexity (detres/complexity.py, tools/model_info.py): multiply-adds and parameters
against hand-computed values, the paper's Table 1 and Table 6, and torchvision's figures."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision
from helpers import NARROW_DETECTOR, load_tool
from torch import nn

from detres.complexity import (classifier_costs, detector_costs, multiply_adds, num_params,
                               padded, table1)
from detres.models.norm import FrozenBatchNorm2d
from detres.tasks.common import BackboneConfig


def test_small_net_hand_computed():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), FrozenBatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x = torch.zeros(2, 3, 32, 32)
    # 16x16 outputs: 8 filters of 3x3x3, then 16 of 1x1x8; the fc 16 -> 10; two images
    assert multiply_adds(lambda: net(x)) == 2 * (16 * 16 * 8 * 27 + 16 * 16 * 16 * 8 + 16 * 10)
    # conv weights + bias, frozen BN scale/shift, BN scale/shift (not running stats), fc
    assert num_params(net) == (8 * 27 + 8) + 2 * 8 + 16 * 8 + 2 * 16 + (16 * 10 + 10)


def test_cifar_resnet_stages_and_table6_parameters():
    rows = classifier_costs(BackboneConfig(depth=20, stem="cifar", shortcut="A"), 10, (32, 32))
    macs = {r.name.split(" ")[0]: r.macs for r in rows}
    conv3 = 9                                      # a 3x3 kernel; option A adds no work
    assert macs["conv1"] == 32 * 32 * 16 * 3 * conv3
    assert macs["conv2_x"] == 6 * 32 * 32 * 16 * 16 * conv3
    for stage, (c, hw) in {"conv3_x": (32, 16), "conv4_x": (64, 8)}.items():
        assert macs[stage] == hw * hw * c * (c // 2) * conv3 + 5 * hw * hw * c * c * conv3
    assert macs["avg"] == 64 * 10 and macs["total"] == sum(r.macs for r in rows[:-1])
    # Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters
    for depth, paper in {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7}.items():
        cfg = BackboneConfig(depth=depth, stem="cifar", shortcut="A")
        params = classifier_costs(cfg, 10, (32, 32))[-1].params / 1e6
        assert round(params, 2 if depth < 100 else 1) == paper


def test_table1_and_torchvision_figures():
    for row in table1():
        ours = row["paper_arch_gflops"]
        # the paper gives one decimal; ResNet-50's 3.86 is written 3.8 (truncated)
        assert row["paper_gflops"] in (round(ours, 1), math.floor(ours * 10) / 10), row
        weights = torchvision.models.get_model_weights(f"resnet{row['depth']}").IMAGENET1K_V1
        assert row["torchvision_arch_gflops"] == pytest.approx(weights.meta["_ops"], abs=6e-4)
        assert row["torchvision_arch_params"] == weights.meta["num_params"]


def test_detector_costs_hand_computed():
    cfg, k, size = NARROW_DETECTOR, 3, (100, 120)
    parts = detector_costs(cfg, k, size)
    image, region, total = parts["image"], parts["region"], parts["total"][0]
    h, w = padded(size)
    assert (h, w) == (128, 128)
    trunk = classifier_costs(cfg.backbone, k, (h, w))         # the same stages in a ResNet
    assert [r.macs for r in image[:4]] == [r.macs for r in trunk[:4]]
    c, a = 8 * 2 ** 2, len(cfg.anchors.sizes) * len(cfg.anchors.aspect_ratios)  # conv4_x: 32
    assert image[4].macs == (h // 16) * (w // 16) * (c * c * 9 + c * a + c * 4 * a)
    d = 8 * 2 ** 3                                            # conv5_x channels of a basic net
    assert region[1].macs == d * (k + 1) + d * 4 * k
    assert region[1].params == d * (k + 1) + (k + 1) + d * 4 * k + 4 * k
    n = cfg.rpn.proposals_test
    assert total.macs == image[-1].macs + n * region[-1].macs
    assert total.params == image[-1].params + region[-1].params


def test_model_info_tool(tmp_path, capsys, monkeypatch):
    det = tmp_path / "det.yaml"
    det.write_text("model:\n  backbone: {depth: 18, width: 8}\n  rpn: {proposals_test: 40}\n"
                   "data:\n  train: {type: builtin}\n  min_size_test: 96\n  max_size_test: 160\n")
    tool = load_tool("model_info")
    out = tool.main([str(det), "--json", str(tmp_path / "det.json")])
    assert out["size"] == [96, 128] and out["num_classes"] == 5 and out["task"] == "detection"
    saved = json.loads((tmp_path / "det.json").read_text())
    image, region = saved["parts"]["image"][-1], saved["parts"]["region"][-1]
    assert saved["parts"]["total"][0]["multiply_adds"] == (image["multiply_adds"]
                                                          + 40 * region["multiply_adds"])
    text = capsys.readouterr().out
    assert "once per region (RoI)" in text and "total at 40 proposals" in text
    cls = tmp_path / "cls.yaml"
    cls.write_text("model:\n  backbone: {depth: 20, stem: cifar, shortcut: A}\n"
                   "data:\n  train: {type: cifar10}\n  recipe: cifar\n  crop_size: 32\n")
    out = tool.main([str(cls)])
    assert out["task"] == "classification" and out["parts"]["image"][-1]["multiply_adds"] == (
        442368 + 14155776 + 2 * 12976128 + 640)
    assert "40.55 M" in capsys.readouterr().out
    monkeypatch.setattr(tool, "table1", lambda: table1((18,)))   # one depth keeps it quick
    out = tool.main(["--table1"])
    line = capsys.readouterr().out.splitlines()[-1].split()
    assert line[:4] == ["18", "1.8", "1.79", "1.81"] and out["table1"][0]["depth"] == 18
