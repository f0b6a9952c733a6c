"""Input normalisation, done inside each model so that a checkpoint carries its input
convention (docs/architecture.md, Carriers: images enter every model as RGB values in 0..255).

``IMAGENET_PIXEL_MEAN`` / ``IMAGENET_PIXEL_STD`` are torchvision's ImageNet statistics on the
0..255 scale (RGB): a backbone pretrained here expects the same input as torchvision's weights.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)


def channel_values(values: Sequence[float] | Tensor) -> Tensor:
    """3 per-channel values -> a (3, 1, 1) float32 tensor; a (3, H, W) mean image unchanged."""
    t = torch.as_tensor(values, dtype=torch.float32)
    return t.view(3, 1, 1) if t.dim() == 1 else t


def normalize(images: Tensor, mean: Tensor, std: Tensor,
              sizes: Sequence[tuple[int, int]] | None = None) -> Tensor:
    """(N, 3, H, W) RGB 0..255 -> (x - mean) / std in float32.

    With ``sizes`` (each image's (h, w) before padding) the padding is set to 0 afterwards, as
    if the batch had been padded after normalising.
    """
    x = (images.float() - mean) / std
    if sizes is not None:
        height, width = x.shape[-2:]
        for i, (h, w) in enumerate(sizes):
            if h < height:
                x[i, :, h:] = 0
            if w < width:
                x[i, :, :, w:] = 0
    return x
