"""The detector's inference graph as one traceable module, and its export to TorchScript / ONNX.

``FasterRCNN.forward`` takes an ``ImageBatch`` and returns Python lists of ``Detections``; its
proposal and detection steps loop over images with Python ints (image sizes, per-image RoI
counts) and pool RoIs on CPU with an embedding-bag kernel, none of which a tracer can keep
dynamic. ``ExportableDetector`` composes the same parts for one image, writing every
shape-dependent quantity (padding, anchor grid, clipping limits, top-k) as tensor arithmetic on
the input's shape, so one trace serves every image size:

    image (3, H, W) float32 RGB 0..255, already resized (data.min_size_test / max_size_test),
    and scale (0-d float32, resized / original)
      -> normalize, zero-pad to a multiple of 32 -> trunk -> RPN head -> anchors, decode, clip,
         NMS (Ren et al. 2015, 3.3) -> RoI pool/align -> conv5_x -> average pool -> cls, box
         (He et al. 2015, Appendix A) -> softmax, decode, clip, threshold, per-class NMS, top-D
      -> boxes (D, 4) xyxy in the input's pixels, scores (D,), labels (D,) int64 in 0..K-1

Tracing (``torch.jit.trace``, and ``torch.onnx.export``'s TorchScript path, which traces the
same way) rather than scripting: the TorchScript compiler rejects the ResNet trunk (its CPU
bf16 check calls ``torch.is_autocast_enabled("cpu")``), and once shapes are tensors there is no
data-dependent Python control flow left to script. Data-dependent sizes (boxes left after a
threshold or NMS) are ordinary ops (nonzero, NMS) in the graph. Not ``torch.export``: its ONNX
path needs the onnxscript package, and each data-dependent size would need declared bounds.
Tracing runs under ``torch.no_grad``, so the trunk's eval-time paths are the ones recorded.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, nms, roi_align, roi_pool

from detres import boxes as box_ops
from detres.models.faster_rcnn import FasterRCNN
from detres.structures import SIZE_DIVISIBILITY, ImageBatch

ExportFormat = Literal["torchscript", "onnx"]
INPUT_NAMES = ("image", "scale")
OUTPUT_NAMES = ("boxes", "scores", "labels")
ONNX_OPSET = 17   # RoiAlign with half-pixel ("aligned") coordinates needs opset 16


class ExportableDetector(nn.Module):
    """One image in, its detections out, with ``model``'s weights and settings (in eval mode).

    Args:
        model: a FasterRCNN; it is deep-copied and switched to the contiguous (NCHW) layout.
    """

    def __init__(self, model: FasterRCNN) -> None:
        super().__init__()
        model = copy.deepcopy(model).eval()
        model.use_channels_last(False)  # the layout is a CPU speed choice, not a result
        self.trunk, rpn, head = model.trunk, model.rpn, model.roi_head
        self.register_buffer("pixel_mean", model.pixel_mean.view(1, 3, 1, 1).clone())
        self.register_buffer("pixel_std", model.pixel_std.view(1, 3, 1, 1).clone())
        self.rpn_head = rpn.head
        self.register_buffer("cell_anchors", rpn.anchor_generator.cell_anchors.clone())
        self.stride = rpn.anchor_generator.stride
        self.pre_nms_topk = rpn.pre_nms_topk_test
        self.post_nms_topk = rpn.post_nms_topk_test
        self.rpn_nms_threshold = rpn.nms_threshold
        self.rpn_min_box_size = rpn.min_box_size
        self.res5, self.cls_score, self.bbox_pred = head.res5, head.cls_score, head.bbox_pred
        self.num_classes = head.num_classes
        self.roi_op, self.pooled_size = head.roi_op, head.pooled_size
        self.spatial_scale, self.sampling_ratio = head.spatial_scale, head.sampling_ratio
        self.aligned, self.box_weights = head.aligned, head.box_weights
        self.score_threshold, self.nms_threshold = head.score_threshold, head.nms_threshold
        self.detections_per_image = head.detections_per_image
        self.min_box_size = head.min_box_size
        self.global_context = bool(getattr(head, "global_context", False))

    def forward(self, image: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(3, H, W) float RGB 0..255 and its scale (0-d: resized / original, 1.0 for an image
        at its own size; ``ImageBatch.scales``) -> boxes (D, 4), scores (D,), labels (D,)."""
        h, w = image.shape[-2], image.shape[-1]
        # (w, h, w, h) for clipping; _shape_as_tensor (as torchvision's ONNX paths) keeps it
        # following the input's size in a trace, where torch.tensor(image.shape) is a constant
        limits = torch._shape_as_tensor(image)[1:].flip(0).repeat(2).to(image.device, torch.float32)
        x = (image.unsqueeze(0).float() - self.pixel_mean) / self.pixel_std
        # pad after normalising (= FasterRCNN.normalize, which zeroes the padding)
        x = F.pad(x, [0, (SIZE_DIVISIBILITY - w % SIZE_DIVISIBILITY) % SIZE_DIVISIBILITY,
                      0, (SIZE_DIVISIBILITY - h % SIZE_DIVISIBILITY) % SIZE_DIVISIBILITY])
        features = self.trunk(x)                                          # (1, C, H/16, W/16)
        proposals = self.propose(features, limits, scale.float())        # (P, 4)
        rois = torch.cat((torch.zeros_like(proposals[:, :1]), proposals), dim=1)
        logits, deltas = self.predict(features, rois, limits)
        return self.detect(logits, deltas, proposals, limits)

    def anchors(self, features: Tensor) -> Tensor:
        """(H * W * A, 4) anchors of ``AnchorGenerator.grid_anchors``, from tensor shapes."""
        fh, fw = features.shape[-2], features.shape[-1]
        device = features.device
        shifts_x = torch.arange(fw, dtype=torch.float32, device=device) * self.stride
        shifts_y = torch.arange(fh, dtype=torch.float32, device=device) * self.stride
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
        return (shifts + self.cell_anchors.view(1, -1, 4)).reshape(-1, 4)

    def propose(self, features: Tensor, limits: Tensor, scale: Tensor) -> Tensor:
        """``RPN.select_proposals`` for one image: top-k, decode, clip, drop tiny, NMS, top-k."""
        logits, deltas = self.rpn_head(features)                        # (1, R), (1, R, 4)
        # a descending sort cut to k is top-k with k = min(k, R) without a Python min
        logits, order = logits[0].float().sort(descending=True)
        logits, order = logits[: self.pre_nms_topk], order[: self.pre_nms_topk]
        boxes = box_ops.decode(deltas[0][order], self.anchors(features)[order])
        boxes = _clip(boxes, limits)
        keep = box_ops.nonempty(boxes, self.rpn_min_box_size * scale)  # original pixels
        boxes, logits = boxes[keep], logits[keep]
        keep = nms(boxes, logits, self.rpn_nms_threshold)[: self.post_nms_topk]
        return boxes[keep]

    def predict(self, features: Tensor, rois: Tensor, limits: Tensor) -> tuple[Tensor, Tensor]:
        """``C4RoIHead.predict`` for one image, global context (Appendix B) included: the
        whole image (0, 0, w, h) is one more RoI whose feature joins every region's."""
        if not self.global_context:
            x = self.region_features(features, rois)
        else:
            whole = torch.cat((limits.new_zeros(3), limits[:2])).unsqueeze(0)   # (1, 5)
            x = self.region_features(features, torch.cat((rois, whole)))   # (P + 1, D)
            x = torch.cat((x[:-1], x[-1:].expand(x.shape[0] - 1, -1)), dim=1)
        return self.cls_score(x), self.bbox_pred(x)

    def region_features(self, features: Tensor, rois: Tensor) -> Tensor:
        """RoI pooling, conv5_x, average pooling: (R, 5) -> (R, D), with torchvision's RoI
        ops, which export (the head's CPU RoIAlign kernel equals torchvision's but has no
        ONNX form)."""
        if self.roi_op == "pool":
            x = roi_pool(features, rois, self.pooled_size, self.spatial_scale)
        else:
            x = roi_align(features, rois, self.pooled_size, self.spatial_scale,
                          self.sampling_ratio, self.aligned)
        return self.res5(x).mean(dim=(2, 3))

    def detect(self, logits: Tensor, deltas: Tensor, proposals: Tensor, limits: Tensor
               ) -> tuple[Tensor, Tensor, Tensor]:
        """``C4RoIHead.detect`` for one image."""
        scores = F.softmax(logits.float(), dim=-1)[:, :-1].reshape(-1)   # (P * K,)
        boxes = box_ops.decode(deltas, proposals, self.box_weights)      # (P, 4K)
        boxes = _clip(boxes.view(-1, 4), limits)                        # (P * K, 4)
        labels = torch.arange(self.num_classes, device=proposals.device).repeat(proposals.shape[0])
        keep = (scores > self.score_threshold) & box_ops.nonempty(boxes, self.min_box_size)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.nms_threshold)[: self.detections_per_image]
        return boxes[keep], scores[keep], labels[keep]


def _clip(boxes: Tensor, limits: Tensor) -> Tensor:
    """``boxes.clip`` against a (4,) tensor of (w, h, w, h)."""
    return torch.min(boxes.clamp(min=0), limits)


class ExportError(ValueError):
    """An export that cannot be made or read back (bad format, missing runtime, mismatch)."""


def export_detector(model: FasterRCNN, path: str | os.PathLike, fmt: ExportFormat,
                    example_size: tuple[int, int]) -> Path:
    """Writes ``model``'s inference graph (see :class:`ExportableDetector`) to ``path``.

    Args:
        model: the detector (weights and settings as they are).
        path: the file to write (``.pt`` for TorchScript, ``.onnx`` for ONNX by convention).
        fmt: ``"torchscript"`` (``torch.jit.load`` reads it, no detres needed) or ``"onnx"``
            (opset 17; inputs ``image`` (3, height, width) and ``scale`` (0-d), outputs
            ``boxes``, ``scores``, ``labels``).
        example_size: (h, w) of the image traced; any other size runs too.

    Returns:
        ``path``.
    """
    if fmt not in ("torchscript", "onnx"):
        raise ExportError(f"unknown export format {fmt!r}; use 'torchscript' or 'onnx'")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        raise ExportError("--format onnx needs the onnx package: pip install -e \".[export]\"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = ExportableDetector(model).eval()
    example = (torch.zeros(3, *example_size), torch.tensor(1.0))
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer flags the Python branches it freezes; all of them are fixed by the model
        # (class count, box layout), never by the image, and the deprecation notices of the
        # tracing APIs are not the user's to act on.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(wrapper, example, check_trace=False), str(path))
        else:
            torch.onnx.export(
                wrapper, example, str(path), dynamo=False, opset_version=ONNX_OPSET,
                input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                dynamic_axes={"image": {1: "height", 2: "width"},
                              **{n: {0: "detections"} for n in OUTPUT_NAMES}})
    return path


def load_exported(path: str | os.PathLike, fmt: ExportFormat
                  ) -> Callable[[Tensor, float], tuple[Tensor, Tensor, Tensor]]:
    """An exported detector as a callable ``(image (3, H, W) float32, scale) -> (boxes,
    scores, labels)`` on tensors: TorchScript through ``torch.jit.load``, ONNX through ONNX
    Runtime (the optional ``export`` extra: ``pip install -e ".[export]"``)."""
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")

        def run_torchscript(image: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
            with torch.no_grad():
                return tuple(module(image.float(), torch.tensor(float(scale))))
        return run_torchscript
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("reading ONNX files needs onnxruntime: pip install -e \".[export]\""
                          ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run_onnx(image: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        feed = {"image": image.float().numpy(), "scale": np.array(scale, np.float32)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feed))
    return run_onnx


def compare_exported(model: FasterRCNN, run: Callable, images: Sequence[Tensor],
                     box_tol: float = 0.1, score_tol: float = 1e-3) -> tuple[int, int, float]:
    """How far an exported copy ``run`` (from :func:`load_exported`) agrees with ``model`` on
    ``images`` (at scale 1).

    Detections are paired one to one, best score first, when they have the same label,
    scores within ``score_tol`` and boxes within ``box_tol`` pixels. Pairing rather than
    comparing in order: a model whose scores nearly tie (an untrained one) may order them,
    and so cut the top-D list, differently after rounding differences of 1e-6.

    Returns:
        (paired detections, detections in the larger of each pair of lists, summed over the
        images; the largest box difference among the pairs, in pixels).
    """
    model = model.eval()
    paired = total = 0
    worst = 0.0
    for image in images:
        with torch.no_grad():
            ref = model(ImageBatch.from_tensors([image])).detections[0].to("cpu")
        boxes, scores, labels = run(image)
        total += max(len(boxes), len(ref.boxes))
        if not len(boxes) or not len(ref.boxes):
            continue
        diff = (ref.boxes[:, None] - boxes[None]).abs().amax(dim=-1)            # (D, D')
        ok = ((ref.labels[:, None] == labels[None])
              & ((ref.scores[:, None] - scores[None]).abs() <= score_tol) & (diff <= box_tol))
        free = torch.ones(len(boxes), dtype=torch.bool)
        for i in range(len(ref.boxes)):
            candidates = torch.where(ok[i] & free, diff[i], torch.inf)
            j = int(candidates.argmin())
            if torch.isfinite(candidates[j]):
                free[j] = False
                paired += 1
                worst = max(worst, float(diff[i, j]))
    return paired, total, worst
