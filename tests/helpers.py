"""Helpers shared by several test files (imported as ``helpers``; pytest puts tests/ on the
path). Test files import from here, never from each other."""
from __future__ import annotations

import ast
import contextlib
import copy
import datetime
import io
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import MultiScaleRoIAlign

from detres.config import replace as replace_config
from detres.data.builtin_cls import CLASS_NAMES as CLS_CLASS_NAMES
from detres.data.builtin_cls import render as render_cls
from detres.models.classifier import Classifier
from detres.models.faster_rcnn import FasterRCNN
from detres.models.resnet import ResNet
from detres.tasks.common import BackboneConfig
from detres.tasks.detection.build import build_detector
from detres.tasks.detection.config import (AnchorConfig, DetModelConfig, RoIHeadConfig,
                                           RPNConfig)

ROOT = Path(__file__).resolve().parents[1]

# The narrow test detector: ResNet-18 at width 8, frozen BN, few proposals and RoIs.
NARROW_DETECTOR = DetModelConfig(
    backbone=BackboneConfig(depth=18, width=8, norm="frozen_bn", freeze_at=2),
    anchors=AnchorConfig(sizes=(32.0, 64.0, 128.0)),
    rpn=RPNConfig(pre_nms_topk_train=500, pre_nms_topk_test=300, proposals_train=100,
                  proposals_test=50),
    roi_head=RoIHeadConfig(batch_size_per_image=64))


def narrow_detector(*overrides: str, num_classes: int = 3, seed: int | None = 0,
                    base: DetModelConfig = NARROW_DETECTOR) -> FasterRCNN:
    """The detector the tools build (``build_detector``) from ``base`` with ``model.``-relative
    ``key=value`` overrides (e.g. ``"roi_head.roi_op=align"``); seeded when ``seed`` is set."""
    if seed is not None:
        torch.manual_seed(seed)
    return build_detector(replace_config(base, list(overrides)), num_classes)


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (its ``main(argv)`` is what the command line runs)."""
    key = f"detres_tool_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "tools" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[key] = module
    return sys.modules[key]


def imported_modules(path: Path) -> set[str]:
    """The modules a source file imports (``TYPE_CHECKING`` imports too), read with ``ast``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def run_tool_script(name: str, *args: str, timeout: float = 120
                    ) -> subprocess.CompletedProcess:
    """``python tools/<name>.py ARGS...`` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout)


def torchvision_twin(model: FasterRCNN, image_size: tuple[int, int]) -> TVFasterRCNN:
    """torchvision's FasterRCNN with ``model``'s weights (deep copies) and settings: the oracle
    of the detector tests (and the baseline of benchmarks/detector_speed.py).

    ``model`` must use RoIAlign with aligned=False (MultiScaleRoIAlign's only mode). Inputs are
    RGB 0..255 batches of ``image_size``; torchvision's resize is disabled.
    """
    rpn, head = model.rpn, model.roi_head
    if head.roi_op != "align" or head.aligned:
        raise ValueError("torchvision's MultiScaleRoIAlign is roi_op='align' with aligned=False")
    num_classes, anchors = head.num_classes, rpn.anchor_generator
    trunk = copy.deepcopy(model.trunk)
    trunk.out_channels = rpn.head.conv.in_channels
    rpn_head = TVRPNHead(rpn.head.conv.in_channels, anchors.num_anchors)
    rpn_head.load_state_dict({"conv.0.0." + k[len("conv."):] if k.startswith("conv.") else k: v
                              for k, v in rpn.head.state_dict().items()})
    d = head.cls_score.in_features
    predictor = FastRCNNPredictor(d, num_classes + 1)
    w, b = head.cls_score.weight.detach(), head.cls_score.bias.detach()
    with torch.no_grad():  # torchvision's background is class 0 and has (unused) deltas
        predictor.cls_score.weight.copy_(torch.cat((w[num_classes:], w[:num_classes])))
        predictor.cls_score.bias.copy_(torch.cat((b[num_classes:], b[:num_classes])))
        predictor.bbox_pred.weight.copy_(torch.cat((torch.zeros_like(w[:4]),
                                                    head.bbox_pred.weight)))
        predictor.bbox_pred.bias.copy_(torch.cat((torch.zeros_like(b[:4]), head.bbox_pred.bias)))
    box_head = nn.Sequential(copy.deepcopy(head.res5), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    tv = TVFasterRCNN(
        trunk, num_classes=None, min_size=min(image_size), max_size=max(image_size),
        image_mean=model.pixel_mean.flatten().tolist(),
        image_std=model.pixel_std.flatten().tolist(),
        rpn_anchor_generator=TVAnchorGenerator((anchors.sizes,), (anchors.aspect_ratios,)),
        rpn_head=rpn_head, rpn_pre_nms_top_n_train=rpn.pre_nms_topk_train,
        rpn_pre_nms_top_n_test=rpn.pre_nms_topk_test,
        rpn_post_nms_top_n_train=rpn.post_nms_topk_train,
        rpn_post_nms_top_n_test=rpn.post_nms_topk_test, rpn_nms_thresh=rpn.nms_threshold,
        rpn_fg_iou_thresh=rpn.matcher.high_threshold, rpn_bg_iou_thresh=rpn.matcher.low_threshold,
        rpn_batch_size_per_image=rpn.batch_size_per_image,
        rpn_positive_fraction=rpn.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], head.pooled_size, head.sampling_ratio),
        box_head=box_head, box_predictor=predictor, box_score_thresh=head.score_threshold,
        box_nms_thresh=head.nms_threshold, box_detections_per_img=head.detections_per_image,
        box_fg_iou_thresh=head.matcher.high_threshold, box_bg_iou_thresh=head.matcher.low_threshold,
        box_batch_size_per_image=head.batch_size_per_image,
        box_positive_fraction=head.positive_fraction, bbox_reg_weights=head.box_weights)
    tv.transform.resize = lambda image, target=None: (image, target)  # inputs are pre-resized
    return tv.to(memory_format=torch.contiguous_format)


def perturbed_results(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered copies of ~85% of the boxes (crowd regions too), false positives, random scores."""
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    results = []
    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy, dw, dh = rng.normal(0, 0.12, 4) * [w, h, w, h]
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [x + dx, y + dy, max(w + dw, 1.0), max(h + dh, 1.0)],
                        "score": float(rng.random())})
    for img in gt["images"]:
        for _ in range(3):
            w, h = rng.uniform(5, 200, 2)
            results.append({"image_id": img["id"], "category_id": int(rng.choice(cat_ids)),
                            "bbox": [float(rng.uniform(0, img["width"] - w)),
                                     float(rng.uniform(0, img["height"] - h)), float(w), float(h)],
                            "score": float(rng.random())})
    return results


class TinyData(Dataset):
    """3 classes told apart by mean brightness; the seed drives a flip (an augmentation)."""

    def __init__(self, n: int = 48, size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 3
        noise = torch.randint(0, 60, (n, 3, size, size), generator=g)
        self.images = (noise + 80 * self.labels.view(-1, 1, 1, 1)).to(torch.uint8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item):
        index, seed = item
        image = self.images[index]
        return (image.flip(-1) if seed % 2 else image), int(self.labels[index])


def tiny_model(norm: str = "bn") -> Classifier:
    net = ResNet(8, stem="cifar", num_classes=3, width=4, norm=norm, gn_groups=2)
    return Classifier(net, (100.0, 100.0, 100.0), (60.0, 60.0, 60.0))


def write_tiny_cls_set(root: Path, num_train: int, num_val: int) -> Path:
    """3 classes x (``num_train`` train, ``num_val`` val) images of the built-in kind, in the
    built-in (ImageFolder) layout under ``root``."""
    for split, n in (("train", num_train), ("val", num_val)):
        for label in range(3):
            folder = root / split / CLS_CLASS_NAMES[label]
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(render_cls(label, 100 * label + i + (0 if split == "train" else 50))
                                ).save(folder / f"{i}.png")
    return root


def tiny_cls_args(root: Path, out: Path, *extra: str, batch: int = 8) -> list[str]:
    """tools/pretrain_cls.py arguments for a tiny CIFAR-style net on ``write_tiny_cls_set``."""
    return [f"data.train.root={root}", f"data.val.root={root}",
            "model.backbone.depth=8", "model.backbone.width=4", f"solver.ims_per_batch={batch}",
            "solver.steps=[]", "solver.warmup_iters=0", "train.device=cpu",
            "train.num_workers=0", "train.log_period=1", "train.checkpoint_period=2",
            "train.eval_period=0", "data.test_ims_per_batch=6", f"train.output_dir={out}", *extra]


def short_cls_run_args(root: Path, out: Path, *extra: str) -> list[str]:
    """:func:`tiny_cls_args` for a 2-iteration run with a checkpoint after each iteration."""
    return tiny_cls_args(root, out, "train.checkpoint_period=1", "train.max_iter=2", *extra,
                         batch=4)


class _FilledGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, value: float) -> torch.Tensor:
        ctx.shape, ctx.value = x.shape, value
        return x.sum() * 0.0

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.full(ctx.shape, ctx.value), None


def bad_gradient(x: torch.Tensor, value: float) -> torch.Tensor:
    """0, to add to a loss: the loss stays finite but the gradient reaching ``x`` is ``value``
    (inf: an fp16 overflow in the backward pass; nan: e.g. a 0 * inf inside a backward)."""
    return _FilledGradient.apply(x, value)


def write_jpeg(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    """A plain JPEG of ``size`` (w, h) at ``path``, its folders made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_gloo_ranks(fn, *args, timeout_s: int = 60) -> None:
    """``fn(rank, world_size, *args)`` in two forked processes joined by a gloo group, as
    torchrun runs two ranks on a CPU; a rank left waiting fails after ``timeout_s``."""
    mp.start_processes(_gloo_rank, args=(fn, free_port(), timeout_s, args), nprocs=2,
                       join=True, start_method="fork")   # fork: no re-import of torch


def _gloo_rank(rank: int, fn, port: int, timeout_s: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, 2, *args)
    finally:
        dist.destroy_process_group()


def builtin_shapes_cache(tmp_path_factory, num_train: int, num_val: int) -> Path:
    """A cache folder (DETRES_CACHE) holding the built-in shapes set of 64 px images."""
    from detres.data.builtin import ensure_builtin_shapes
    root = tmp_path_factory.mktemp("cache")
    ensure_builtin_shapes(root, num_train=num_train, num_val=num_val, image_size=64)
    return root


def pycocotools_direct(gt: dict, results: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The reference: pycocotools on its own copies; (12,) stats in percent, precision array."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats[:12])
    return np.where(stats >= 0, stats * 100, np.nan), evaluator.eval["precision"]
