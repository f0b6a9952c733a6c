"""Faster R-CNN with the C4 layout on a ResNet (He et al. 2015, Appendix A; Ren et al. 2015).

    images (N, 3, H, W) RGB 0..255 -> normalize -> trunk = conv1..conv4_x -> (N, C, H/16, W/16)
      -> RPN -> proposals (P_i, 4) per image
      -> C4RoIHead: RoI pool 14x14 -> conv5_x (stride 2) -> 7x7 -> average pool -> cls, box

Shapes: N images, C = 1024 conv4_x channels (R-50/101), P_i proposals, K foreground classes,
M ground-truth boxes, D detections. Parameter names: ``trunk.{conv1,bn1,layer1..3}`` and
``roi_head.res5.layer4`` are the ResNet's own (torchvision) names under a prefix: the detector
is built around a ResNet (``ResNet.c4_split``) that loads its weights first.
The model never resizes (docs/architecture.md, Carriers): boxes in and out are in the pixels of
``ImageBatch.tensor``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detres.models import pixels
from detres.models.pixels import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from detres.models.norm import FrozenBatchNorm2d
from detres.models.roi_head import C4RoIHead
from detres.models.rpn import RPN
from detres.structures import DetectorOutput, ImageBatch, Targets

class FasterRCNN(nn.Module):
    """normalize -> trunk -> RPN -> RoI head.

    Args:
        trunk: (N, 3, H, W) normalized images -> (N, C, H/16, W/16), e.g. ``ResNet.c4_split()[0]``.
        rpn: proposals and RPN losses on the trunk's features.
        roi_head: owns conv5_x; losses and detections.
        pixel_mean / pixel_std: RGB, 0..255 scale, subtracted / divided inside the model.
        check_targets: validate targets (one host synchronisation per batch) before any loss.
        channels_last: run the convolutions on NHWC tensors (weights converted here, inputs in
            forward; the RoI head follows its features' layout). Same results, and faster with
            oneDNN on CPUs and with cuDNN's tensor-core kernels; a layout, not a parameter.
    """

    def __init__(self, trunk: nn.Module, rpn: RPN, roi_head: C4RoIHead,
                 pixel_mean: Sequence[float] = IMAGENET_PIXEL_MEAN,
                 pixel_std: Sequence[float] = IMAGENET_PIXEL_STD, check_targets: bool = True,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.trunk = trunk
        self.rpn = rpn
        self.roi_head = roi_head
        self.register_buffer("pixel_mean", pixels.channel_values(pixel_mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", pixels.channel_values(pixel_std).view(1, 3, 1, 1))
        self.check_targets = check_targets
        self.channels_last = False
        if channels_last:
            self.use_channels_last()

    def use_channels_last(self, enabled: bool = True) -> FasterRCNN:
        """Switches the convolutions' layout (NHWC when enabled), in place."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    @property
    def num_classes(self) -> int:
        return self.roi_head.num_classes

    def normalize(self, images: ImageBatch) -> Tensor:
        """(x - mean) / std, with the padding kept at 0 (as if padded after normalizing)."""
        x = pixels.normalize(images.tensor, self.pixel_mean, self.pixel_std, images.sizes)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, images: ImageBatch, targets: list[Targets] | None = None) -> DetectorOutput:
        """Losses whenever targets are given, detections whenever the model is not training.

        Args:
            images: (N, 3, H, W) float RGB 0..255, padded; sizes before padding.
            targets: N ground truths in the same pixels, or None (required in training).

        Returns:
            DetectorOutput with losses {"loss_rpn_cls", "loss_rpn_box", "loss_cls",
            "loss_box"}, detections (N Detections, boxes in the batch's pixels) and stats.
        """
        if targets is not None:
            if len(targets) != len(images):
                raise ValueError(f"{len(images)} images but {len(targets)} targets")
            if self.check_targets:
                check_targets(targets, self.num_classes)
        elif self.training:
            raise ValueError("FasterRCNN in training mode needs targets")
        features = self.trunk(self.normalize(images))                  # (N, C, H/16, W/16)
        proposals, rpn_losses, rpn_stats = self.rpn(features, images.sizes, targets, images.scales)
        roi_losses, detections, roi_stats = self.roi_head(features, proposals, images.sizes,
                                                          targets)
        return DetectorOutput(losses={**rpn_losses, **roi_losses}, detections=detections,
                              stats={**rpn_stats, **roi_stats})

    @torch.no_grad()
    def fuse_frozen_bn(self, batchnorm: bool = False) -> FasterRCNN:
        """Folds every FrozenBatchNorm2d (and with ``batchnorm`` every BatchNorm2d, as its
        eval mode computes it) into the convolution before it, in place; for inference.

        y = (conv(x) - mean) * g / sqrt(var + eps) + b = conv'(x) with the scale folded into the
        weights and the shift into a bias, saving a pass over every activation. The state dict
        changes (BN buffers go, conv biases appear), so save checkpoints before fusing.
        """
        fuse_frozen_bn(self, batchnorm)
        return self.use_channels_last(self.channels_last)  # the fused convolutions are new


def check_targets(targets: list[Targets], num_classes: int) -> None:
    """Raises ValueError naming the image id for NaN/inf or degenerate boxes (x2 <= x1 or
    y2 <= y1) and labels outside 0..K-1; one host synchronisation for the whole batch."""
    bad = []
    for t in targets:
        b, lab = t.boxes, t.labels
        degenerate = ~torch.isfinite(b).all(dim=1) | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])
        bad.append(torch.stack((degenerate.any(), ((lab < 0) | (lab >= num_classes)).any())))
    if not bad:
        return
    bad = torch.stack([b.to(bad[0].device) for b in bad]).tolist()    # the one synchronisation
    if not any(any(b) for b in bad):
        return
    for t, (bad_box, bad_label) in zip(targets, bad):
        if bad_box:
            b = t.boxes
            i = int((~torch.isfinite(b).all(dim=1) | (b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]))
                    .nonzero()[0])
            raise ValueError(f"Targets(image_id={t.image_id}): box {i} {b[i].tolist()} is not a "
                             f"finite xyxy box with x2 > x1 and y2 > y1")
        if bad_label:
            lab = t.labels
            i = int(((lab < 0) | (lab >= num_classes)).nonzero()[0])
            raise ValueError(f"Targets(image_id={t.image_id}): label {int(lab[i])} of box {i} is "
                             f"outside 0..{num_classes - 1} (num_classes={num_classes})")


def fuse_conv_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d | nn.BatchNorm2d) -> nn.Conv2d:
    """A convolution equal to ``bn(conv(x))`` for frozen statistics (a BatchNorm2d: its eval
    mode, running statistics)."""
    scale = (bn.running_var + bn.eps).rsqrt()                          # (C_out,)
    if bn.weight is not None:                                          # BatchNorm2d(affine=False)
        scale = scale * bn.weight
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True,
                      device=conv.weight.device, dtype=conv.weight.dtype)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + (0.0 if bn.bias is None else bn.bias))
    fused.weight.requires_grad_(conv.weight.requires_grad)
    fused.bias.requires_grad_(conv.weight.requires_grad)
    return fused


def fuse_frozen_bn(module: nn.Module, batchnorm: bool = False) -> int:
    """Folds FrozenBatchNorm2d layers into the Conv2d they follow, in place; returns how many.
    With ``batchnorm``, BatchNorm2d layers with running statistics too, as eval mode computes
    them (the folded model is for inference only: training would update those statistics).

    Pairs are found by ResNet's naming (``convK`` + ``bnK`` in one block, ``conv1`` + ``bn1`` in
    the stem) and by position in nn.Sequential (``downsample``). The BN becomes nn.Identity.
    """
    kinds = (FrozenBatchNorm2d, nn.BatchNorm2d) if batchnorm else (FrozenBatchNorm2d,)
    count = 0
    for parent in list(module.modules()):
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            pairs = list(zip(names[:-1], names[1:]))
        else:
            pairs = [("conv" + name[2:], name) for name in children if name.startswith("bn")]
        for conv_name, bn_name in pairs:
            conv, bn = children.get(conv_name), children.get(bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, kinds) and \
                    getattr(bn, "running_var", None) is not None:
                setattr(parent, conv_name, fuse_conv_bn(conv, bn))
                setattr(parent, bn_name, nn.Identity())
                count += 1
    return count

