"""Model complexity: parameters and multiply-adds per stage of a classifier or a C4 detector,
counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (shapes only, so a
ResNet-152 detector at 800x1333 costs no arithmetic and no memory).

"FLOPs" are multiply-adds, as the paper counts them (Table 1; Sec 3.3: "3.6 billion FLOPs
(multiply-adds)"); FlopCounterMode counts two operations per multiply-add, so its totals are
halved here. Counted: convolutions and fully-connected layers. Not counted, as in the paper:
normalization, ReLU, pooling, residual additions, and in the detector RoIAlign/RoIPool,
proposal decoding and NMS.

Parameters are the learned weights: ``nn.Parameter`` s and the scale and shift of
``FrozenBatchNorm2d`` (learned in pretraining, kept as buffers), never running statistics.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from detres.config import ConfigError, load_config
from detres.data.builtin import SHAPE_CLASSES
from detres.data.builtin_cls import CLASS_NAMES as BUILTIN_CLS_CLASSES
from detres.models.norm import FrozenBatchNorm2d
from detres.models.resnet import ResNet
from detres.structures import SIZE_DIVISIBILITY
from detres.tasks.common import BackboneConfig, build_backbone
from detres.tasks.detection.build import build_detector
from detres.tasks.classification.config import ClassificationConfig
from detres.tasks.detection.config import DetectionConfig, DetModelConfig

# the class count a dataset type implies when none is given (the weights' count comes from data)
DET_CLASSES = {"coco": 80, "voc": 20, "builtin": len(SHAPE_CLASSES)}
CLS_CLASSES = {"imagefolder": 1000, "cifar10": 10, "builtin": len(BUILTIN_CLS_CLASSES)}
SCHEMAS = {"detection": DetectionConfig, "classification": ClassificationConfig}
# Table 1, "FLOPs" (multiply-adds) at 224x224, in 10^9
TABLE1_GFLOPS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}
PAPER_NAMES = {"layer1": "conv2_x", "layer2": "conv3_x", "layer3": "conv4_x", "layer4": "conv5_x"}


@dataclass(frozen=True)
class Cost:
    """One row: a stage's parameters and multiply-adds (per image, or per region)."""

    name: str
    params: int
    macs: int


def counted(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(multiply-adds of the convolutions and matmuls that ``fn()`` runs, its result)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        result = fn()
    return counter.get_total_flops() // 2, result


def multiply_adds(fn: Callable[[], Any]) -> int:
    """Multiply-adds of the convolutions and matmuls that ``fn()`` runs."""
    return counted(fn)[0]


def num_params(*modules: nn.Module) -> int:
    """Learned weights of ``modules``: parameters plus frozen BatchNorm scale and shift."""
    total = 0
    for module in modules:
        total += sum(p.numel() for p in module.parameters())
        total += sum(m.weight.numel() + m.bias.numel() for m in module.modules()
                     if isinstance(m, FrozenBatchNorm2d))
    return total


def _resnet(cfg: BackboneConfig, num_classes: int | None) -> ResNet:
    """The config's ResNet on the meta device, without its weights file."""
    with torch.device("meta"):
        return build_backbone(dataclasses.replace(cfg, weights=None), num_classes)


def trunk_costs(net: nn.Module, x: torch.Tensor, stages: list[str]
                ) -> tuple[list[Cost], torch.Tensor]:
    """Rows for the stem and ``stages`` of a ResNet (or its C4 trunk) on ``x``; returns the
    rows and the last stage's output (meta)."""
    stem = [net.conv1, net.bn1, net.maxpool]
    macs, x = counted(lambda: net.maxpool(net.relu(net.bn1(net.conv1(x)))))
    rows = [Cost("conv1 (stem)", num_params(*stem), macs)]
    for name in stages:
        stage = getattr(net, name)
        macs, x = counted(lambda: stage(x))
        rows.append(Cost(f"{PAPER_NAMES.get(name, name)} ({name})", num_params(stage), macs))
    return rows, x


def classifier_costs(cfg: BackboneConfig, num_classes: int, size: tuple[int, int]
                     ) -> list[Cost]:
    """Per-stage rows and the total of a ResNet classifier on one ``size`` = (h, w) image."""
    net = _resnet(cfg, num_classes)
    x = torch.empty(1, 3, *size, device="meta")
    rows, features = trunk_costs(net, x, net.stage_names)
    rows.append(Cost(f"avg pool + fc ({num_classes})", num_params(net.fc),
                     multiply_adds(lambda: net.fc(features.mean((2, 3))))))
    return rows + [Cost("total", num_params(net), sum(r.macs for r in rows))]


def padded(size: tuple[int, int]) -> tuple[int, int]:
    """The batch size of one image: each side rounded up as ``ImageBatch`` pads it."""
    return tuple(math.ceil(s / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY for s in size)


def detector_costs(cfg: DetModelConfig, num_classes: int, size: tuple[int, int]
                   ) -> dict[str, list[Cost]]:
    """Rows of a C4 Faster R-CNN on one image of ``size`` = (h, w) (padded as in a batch):
    ``"image"`` (trunk stages and RPN head, once per image), ``"region"`` (conv5_x and the
    box layers, once per RoI) and ``"total"`` (the image plus ``rpn.proposals_test``
    regions, what inference costs when the RPN keeps that many proposals)."""
    plain = dataclasses.replace(cfg, weights=None, channels_last=False,
                                backbone=dataclasses.replace(cfg.backbone, weights=None))
    with torch.device("meta"):
        model = build_detector(plain, num_classes).eval()
    x = torch.empty(1, 3, *padded(size), device="meta")
    rows, features = trunk_costs(model.trunk, x, ["layer1", "layer2", "layer3"])
    head = model.rpn.head
    rows.append(Cost(f"RPN head ({head.cls_logits.out_channels} anchors per cell)",
                     num_params(head), multiply_adds(lambda: head(features))))
    roi = model.roi_head
    s = roi.pooled_size
    pooled = torch.empty(1, features.shape[1], s, s, device="meta")
    macs, res5 = counted(lambda: roi.res5(pooled).mean((2, 3)))
    region = [Cost(f"conv5_x (layer4) on {s}x{s} RoI features", num_params(roi.res5), macs),
              Cost(f"cls + box layers ({num_classes} classes)",
                   num_params(roi.cls_score, roi.bbox_pred),
                   multiply_adds(lambda: (roi.cls_score(res5), roi.bbox_pred(res5))))]
    region.append(Cost("per region", sum(r.params for r in region),
                       sum(r.macs for r in region)))
    image = Cost("per image (trunk + RPN)", sum(r.params for r in rows),
                 sum(r.macs for r in rows))
    n = model.rpn.post_nms_topk_test
    total = Cost(f"total at {n} proposals (image + {n} x region)", num_params(model),
                 image.macs + n * region[-1].macs)
    return {"image": rows + [image], "region": region, "total": [total]}


def _total(cfg: BackboneConfig, size: int = 224) -> tuple[int, int]:
    """(parameters, multiply-adds) of a 1000-class ImageNet ResNet on a size x size image."""
    net = _resnet(cfg, 1000)
    return num_params(net), multiply_adds(lambda: net(torch.empty(1, 3, size, size,
                                                                  device="meta")))


def table1(depths: tuple[int, ...] = tuple(TABLE1_GFLOPS)) -> list[dict[str, Any]]:
    """Multiply-adds of the ImageNet ResNets at 224x224 beside Table 1's figures.

    ``paper_arch``: the paper's nets, stride in the first 1x1 of a bottleneck (the MSRA
    models) and parameter-free shortcuts (option A) for 18/34 layers, which keep the plain
    net's FLOPs (Sec 3.3: the 34-layer baseline's 3.6 billion), projections (option B) where
    dimensions increase for 50/101/152 (Sec 4.1); ``torchvision_arch``: stride in the 3x3 and
    option B throughout, as torchvision's ResNets.
    """
    rows = []
    for depth in depths:
        basic = depth < 50
        paper = BackboneConfig(depth=depth, shortcut="A" if basic else "B", stride_in_1x1=True)
        tv = BackboneConfig(depth=depth, shortcut="B", stride_in_1x1=False)
        (params, macs), (tv_params, tv_macs) = _total(paper), _total(tv)
        rows.append({"depth": depth, "paper_gflops": TABLE1_GFLOPS.get(depth),
                     "paper_arch_gflops": macs / 1e9, "paper_arch_params": params,
                     "torchvision_arch_gflops": tv_macs / 1e9,
                     "torchvision_arch_params": tv_params})
    return rows


def human(n: float) -> str:
    """1234567 -> "1.23 M" (K, M, G: 10^3, 10^6, 10^9)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}  "


def format_rows(rows: list[Cost], indent: str = "") -> str:
    """Aligned text: name, parameters, multiply-adds."""
    return "\n".join(f"{indent}{r.name:<52} {human(r.params):>10} {human(r.macs):>12}"
                     for r in rows)


def load_any_config(path: str | None, overrides: list[str], task: str = "auto"
                    ) -> tuple[str, Any]:
    """(task, config): ``task`` "auto" takes the first schema that reads the file, detection
    then classification; the error of each is shown when none does."""
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{path}: config file does not exist")
    tasks = list(SCHEMAS) if task == "auto" else [task]
    errors = []
    for name in tasks:
        try:
            return name, load_config(path, overrides, schema=SCHEMAS[name])
        except ConfigError as e:
            errors.append(f"as a {name} config: {e}")
    raise ConfigError(" | ".join(errors) + ("" if task != "auto" else
                                            " (localization configs are not counted)"))


def model_costs(task: str, cfg: Any, size: tuple[int, int] | None = None,
                num_classes: int | None = None) -> dict[str, Any]:
    """The rows of a config's model on one image of ``size`` (default: the test scale, 4:3
    landscape for detection; the crop for classification) as ``{"task", "size",
    "num_classes", "parts": {part: [Cost]}}``; ``num_classes`` defaults to what the training
    set's type implies (COCO 80, VOC 20, ImageNet 1000, CIFAR-10 10, built-in sets theirs)."""
    if task == "detection":
        data = cfg.data
        size = size or (data.min_size_test, min(data.max_size_test,
                                                round(data.min_size_test * 4 / 3)))
        num_classes = num_classes or DET_CLASSES[data.train.type]
        parts = detector_costs(cfg.model, num_classes, size)
    else:
        size = size or (cfg.data.crop_size, cfg.data.crop_size)
        num_classes = num_classes or CLS_CLASSES[cfg.data.train.type]
        parts = {"image": classifier_costs(cfg.model.backbone, num_classes, size)}
    return {"task": task, "size": list(size), "num_classes": num_classes, "parts": parts}
