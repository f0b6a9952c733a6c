"""Normalization layers of the ResNets: BatchNorm after each convolution (Sec 3.4), the frozen
BatchNorm of detection fine-tuning (Appendix A) and GroupNorm as a later alternative."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORMS = ("bn", "frozen_bn", "gn")


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine transform, all stored as buffers.

    Detection fine-tunes with batches of 1-2 images, too few for batch statistics, so the
    ImageNet ones are kept: "the BN layers are fixed during fine-tuning" (Appendix A). Keys
    equal BatchNorm2d's, ``num_batches_tracked`` included, so either loads into the other with
    ``strict=True``; a missing ``num_batches_tracked`` (pre-0.4 or converted files) is filled in.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> "FrozenBatchNorm2d":
        frozen = cls(bn.num_features, bn.eps).to(bn.weight.device)
        with torch.no_grad():
            frozen.weight.copy_(bn.weight)
            frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(bn.running_mean)
            frozen.running_var.copy_(bn.running_var)
            frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        state_dict.setdefault(prefix + "num_batches_tracked", self.num_batches_tracked.clone())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def scale_shift(self) -> tuple[Tensor, Tensor]:
        """(scale, shift) of the affine map the layer computes: ``x * scale + shift``."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        if not x.requires_grad:
            # One fused op at inference.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        # With grad, F.batch_norm's backward also computes (unused) weight/bias grads; a
        # multiply-add only back-propagates to x (as detectron2 does). Cast for fp16/bf16 autocast.
        scale, shift = self.scale_shift()
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def make_norm(norm: str, channels: int, gn_groups: int = 32) -> nn.Module:
    """The normalization layer after each conv (Sec 3.4: BN after each convolution)."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if norm == "gn":
        # GroupNorm (Wu & He 2018) is a later alternative to BN for small detection batches.
        if channels % gn_groups:
            raise ValueError(f"gn_groups={gn_groups} does not divide {channels} channels")
        return nn.GroupNorm(gn_groups, channels)
    raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm2d inside ``module`` by an equal FrozenBatchNorm2d (in place)."""
    if isinstance(module, nn.BatchNorm2d):
        return FrozenBatchNorm2d.from_batchnorm(module)
    for name, child in module.named_children():
        new = freeze_batchnorm(child)
        if new is not child:
            setattr(module, name, new)
    return module
