"""detectron2's C4 Faster R-CNN (``GeneralizedRCNN`` + ``StandardRPNHead`` + ``Res5ROIHeads``,
e.g. the model zoo's R101-C4 3x, 41.1 box AP) -> a detres detection checkpoint and config.

Names (detectron2 -> detres; blocks i, convs j):

    backbone.stem.conv1[.norm].*               trunk.conv1.weight, trunk.bn1.*
    backbone.res{k}.{i}.conv{j}[.norm].*       trunk.layer{k-1}.{i}.conv{j}, .bn{j}    k = 2..4
    backbone.res{k}.{i}.shortcut[.norm].*      trunk.layer{k-1}.{i}.downsample.{0,1}
    roi_heads.res5.{i}.*                       roi_head.res5.layer4.{i}.*   (conv5_x per RoI)
    proposal_generator.rpn_head.conv           rpn.head.conv
    ...rpn_head.objectness_logits              rpn.head.cls_logits    anchors reordered
    ...rpn_head.anchor_deltas                  rpn.head.bbox_pred     reordered, re-parameterised
    roi_heads.box_predictor.cls_score          roi_head.cls_score     background last in both
    roi_heads.box_predictor.bbox_pred          roi_head.bbox_pred     (K, 4) rows in both

What differs, and how the conversion keeps the function exact:
- anchors: detectron2 orders a cell's anchors size-major and keeps exact sizes; detres orders
  them ratio-major and rounds them to whole pixels (models/anchors.py). The RPN's outputs are
  permuted, and the delta layer is re-parameterised per anchor so that detres's decode of its
  anchor gives the box detectron2 decodes from its own: dx' = dx * w/w' + (x - x')/w',
  dw' = dw + log(w/w') (same for y, h), an affine map folded into the 1x1 conv. It differs only
  where dw reaches the decode clamp, log(1000/16), for boxes over 60 times their anchor;
- input: detectron2's MSRA-initialised models take BGR; conv1's input channels and the pixel
  mean are reversed so the detector takes RGB (model.pixel_mean, no new config key);
- box coder weights: (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for the RoI head in both; the
  box layer is rescaled if ``roi_head.BOX_WEIGHTS`` ever differs.
Left as they are (not weights): detres pads a batch to a multiple of 32 (detectron2's C4 does
not pad a single image), which changes features near the bottom and right border of images of
other sizes, and it drops empty boxes before the final NMS; images are resized with OpenCV,
detectron2 with PIL, so pixels differ slightly after resizing.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from detres.boxes import centre_size
from detres.config import from_dict, to_dict
from detres.convert.categories import class_list
from detres.convert.pickles import ConversionError
from detres.models.anchors import cell_anchors
from detres.models.resnet import IMAGENET_DEPTHS
from detres.models.roi_head import BOX_WEIGHTS
from detres.weights_io import WeightsMismatchError, check_state_dict
from detres.tasks.detection.build import build_detector, describe_detector
from detres.tasks.detection.config import DetectionConfig

# detectron2's defaults (config/defaults.py) for its C4 models
D2_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
D2_PIXEL_STD_BGR = (1.0, 1.0, 1.0)
D2_ANCHOR_SIZES = (32.0, 64.0, 128.0, 256.0, 512.0)
D2_ASPECT_RATIOS = (0.5, 1.0, 2.0)
D2_RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
D2_ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)      # detres's RPN decodes with boxes.decode's default
STRIDE = 16                                  # conv4_x

_BLOCK = re.compile(r"^(?:backbone\.res([2-4])|roi_heads\.res5)\.(\d+)\."
                    r"(conv[123]|shortcut)(\.norm)?\.(\w+)$")
_STEM = re.compile(r"^backbone\.stem\.conv1(\.norm)?\.(\w+)$")
_HEADS = {"proposal_generator.rpn_head.conv": "rpn.head.conv",
          "proposal_generator.rpn_head.objectness_logits": "rpn.head.cls_logits",
          "proposal_generator.rpn_head.anchor_deltas": "rpn.head.bbox_pred",
          "roi_heads.box_predictor.cls_score": "roi_head.cls_score",
          "roi_heads.box_predictor.bbox_pred": "roi_head.bbox_pred"}
# present in some files, no weights of the box detector: left out
_SKIPPED = ("pixel_mean", "pixel_std", "proposal_generator.anchor_generator.",
            "roi_heads.mask_head.")


def _block_key(m: re.Match) -> str:
    stage, block, conv, norm, param = m.groups()
    prefix = f"trunk.layer{int(stage) - 1}." if stage else "roi_head.res5.layer4."
    if conv == "shortcut":
        return f"{prefix}{block}.downsample.{1 if norm else 0}.{param}"
    return f"{prefix}{block}.{conv.replace('conv', 'bn') if norm else conv}.{param}"


def rename_detectron2(arrays: dict[str, Tensor], path: str
                      ) -> tuple[dict[str, Tensor], list[str]]:
    """detectron2 names -> detres names; returns (state, names left out). Names of another
    layout (FPN, a box head of fc layers, Caffe2 blobs) are an error that lists some."""
    state, skipped, unknown = {}, [], []
    for name, value in arrays.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith(_SKIPPED):
            skipped.append(name)
        elif (m := _STEM.match(name)) is not None:
            state[f"trunk.{'bn1' if m.group(1) else 'conv1'}.{m.group(2)}"] = value
        elif (m := _BLOCK.match(name)) is not None:
            state[_block_key(m)] = value
        elif name.rpartition(".")[0] in _HEADS:
            module, _, param = name.rpartition(".")
            state[f"{_HEADS[module]}.{param}"] = value
        else:
            unknown.append(name)
    if unknown:
        raise ConversionError(
            f"{path}: {len(unknown)} names are not those of a detectron2 C4 Faster R-CNN "
            f"(e.g. {', '.join(sorted(unknown)[:4])}); detres converts the C4 layout "
            f"(Res5ROIHeads) only")
    return state, skipped


def infer_layout(state: dict[str, Tensor], path: str) -> dict[str, int]:
    """depth, width, classes K, anchors per cell A and RPN conv channels from the shapes."""
    need = ("trunk.conv1.weight", "rpn.head.conv.weight", "rpn.head.cls_logits.weight",
            "roi_head.cls_score.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise ConversionError(f"{path}: no {missing[0]}; not a detectron2 C4 Faster R-CNN")
    blocks = tuple(len({k.split(".")[2] for k in state if k.startswith(f"trunk.layer{i}.")})
                   for i in (1, 2, 3)) + (
        len({k.split(".")[3] for k in state if k.startswith("roi_head.res5.layer4.")}),)
    depth = next((d for d, plan in IMAGENET_DEPTHS.items()
                  if plan == ("bottleneck", blocks)), None)
    if depth is None:
        raise ConversionError(f"{path}: bottleneck blocks per stage {list(blocks)} match no "
                              f"depth of Table 1")
    return {"depth": depth, "width": state["trunk.conv1.weight"].shape[0],
            "num_classes": state["roi_head.cls_score.weight"].shape[0] - 1,
            "num_anchors": state["rpn.head.cls_logits.weight"].shape[0],
            "rpn_channels": state["rpn.head.conv.weight"].shape[0],
            "trunk_channels": state["rpn.head.conv.weight"].shape[1]}


def d2_cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """detectron2's cell anchors: (A, 4) xyxy, size-major, exact sizes (w = s / sqrt(r))."""
    boxes = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            boxes.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(boxes, dtype=torch.float64)


def adapt_rpn(state: dict[str, Tensor], sizes: Sequence[float], aspect_ratios: Sequence[float],
              offset: float = 0.0) -> float:
    """Reorders the RPN's per-anchor outputs to detres's anchor order and folds the difference
    of the anchors into the delta layer (module docstring); in place. Returns the largest
    change of an anchor coordinate, in pixels."""
    n_sizes, n_ratios = len(sizes), len(aspect_ratios)
    num = n_sizes * n_ratios
    if state["rpn.head.cls_logits.weight"].shape[0] != num:
        raise ConversionError(
            f"the RPN predicts {state['rpn.head.cls_logits.weight'].shape[0]} anchors per cell "
            f"but {len(sizes)} sizes x {len(aspect_ratios)} aspect ratios make {num}; pass the "
            f"model's --anchor-sizes and --aspect-ratios")
    # detres's anchor j is (ratio j // S, size j % S) (models/anchors.py); detectron2's s*R + r
    src = torch.tensor([(j % n_sizes) * n_ratios + j // n_sizes for j in range(num)])
    theirs = d2_cell_anchors(sizes, aspect_ratios)[src] + offset * STRIDE
    ours = cell_anchors(sizes, aspect_ratios).double()
    if (ours - theirs).abs().max() > 0.5 + 1e-4 + offset * STRIDE:   # rounding only
        raise RuntimeError("detres's anchor order is not the documented ratio-major one")
    tx, ty, tw, th = centre_size(theirs)
    ox, oy, ow, oh = centre_size(ours)
    for param in ("weight", "bias"):
        key = f"rpn.head.cls_logits.{param}"
        state[key] = state[key][src]
    weight = state["rpn.head.bbox_pred.weight"].double()
    weight = weight.reshape(num, 4, *weight.shape[1:])[src]
    bias = state["rpn.head.bbox_pred.bias"].double().view(num, 4)[src]
    wd, wo = D2_RPN_BOX_WEIGHTS, RPN_BOX_WEIGHTS
    scale = torch.stack((tw / ow * wo[0] / wd[0], th / oh * wo[1] / wd[1],
                         torch.full_like(tw, wo[2] / wd[2]), torch.full_like(th, wo[3] / wd[3])),
                        dim=1)                                       # (A, 4)
    shift = torch.stack((wo[0] * (tx - ox) / ow, wo[1] * (ty - oy) / oh,
                         wo[2] * torch.log(tw / ow), wo[3] * torch.log(th / oh)), dim=1)
    weight = weight * scale.view(num, 4, *([1] * (weight.dim() - 2)))
    bias = bias * scale + shift
    state["rpn.head.bbox_pred.weight"] = weight.reshape(num * 4, *weight.shape[2:]).float()
    state["rpn.head.bbox_pred.bias"] = bias.reshape(-1).float()
    return float((ours - theirs).abs().max())


def adapt_box_predictor(state: dict[str, Tensor], num_classes: int) -> None:
    """Class-agnostic deltas (4 rows) repeated per class; deltas rescaled from detectron2's
    box weights to detres's (identical today: a no-op); in place."""
    weight, bias = state["roi_head.bbox_pred.weight"], state["roi_head.bbox_pred.bias"]
    if weight.shape[0] == 4:
        weight, bias = weight.repeat(num_classes, 1), bias.repeat(num_classes)
    scale = torch.tensor(BOX_WEIGHTS) / torch.tensor(D2_ROI_BOX_WEIGHTS)
    state["roi_head.bbox_pred.weight"] = (weight.view(-1, 4, weight.shape[1])
                                          * scale.view(1, 4, 1)).reshape(weight.shape)
    state["roi_head.bbox_pred.bias"] = (bias.view(-1, 4) * scale).reshape(-1)


def detectron2_settings(layout: dict[str, int], *, stride_in_1x1: bool,
                         pixel_mean: Sequence[float], pixel_std: Sequence[float],
                         anchor_sizes: Sequence[float], aspect_ratios: Sequence[float],
                         output_dir: str) -> dict[str, Any]:
    """The config values of detectron2's C4 defaults (config/defaults.py, its
    Base-RCNN-C4.yaml) that differ from, or must be pinned over, the detection schema's
    defaults, as a nested dict; pixel values RGB."""
    model = {
        "backbone.depth": layout["depth"], "backbone.width": layout["width"],
        "backbone.stride_in_1x1": stride_in_1x1, "backbone.shortcut": "B",
        "backbone.norm": "frozen_bn", "backbone.freeze_at": 2, "backbone.weights": None,
        "anchors.sizes": list(anchor_sizes), "anchors.aspect_ratios": list(aspect_ratios),
        "rpn.pre_nms_topk_train": 12000, "rpn.pre_nms_topk_test": 6000,
        "rpn.proposals_train": 2000, "rpn.proposals_test": 1000, "rpn.nms_threshold": 0.7,
        "rpn.iou_thresholds": [0.3, 0.7], "rpn.batch_size_per_image": 256,
        "rpn.positive_fraction": 0.5, "rpn.box_loss": "l1",      # SMOOTH_L1_BETA 0 is L1
        "rpn.min_size": 0.0, "rpn.boundary_threshold": None,    # MIN_SIZE 0, BOUNDARY_THRESH -1
        "rpn.conv_channels": (layout["rpn_channels"]
                              if layout["rpn_channels"] != layout["trunk_channels"] else None),
        "roi_head.roi_op": "align", "roi_head.pooled_size": 14,   # ROIAlignV2
        "roi_head.sampling_ratio": 0, "roi_head.aligned": True,
        "roi_head.batch_size_per_image": 512, "roi_head.positive_fraction": 0.25,
        "roi_head.fg_iou_threshold": 0.5, "roi_head.box_loss": "l1",
        "roi_head.score_threshold": 0.05, "roi_head.nms_threshold": 0.5,
        "roi_head.detections_per_image": 100, "weights": None,
        "pixel_mean": [float(v) for v in pixel_mean], "pixel_std": [float(v) for v in pixel_std]}
    rest = {"data.train.type": "coco", "data.train.splits": ["train"],
            "data.val.type": "coco", "data.val.splits": ["val"],
            "data.min_size_train": [640, 672, 704, 736, 768, 800], "data.max_size_train": 1333,
            "data.min_size_test": 800, "data.max_size_test": 1333,
            "test.ims_per_batch": 1, "test.metric": "coco",     # one image: no batch padding
            "solver.base_lr": 0.02, "solver.ims_per_batch": 16, "solver.reference_batch": 16,
            "solver.steps": [60000, 80000], "solver.warmup_iters": 1000,
            "solver.warmup_factor": 0.001, "train.max_iter": 90000,
            "train.output_dir": output_dir}
    settings = {**{f"model.{k}": v for k, v in model.items()}, **rest}
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def input_convention(state: dict[str, Tensor], arrays: dict[str, Tensor], input_format: str,
                     pixel_mean: Sequence[float] | None, pixel_std: Sequence[float] | None
                     ) -> tuple[list[float], list[float], list[str]]:
    """RGB pixel mean and std for the converted model (given ones, else the file's, else
    detectron2's defaults, all in ``input_format`` order); a BGR model's conv1 takes RGB after
    its input channels are reversed, in place. Returns (mean, std, report lines)."""
    mean = pixel_mean or (arrays["pixel_mean"].flatten().tolist() if "pixel_mean" in arrays
                          else D2_PIXEL_MEAN_BGR)
    std = pixel_std or (arrays["pixel_std"].flatten().tolist() if "pixel_std" in arrays
                        else D2_PIXEL_STD_BGR)
    lines = []
    if input_format == "BGR":   # conv(x_bgr, w) = conv(x_rgb, w reversed along input channels)
        state["trunk.conv1.weight"] = state["trunk.conv1.weight"].flip(1)
        mean, std = list(mean)[::-1], list(std)[::-1]
        lines.append("input: BGR -> RGB (conv1's input channels reversed)")
    lines.append(f"pixel_mean (RGB) {[round(v, 3) for v in mean]}, pixel_std "
                 f"{[round(v, 3) for v in std]}")
    return [float(v) for v in mean], [float(v) for v in std], lines


def convert_detectron2(arrays: dict[str, Tensor], path: str, *,
                       categories: str | None = None, class_names: Sequence[str] | None = None,
                       stride_in_1x1: bool = True, input_format: str = "BGR",
                       pixel_mean: Sequence[float] | None = None,
                       pixel_std: Sequence[float] | None = None,
                       anchor_sizes: Sequence[float] = D2_ANCHOR_SIZES,
                       aspect_ratios: Sequence[float] = D2_ASPECT_RATIOS,
                       anchor_offset: float = 0.0, output_dir: str = "output/converted"
                       ) -> tuple[dict[str, Any], DetectionConfig, list[str]]:
    """detectron2 C4 weights -> (detres detection checkpoint, its config, report lines).

    Args:
        arrays: the file's named arrays (``pickles.read_arrays``).
        path: the source file, for messages.
        categories / class_names: where the class names come from (``categories.class_list``).
        stride_in_1x1: the model's RESNETS.STRIDE_IN_1X1 (true for MSRA-initialised models).
        input_format: the model's INPUT.FORMAT; "BGR" reverses conv1's input channels.
        pixel_mean / pixel_std: the model's PIXEL_MEAN / PIXEL_STD in ``input_format`` order;
            None takes the file's own (``.pth`` files may store them) or detectron2's defaults.
        anchor_sizes / aspect_ratios / anchor_offset: the model's ANCHOR_GENERATOR settings.
        output_dir: ``train.output_dir`` of the written config.
    """
    state, skipped = rename_detectron2(arrays, path)
    layout = infer_layout(state, path)
    k = layout["num_classes"]
    names, ids = class_list(k, categories, class_names)
    report = [f"detectron2 C4 Faster R-CNN, ResNet-{layout['depth']} (width {layout['width']}, "
              f"stride in the {'1x1' if stride_in_1x1 else '3x3'}), {k} classes, "
              f"{layout['num_anchors']} anchors per cell"]
    mean, std, lines = input_convention(state, arrays, input_format, pixel_mean, pixel_std)
    report += lines
    moved = adapt_rpn(state, anchor_sizes, aspect_ratios, anchor_offset)
    report.append(f"RPN: anchors reordered size-major -> ratio-major; deltas re-parameterised "
                  f"for detres's whole-pixel anchors (anchors moved up to {moved:.2f} px)")
    adapt_box_predictor(state, k)
    if skipped:
        report.append(f"left out {len(skipped)} entries that are no box-detector weights "
                      f"(e.g. {skipped[0]})")
    values = detectron2_settings(layout, stride_in_1x1=stride_in_1x1, pixel_mean=mean,
                                 pixel_std=std, anchor_sizes=anchor_sizes,
                                 aspect_ratios=aspect_ratios, output_dir=output_dir)
    cfg = from_dict(values, DetectionConfig, source=f"{path} (converted)")
    model = build_detector(cfg.model, k)
    state.update(pixel_mean=model.pixel_mean, pixel_std=model.pixel_std)   # set from the config
    try:
        check_state_dict(model, state, path)
    except WeightsMismatchError as e:
        raise ConversionError(str(e)) from None
    model.load_state_dict(state, strict=False)      # num_batches_tracked keeps its 0
    checkpoint = {"model": {n: t.contiguous() for n, t in model.state_dict().items()},
                  "task": "detection", "arch": describe_detector(cfg.model, k),
                  "config": to_dict(cfg), "class_names": names, "category_ids": ids,
                  "source": f"detectron2 ({path})"}
    return checkpoint, cfg, report
