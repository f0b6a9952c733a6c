"""The converters' test sources (tests/test_convert_weights.py): files in the sources' own key
names and layouts, and small forwards written in those layouts (BGR input minus the mean,
Caffe-style bottlenecks with the stride in the 1x1, BatchNorm as scale and shift, detectron2's
size-major exact anchors and box decoding)."""
from __future__ import annotations

import io
import math
import pickle
import struct

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-5
D2_NAMES = {"2a": "conv1", "2b": "conv2", "2c": "conv3", "1": "shortcut"}


# ----------------------------------------------------------------------------- source files
def resnet_convs(blocks, width, bottleneck):
    """(stage k, block i, branch, (out, in, kh, kw)) of every convolution, Caffe's branches."""
    cin = width
    for k, n in zip(range(2, 6), blocks):
        mid = width * 2 ** (k - 2)
        cout = mid * 4 if bottleneck else mid
        for i in range(n):
            convs = ([("2a", mid, cin, 1), ("2b", mid, mid, 3), ("2c", cout, mid, 1)]
                     if bottleneck else [("2a", mid, cin, 3), ("2b", mid, mid, 3)])
            if i == 0 and (cin != cout or k > 2):
                convs.append(("1", cout, cin, 1))
            for branch, o, c, s in convs:
                yield k, i, branch, (o, c, s, s)
            cin = cout


def randn(g, *shape, std=1.0):
    return (torch.randn(*shape, generator=g) * std).numpy()


def msra_blobs(blocks, width, bottleneck, num_classes, g):
    """Caffe names as in MSRA's R-50.pkl: weights, BatchNorm folded to scale s and shift b."""
    blobs = {"conv1_w": randn(g, width, 3, 7, 7, std=(2 / 147) ** 0.5),
             "conv1_b": randn(g, width, std=0.1),      # some files carry one: folded into BN
             "res_conv1_bn_s": 0.5 + randn(g, width, std=0.1),
             "res_conv1_bn_b": randn(g, width, std=0.1), "res_conv1_bn_s_momentum": np.zeros(1)}
    for k, i, branch, shape in resnet_convs(blocks, width, bottleneck):
        p = f"res{k}_{i}_branch{branch}"
        last = branch in ("2c", "1") or (not bottleneck and branch == "2b")
        blobs[p + "_w"] = randn(g, *shape, std=(2 / np.prod(shape[1:])) ** 0.5)
        blobs[p + "_bn_s"] = (0.3 if last else 1.0) + randn(g, shape[0], std=0.1)
        blobs[p + "_bn_b"] = randn(g, shape[0], std=0.1)
    cout = width * 8 * (4 if bottleneck else 1)
    blobs["fc1000_w"] = randn(g, num_classes, cout, std=0.05)
    blobs["fc1000_b"] = randn(g, num_classes, std=0.05)
    return {k: v.astype(np.float32) for k, v in blobs.items()}


def d2_norm(name, n, g, scale=1.0):
    return {f"{name}.norm.weight": scale + randn(g, n, std=0.1),
            f"{name}.norm.bias": randn(g, n, std=0.1),
            f"{name}.norm.running_mean": randn(g, n, std=0.1),
            f"{name}.norm.running_var": 0.5 + np.abs(randn(g, n))}


def d2_name(k, i, branch):
    stage = f"backbone.res{k}" if k < 5 else "roi_heads.res5"
    return f"{stage}.{i}.{D2_NAMES[branch]}"


def d2_state(width, num_classes, num_anchors, g):
    """detectron2's names for a C4 Faster R-CNN on ResNet-50 of the given width."""
    sd = {"backbone.stem.conv1.weight": randn(g, width, 3, 7, 7, std=(2 / 147) ** 0.5),
          **d2_norm("backbone.stem.conv1", width, g)}
    for k, i, branch, shape in resnet_convs((3, 4, 6, 3), width, True):
        name = d2_name(k, i, branch)
        sd[name + ".weight"] = randn(g, *shape, std=(2 / np.prod(shape[1:])) ** 0.5)
        sd.update(d2_norm(name, shape[0], g, 0.3 if branch in ("2c", "1") else 1.0))
    c4, c5, rpn = width * 16, width * 32, "proposal_generator.rpn_head."
    sd.update({rpn + "conv.weight": randn(g, c4, c4, 3, 3, std=0.02),
               rpn + "conv.bias": randn(g, c4, std=0.01),
               rpn + "objectness_logits.weight": randn(g, num_anchors, c4, 1, 1, std=0.05),
               rpn + "objectness_logits.bias": randn(g, num_anchors, std=0.1),
               rpn + "anchor_deltas.weight": randn(g, 4 * num_anchors, c4, 1, 1, std=0.02),
               rpn + "anchor_deltas.bias": randn(g, 4 * num_anchors, std=0.1),
               "roi_heads.box_predictor.cls_score.weight": randn(g, num_classes + 1, c5, std=0.05),
               "roi_heads.box_predictor.cls_score.bias": randn(g, num_classes + 1, std=0.1),
               "roi_heads.box_predictor.bbox_pred.weight": randn(g, 4 * num_classes, c5, std=0.05),
               "roi_heads.box_predictor.bbox_pred.bias": randn(g, 4 * num_classes, std=0.1)})
    return {k: v.astype(np.float32) for k, v in sd.items()}


class Py2Pickler(pickle._Pickler):
    """Writes strings and bytes as Python 2 ``str`` (BINSTRING), as the Caffe-era files are."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def write_py2_pickle(path, obj):
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    # Python 2's numpy lived in numpy.core (numpy 2: numpy._core)
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.", b"numpy.core."))


# ----------------------------------------------------------------------------- references
class Source:
    """Weights by the source's names: ``conv(x, k, i, branch, stride, pad)`` and ``norm``."""

    def __init__(self, arrays, fmt):
        self.w = {k: torch.from_numpy(v) for k, v in arrays.items()}
        self.fmt = fmt

    def name(self, k, i, branch):
        if self.fmt == "msra":
            return "conv1" if k == 1 else f"res{k}_{i}_branch{branch}"
        return "backbone.stem.conv1" if k == 1 else d2_name(k, i, branch)

    def has(self, k, i, branch):
        return any(n.startswith(self.name(k, i, branch)) for n in self.w)

    def conv(self, x, k, i, branch, stride, pad):
        sep = "_" if self.fmt == "msra" else "."
        name = self.name(k, i, branch)
        bias = self.w.get(name + "_b") if self.fmt == "msra" else None
        return F.conv2d(x, self.w[name + sep + ("w" if self.fmt == "msra" else "weight")],
                        bias, stride, pad)

    def norm(self, x, k, i, branch):
        if self.fmt == "msra":     # Caffe's BatchNorm + Scale, folded: s x + b
            name = "res_conv1_bn" if k == 1 else self.name(k, i, branch) + "_bn"
            return x * self.w[name + "_s"].view(-1, 1, 1) + self.w[name + "_b"].view(-1, 1, 1)
        p = self.name(k, i, branch) + ".norm."
        scale = self.w[p + "weight"] / torch.sqrt(self.w[p + "running_var"] + EPS)
        return ((x - self.w[p + "running_mean"].view(-1, 1, 1)) * scale.view(-1, 1, 1)
                + self.w[p + "bias"].view(-1, 1, 1))


def ref_block(src, x, k, i, stride, bottleneck):
    """A residual block with the stride in the first 1x1 (MSRA, detectron2 STRIDE_IN_1X1)."""
    if bottleneck:
        y = F.relu(src.norm(src.conv(x, k, i, "2a", stride, 0), k, i, "2a"))
        y = F.relu(src.norm(src.conv(y, k, i, "2b", 1, 1), k, i, "2b"))
        y = src.norm(src.conv(y, k, i, "2c", 1, 0), k, i, "2c")
    else:
        y = F.relu(src.norm(src.conv(x, k, i, "2a", stride, 1), k, i, "2a"))
        y = src.norm(src.conv(y, k, i, "2b", 1, 1), k, i, "2b")
    shortcut = src.norm(src.conv(x, k, i, "1", stride, 0), k, i, "1") if src.has(k, i, "1") else x
    return F.relu(y + shortcut)


def ref_resnet(src, x, blocks, bottleneck, stages=(2, 3, 4, 5)):
    """Stem (7x7/2, max pool 3/2 with padding 1 as detectron2 runs it) and the given stages."""
    x = F.max_pool2d(F.relu(src.norm(src.conv(x, 1, 0, "", 2, 3), 1, 0, "")), 3, 2, 1)
    return ref_stages(src, x, blocks, bottleneck, stages)


def ref_stages(src, x, blocks, bottleneck, stages):
    for k in stages:
        for i in range(blocks[k - 2]):
            x = ref_block(src, x, k, i, 2 if (i == 0 and k > 2) else 1, bottleneck)
    return x


def d2_anchors(sizes, ratios, height, width, stride=16, offset=0.0):
    """detectron2's DefaultAnchorGenerator: size-major, w = sqrt(s^2 / r), cell (y, x) centred
    at ((x + offset) * stride, (y + offset) * stride)."""
    cell = []
    for s in sizes:
        for r in ratios:
            w = math.sqrt(s * s / r)
            cell.append([-w / 2, -r * w / 2, w / 2, r * w / 2])
    ys, xs = torch.meshgrid(torch.arange(height) * float(stride),
                            torch.arange(width) * float(stride), indexing="ij")
    shifts = torch.stack((xs, ys, xs, ys), -1).view(height, width, 1, 4) + offset * stride
    return shifts.double() + torch.tensor(cell, dtype=torch.float64)   # (H, W, A, 4)


def d2_apply_deltas(deltas, boxes, weights):
    """detectron2's Box2BoxTransform.apply_deltas (float64 here)."""
    w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cx, cy = boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h
    dx, dy = deltas[..., 0] / weights[0], deltas[..., 1] / weights[1]
    dw = (deltas[..., 2] / weights[2]).clamp(max=math.log(1000 / 16))
    dh = (deltas[..., 3] / weights[3]).clamp(max=math.log(1000 / 16))
    px, py, pw, ph = dx * w + cx, dy * h + cy, torch.exp(dw) * w, torch.exp(dh) * h
    return torch.stack((px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2), -1)
