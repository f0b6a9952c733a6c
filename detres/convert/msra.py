"""MSRA's original ImageNet ResNets in Caffe's layout, as detectron2 ships them
(``ImageNetPretrained/MSRA/R-50.pkl``, ``R-101.pkl``; Detectron's ``R-152.pkl``) -> a detres
backbone file.

Caffe names <-> ResNet names (torchvision's, docs/architecture.md, Paper terms):

    conv1_w, res_conv1_bn_{s,b}           conv1.weight, bn1.{weight,bias}
    res{k}_{i}_branch2{a,b,c}_w           layer{k-1}.{i}.conv{1,2,3}.weight
    res{k}_{i}_branch2{a,b,c}_bn_{s,b}    layer{k-1}.{i}.bn{1,2,3}.{weight,bias}
    res{k}_{i}_branch1_w, ..._bn_{s,b}    layer{k-1}.{i}.downsample.{0,1}.*   (projection)
    fc1000_{w,b} or pred_{w,b}            fc.{weight,bias}

The released models store each BatchNorm folded into a per-channel scale ``s`` and shift ``b``
(Caffe's Scale layer: y = s x + b), so the running mean is 0 and the running variance 1 - eps,
which makes BatchNorm compute exactly s x + b. A convolution bias (``conv1_b`` in some files)
is folded into the running mean of the BatchNorm after it. The names do not say where a
bottleneck strides: MSRA's models stride in the first 1x1 (``stride_in_1x1``, the default).
The Caffe model pools after conv1 without padding in ceil mode; detectron2 and detres pool with
padding 1, a one-pixel shift of the pooling windows with which detectron2 uses these weights.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from torch import Tensor

from detres.convert.pickles import ConversionError
from detres.models.norm import FrozenBatchNorm2d
from detres.models.resnet import IMAGENET_DEPTHS, ResNet
from detres.weights_io import WeightsMismatchError, backbone_file, check_state_dict

# detectron2's PIXEL_MEAN for these models (BGR, 0..255); their std is folded into conv1
MSRA_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
MSRA_PIXEL_STD_BGR = (1.0, 1.0, 1.0)
EPS = FrozenBatchNorm2d(1).eps          # 1e-5, also nn.BatchNorm2d's

_BLOCK = re.compile(r"^res([2-5])_(\d+)_branch(1|2a|2b|2c)_(w|b|bn_s|bn_b|bn_rm|bn_riv)$")
_STEM = {"conv1_w": ("conv1", "w"), "conv1_b": ("conv1", "b"),
         "res_conv1_bn_s": ("bn1", "bn_s"), "res_conv1_bn_b": ("bn1", "bn_b"),
         "res_conv1_bn_rm": ("bn1", "bn_rm"), "res_conv1_bn_riv": ("bn1", "bn_riv")}
_FC = {"fc1000_w": "fc.weight", "fc1000_b": "fc.bias", "pred_w": "fc.weight", "pred_b": "fc.bias"}
_BRANCH = {"2a": ("conv1", "bn1"), "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3"),
           "1": ("downsample.0", "downsample.1")}
_BN_SUFFIX = {"bn_s": "weight", "bn_b": "bias", "bn_rm": "running_mean", "bn_riv": "running_var"}


def rename_caffe2(blobs: dict[str, Tensor], path: str) -> dict[str, Tensor]:
    """Caffe names -> ResNet names (see the module docstring); conv biases as ``*.conv_bias``
    entries to fold. Unknown names are an error that lists them."""
    out: dict[str, Tensor] = {}
    unknown = []
    for name, value in blobs.items():
        if name in _FC:
            out[_FC[name]] = value
            continue
        if name in _STEM:
            module, kind = _STEM[name]
        else:
            m = _BLOCK.match(name)
            if m is None:
                unknown.append(name)
                continue
            stage, block, branch, kind = m.groups()
            conv, bn = _BRANCH[branch]
            prefix = f"layer{int(stage) - 1}.{block}."
            module = prefix + (bn if kind.startswith("bn_") else conv)
        suffix = {"w": "weight", "b": "conv_bias"}.get(kind) or _BN_SUFFIX[kind]
        out[f"{module}.{suffix}"] = value
    if unknown:
        raise ConversionError(f"{path}: {len(unknown)} names are not MSRA ResNet blobs "
                              f"(e.g. {', '.join(sorted(unknown)[:4])}); a detection model's "
                              f"file goes through the detectron2 converter")
    return out


def fill_batchnorm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adds the running statistics a Scale-layer BatchNorm lacks (mean 0, variance 1 - eps) and
    folds each convolution bias into the BatchNorm after it: BN(conv x + c) has mean m - c."""
    state = dict(state)
    for key in [k for k in state if k.endswith(".weight") and (
            ".bn" in k or k.startswith("bn1.") or ".downsample.1." in k)]:
        prefix = key[: -len("weight")]
        n = state[key].numel()
        state.setdefault(prefix + "running_mean", torch.zeros(n))
        state.setdefault(prefix + "running_var", torch.full((n,), 1.0 - EPS))
    for key in [k for k in state if k.endswith(".conv_bias")]:
        bias = state.pop(key)
        conv = key[: -len(".conv_bias")]
        bn = (conv.replace("downsample.0", "downsample.1") if "downsample" in conv
              else re.sub(r"conv(\d)$", r"bn\1", conv))
        state[bn + ".running_mean"] = state[bn + ".running_mean"] - bias
    return state


def infer_arch(state: dict[str, Tensor], path: str) -> dict[str, Any]:
    """depth, width and shortcut option from the names and shapes (Table 1 block counts)."""
    if "conv1.weight" not in state:
        raise ConversionError(f"{path}: no conv1_w; not an MSRA ResNet file")
    blocks = [len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")})
              for i in range(1, 5)]
    kind = "bottleneck" if any(".conv3." in k for k in state) else "basic"
    depth = next((d for d, plan in IMAGENET_DEPTHS.items() if plan == (kind, tuple(blocks))), None)
    if depth is None:
        raise ConversionError(f"{path}: {kind} blocks per stage {blocks} match no depth of "
                              f"Table 1 ({', '.join(map(str, IMAGENET_DEPTHS))})")
    projections = sum(1 for k in state if k.endswith("downsample.0.weight"))
    shortcut = "A" if projections == 0 else "C" if projections == sum(blocks) else "B"
    return {"depth": depth, "width": state["conv1.weight"].shape[0], "shortcut": shortcut}


def convert_msra(blobs: dict[str, Tensor], path: str, *, stride_in_1x1: bool = True,
                 input_format: str = "BGR",
                 pixel_mean: Sequence[float] = MSRA_PIXEL_MEAN_BGR,
                 pixel_std: Sequence[float] = MSRA_PIXEL_STD_BGR) -> dict[str, Any]:
    """MSRA blobs -> a backbone file (``weights.backbone_file``) with ``pixel_mean`` /
    ``pixel_std`` (RGB, for ``model.pixel_mean`` or ``data.pixel_mean``) beside it.

    Args:
        blobs: name -> tensor, as ``pickles.read_arrays`` returns.
        path: the source file, for messages.
        stride_in_1x1: where the source's bottlenecks stride (MSRA: the first 1x1).
        input_format: "BGR" reverses conv1's input channels, so the net takes RGB.
        pixel_mean / pixel_std: the source's input normalisation, in ``input_format`` order.
    """
    state = fill_batchnorm(rename_caffe2(blobs, path))
    arch = infer_arch(state, path)
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else None
    net = ResNet(arch["depth"], num_classes=num_classes, shortcut=arch["shortcut"],
                 width=arch["width"], stride_in_1x1=stride_in_1x1)
    if input_format == "BGR":   # conv(x_bgr, w) = conv(x_rgb, w reversed along input channels)
        state["conv1.weight"] = state["conv1.weight"].flip(1)
        pixel_mean, pixel_std = tuple(pixel_mean)[::-1], tuple(pixel_std)[::-1]
    try:
        check_state_dict(net, state, path)
    except WeightsMismatchError as e:
        raise ConversionError(str(e)) from None
    net.load_state_dict(state, strict=False)      # num_batches_tracked keeps its 0
    out = backbone_file(net.state_dict(), net.arch())
    out.update(pixel_mean=[float(v) for v in pixel_mean], pixel_std=[float(v) for v in pixel_std],
               source=f"MSRA Caffe ResNet-{arch['depth']} ({path})")
    return out


def backbone_snippet(backbone: dict[str, Any], weights_path: str, source: str) -> str:
    """The config lines that use a converted backbone file (a detection config fragment)."""
    header = [f"# {source} converted by tools/convert_weights.py: the settings that use it.",
              "# Detection (tools/train_det.py): merge into your config (or pass as key=value).",
              "# Classification (tools/pretrain_cls.py): the same model.backbone keys, and",
              "# data.pixel_mean / data.pixel_std instead of model.pixel_mean / model.pixel_std.",
              "# pixel_mean and pixel_std are RGB on the 0..255 scale."]
    model = {"backbone": {**backbone["arch"], "weights": str(weights_path)},
             "pixel_mean": backbone["pixel_mean"], "pixel_std": backbone["pixel_std"]}
    body = yaml.safe_dump({"model": model}, sort_keys=False, default_flow_style=None)
    return "\n".join(header) + "\n" + body
