"""ResNet + global average pooling + fc, for pretraining the backbone by classification.

Shapes: N images, K classes, H, W input size. ``logits`` (N, K) are class scores before
softmax. Images come in as RGB values in 0..255 (uint8 or float); the model subtracts its own
``pixel_mean`` and divides by ``pixel_std`` (buffers, so a checkpoint carries its input
convention). ``pixel_mean`` is (3, 1, 1) per channel or (3, H, W) per pixel (the paper
subtracts the per-pixel mean, Sec 3.4 and 4.2).

Parameter names: ``net.*`` is the ResNet with torchvision names (``net.layer1`` = conv2_x,
..., ``net.fc``); ``engine.checkpoint.extract_backbone(state, "net.")`` gives the detector's
initial weights.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detres.models.pixels import channel_values, normalize
from detres.models.resnet import ResNet


@dataclass
class ClassifierOutput:
    """``logits`` (N, K) always; ``losses`` and ``stats`` when labels are given."""

    logits: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


class Classifier(nn.Module):
    """Image classifier for pretraining (Sec 3.4 ImageNet, Sec 4.2 CIFAR-10).

    Args:
        net: a ResNet built with ``num_classes=K`` (it owns avgpool and fc).
        pixel_mean, pixel_std: RGB in 0..255, 3 values or a (3, H, W) mean image.
    """

    def __init__(self, net: ResNet, pixel_mean: Sequence[float] | Tensor,
                 pixel_std: Sequence[float] | Tensor = (1.0, 1.0, 1.0)) -> None:
        super().__init__()
        if net.fc is None:
            raise ValueError("Classifier needs a ResNet built with num_classes")
        self.net = net
        self.register_buffer("pixel_mean", channel_values(pixel_mean))
        self.register_buffer("pixel_std", channel_values(pixel_std))

    @property
    def num_classes(self) -> int:
        return self.net.fc.out_features

    def forward(self, images: Tensor, labels: Tensor | None = None) -> ClassifierOutput:
        """images (N, 3, H, W) in 0..255 -> logits (N, K); with labels (N,) also the
        cross-entropy loss and the batch's top-1 error in percent (the training error of
        the paper's curves, Fig. 1, 4, 6)."""
        logits = self.net(normalize(images, self.pixel_mean, self.pixel_std))   # (N, K)
        if labels is None:
            return ClassifierOutput(logits)
        loss = F.cross_entropy(logits.float(), labels)
        top1_err = 100.0 * (logits.detach().argmax(1) != labels).float().mean()
        return ClassifierOutput(logits, {"loss_cls": loss}, {"top1_err": top1_err})


@torch.no_grad()
def mean_softmax(model: nn.Module, views: Sequence[Sequence[Tensor]],
                 device: torch.device | str = "cpu") -> Tensor:
    """(N, K) softmax scores of N images, each averaged over its views (10-crop or multi-scale
    testing, Sec. 3.4). ``views[i]`` holds image i's (3, h, w) views; views of one size, of
    all images together, run as one batch (whole images of other sizes run on their own, so
    no padding enters their global average). ``model`` returns ``.logits`` (N, K)."""
    groups: dict[tuple[int, ...], list[tuple[int, Tensor]]] = {}
    for i, image_views in enumerate(views):
        if len(image_views) == 0:
            raise ValueError(f"image {i} has no view to classify")
        for v in image_views:
            groups.setdefault(tuple(v.shape), []).append((i, v))
    total: Tensor | None = None
    for items in groups.values():
        probs = model(torch.stack([v for _, v in items]).to(device)).logits.float().softmax(1)
        if total is None:
            total = probs.new_zeros(len(views), probs.shape[1])
        total.index_add_(0, torch.tensor([i for i, _ in items], device=probs.device), probs)
    counts = torch.tensor([len(v) for v in views], dtype=torch.float32, device=total.device)
    return total / counts[:, None]
