"""Anchors on the stride-16 feature map (Faster R-CNN, Ren et al. 2015, section 3.1.1).

Shapes: A anchors per cell (len(sizes) * len(aspect_ratios)), H, W the feature map size.
An anchor is an xyxy box in input-image pixels. Cell (y, x) holds A anchors centred on the
pixel (16 x, 16 y), the top-left corner of the cell (as in torchvision and detectron2).

Order, which the RPN's 1x1 layers rely on: anchors are flattened as (H, W, A), and inside a
cell ratio-major, size-minor ("aspect ratio r, size s" at index ``r * len(sizes) + s``), the
same as ``torchvision.models.detection.anchor_utils.AnchorGenerator`` so that weights and
outputs can be compared with it. Cell anchors are rounded to whole pixels, also as torchvision.

Presets (He et al. 2015, Appendix A; Ren et al. 2015, section 3.1.1):
- VOC, paper: 3 scales 128, 256, 512 and 3 aspect ratios 1:2, 1:1, 2:1;
- COCO, paper (Appendix A, "MS COCO"): a 4th scale, 64;
- modern (detectron2 C4): 32, 64, 128, 256, 512.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ANCHOR_SIZES_VOC = (128, 256, 512)
ANCHOR_SIZES_COCO = (64, 128, 256, 512)
ANCHOR_SIZES_MODERN = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)  # height / width


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """The A anchors of one cell, centred on (0, 0).

    An anchor of size s and aspect ratio r (height / width) has area s**2, width s / sqrt(r)
    and height s * sqrt(r).

    Returns:
        (A, 4) float32 xyxy, A = len(aspect_ratios) * len(sizes), ratio-major.
    """
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1.0 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack((-ws, -hs, ws, hs), dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors at every cell of one feature map (all images of a padded batch share them).

    Args:
        sizes: anchor sizes in input pixels (sqrt of the area).
        aspect_ratios: height / width ratios.
        stride: feature map stride in input pixels (16 for the C4 trunk, conv4_x).
    """

    def __init__(self, sizes: Sequence[float] = ANCHOR_SIZES_VOC,
                 aspect_ratios: Sequence[float] = ASPECT_RATIOS, stride: int = 16) -> None:
        super().__init__()
        if not sizes or not aspect_ratios:
            raise ValueError("AnchorGenerator needs at least one size and one aspect ratio")
        if any(s <= 0 or not math.isfinite(s) for s in sizes) or any(r <= 0 for r in aspect_ratios):
            raise ValueError(f"anchor sizes and aspect ratios must be positive, got {sizes}, "
                             f"{aspect_ratios}")
        self.sizes = tuple(float(s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.stride = int(stride)
        # Configuration, not state: rebuilt from the constructor arguments, never checkpointed.
        self.register_buffer("cell_anchors", cell_anchors(self.sizes, self.aspect_ratios),
                             persistent=False)
        self._cache: dict[tuple[int, int, torch.device], Tensor] = {}

    @property
    def num_anchors(self) -> int:
        """A, the number of anchors per cell."""
        return self.cell_anchors.shape[0]

    def grid_anchors(self, height: int, width: int) -> Tensor:
        """(H * W * A, 4) float32 anchors, flattened (H, W, A)."""
        device = self.cell_anchors.device
        key = (height, width, device)
        anchors = self._cache.get(key)
        if anchors is None:
            shifts_x = torch.arange(width, dtype=torch.float32, device=device) * self.stride
            shifts_y = torch.arange(height, dtype=torch.float32, device=device) * self.stride
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=-1).reshape(-1, 1, 4)
            anchors = (shifts + self.cell_anchors.view(1, -1, 4)).reshape(-1, 4)
            if len(self._cache) > 16:  # a few image shapes recur (aspect-ratio grouping)
                self._cache.clear()
            self._cache[key] = anchors
        return anchors

    def forward(self, features: Tensor) -> Tensor:
        """(N, C, H, W) feature map -> (H * W * A, 4) float32 anchors on its device."""
        return self.grid_anchors(int(features.shape[-2]), int(features.shape[-1]))

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, aspect_ratios={self.aspect_ratios}, stride={self.stride}"
