"""The ResNet family of He et al. 2015 ("Deep Residual Learning for Image Recognition",
arXiv:1512.03385): ImageNet nets (Table 1), CIFAR nets (Sec 4.2), plain counterparts, shortcut
options A/B/C (Sec 3.3), and the C4 split used by Faster R-CNN (Appendix A).

Shapes: N images, C channels, H, W input size. Nouns: a *stage* is a ``layerK`` (a run of blocks
at one resolution); ``logits`` are class scores before softmax.

Paper names <-> parameter names (identical to torchvision, so its state dicts load strictly):

    conv1          conv1, bn1 (+ max pool)      stride 4 after the pool (ImageNet stem)
    conv2_x = res2 layer1                       stride 4,  width * 1 * expansion channels
    conv3_x = res3 layer2                       stride 8
    conv4_x = res4 layer3                       stride 16  (R50/101: 1024 channels)
    conv5_x = res5 layer4                       stride 32  (R50/101: 2048 channels)
    fc             avgpool + fc                 only when num_classes is not None

The CIFAR nets (Sec 4.2) have a 3x3 stem without pooling and three stages of 2n basic-block
layers (depth 6n + 2) with 16/32/64 filters, named res2..res4 at strides 1, 2, 4.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detres.models.norm import NORMS, FrozenBatchNorm2d, freeze_batchnorm, make_norm

SHORTCUTS = ("A", "B", "C")
STEMS = ("imagenet", "cifar")
# Table 1: (block kind, blocks per stage).
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}


class ZeroPadShortcut(nn.Module):
    """Option A (Sec 3.3): identity that subsamples by ``stride`` and zero-pads new channels.

    Parameter-free. Taking every ``stride``-th pixel gives ceil(H / stride) rows, the same size
    as the block's stride-2 3x3 (padding 1) or 1x1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = out_channels - in_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class StridedConv1x1(nn.Conv2d):
    """A 1x1 convolution with stride > 1: the projection shortcut (option B/C) and the MSRA
    bottleneck's first 1x1 (``stride_in_1x1``). Same parameters and results as ``nn.Conv2d``.

    With autograd in bfloat16 on a CPU it subsamples first and runs a stride-1 convolution:
    oneDNN's bf16 weight-gradient kernel for strided 1x1 convolutions
    (``jit_avx512_core_bf16_1x1_convolution_bwd_weights_t``, used on AVX-512-BF16 CPUs
    without AMX, e.g. AMD Zen 4) crashes the process for some narrow channel counts (8 -> 16
    channels-last among them). Subsampling is what that kernel does internally; everywhere
    else the direct call is kept, as it is 5-10% faster.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, 1, stride, bias=False)

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.stride == (1, 1) or not _bf16_cpu_autograd(x):
            return super()._conv_forward(x, weight, bias)
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        x = x[:, :, :: self.stride[0], :: self.stride[1]]
        x = x.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        return F.conv2d(x, weight, bias)


def _bf16_cpu_autograd(x: Tensor) -> bool:
    """Whether a convolution on ``x`` would run in bfloat16 on the CPU with autograd on."""
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    return x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cpu") and
                                         torch.get_autocast_dtype("cpu") == torch.bfloat16)


def conv_norm(conv: nn.Conv2d, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``. A frozen BN is folded into the convolution on the fly (weight times
    its scale, its shift as the bias): one convolution with a bias instead of a multiply and an
    add over every activation, forward and backward, and the same gradients for the weight."""
    if isinstance(norm, FrozenBatchNorm2d) and conv.bias is None:
        scale, shift = norm.scale_shift()
        return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), shift)
    return norm(conv(x))


def _shortcut(downsample: nn.Module, x: Tensor) -> Tensor:
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2:   # projection + norm
        return conv_norm(downsample[0], downsample[1], x)
    return downsample(x)


def make_shortcut(shortcut: str, in_channels: int, out_channels: int, stride: int, norm: str,
                  gn_groups: int) -> nn.Module | None:
    """The shortcut of one residual block; None means the identity (no work at all)."""
    reshapes = stride != 1 or in_channels != out_channels
    if shortcut == "A" and reshapes:
        return ZeroPadShortcut(in_channels, out_channels, stride)
    if shortcut == "C" or (shortcut == "B" and reshapes):
        # Projection W_s x of eq. 2: 1x1 conv (strided) + norm, torchvision's "downsample".
        return nn.Sequential(
            StridedConv1x1(in_channels, out_channels, stride),
            make_norm(norm, out_channels, gn_groups))
    return None


class BasicBlock(nn.Module):
    """Two 3x3 convs (Fig. 5 left); stride in the first. Plain when ``residual`` is False."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, shortcut: nn.Module | None,
                 residual: bool, norm: str, gn_groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, channels, gn_groups)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, channels, gn_groups)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = conv_norm(self.conv2, self.bn2, out)
        if self.residual:  # eq. 1/2: y = F(x) + W_s x, then the second nonlinearity (Fig. 2)
            out += x if self.downsample is None else _shortcut(self.downsample, x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (Fig. 5 right).

    ``stride_in_1x1``: the MSRA original strides the first 1x1; torchvision (and its weights)
    stride the 3x3, which sees every input pixel and is slightly more accurate.
    """

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, shortcut: nn.Module | None,
                 residual: bool, norm: str, gn_groups: int, stride_in_1x1: bool = False) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = StridedConv1x1(in_channels, channels, stride_1x1)
        self.bn1 = make_norm(norm, channels, gn_groups)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride_3x3, 1, bias=False)
        self.bn2 = make_norm(norm, channels, gn_groups)
        self.conv3 = nn.Conv2d(channels, channels * 4, 1, bias=False)
        self.bn3 = make_norm(norm, channels * 4, gn_groups)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(conv_norm(self.conv1, self.bn1, x))
        out = self.relu(conv_norm(self.conv2, self.bn2, out))
        out = conv_norm(self.conv3, self.bn3, out)
        if self.residual:
            out += x if self.downsample is None else _shortcut(self.downsample, x)
        return self.relu(out)


@dataclass(frozen=True)
class FeatureSpec:
    """One named stage output: channels and stride relative to the input image."""

    channels: int
    stride: int


def _stage_plan(depth: int, stem: str) -> tuple[type[nn.Module], tuple[int, ...]]:
    """(block class, blocks per stage) for a depth; raises a one-line ValueError otherwise."""
    if stem == "imagenet":
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f"ResNet depth {depth} is not in Table 1; valid: "
                             f"{', '.join(map(str, IMAGENET_DEPTHS))} (or stem='cifar' for 6n+2)")
        kind, blocks = IMAGENET_DEPTHS[depth]
        return (BasicBlock if kind == "basic" else Bottleneck), blocks
    if stem == "cifar":
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, 1202, ...); "
                             f"got {depth}")
        return BasicBlock, (((depth - 2) // 6),) * 3  # Sec 4.2: 6n layers + conv1 + fc
    raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")


def _make_stage(block: type[nn.Module], in_channels: int, channels: int, num_blocks: int,
                stride: int, residual: bool, shortcut: str, norm: str, gn_groups: int,
                stride_in_1x1: bool) -> nn.Sequential:
    """One ``layerK`` = convK+1_x; it downsamples in its first block (Sec 3.3, "stride of 2")."""
    extra = {"stride_in_1x1": stride_in_1x1} if block is Bottleneck else {}
    layers = []
    for j in range(num_blocks):
        s = stride if j == 0 else 1
        out_channels = channels * block.expansion
        sc = (make_shortcut(shortcut, in_channels, out_channels, s, norm, gn_groups)
              if residual else None)
        layers.append(block(in_channels, channels, s, sc, residual, norm, gn_groups, **extra))
        in_channels = out_channels
    return nn.Sequential(*layers)


def _stage_outputs(net: nn.Module, x: Tensor, stage_names: Sequence[str]) -> Iterator[Tensor]:
    """The stem (conv1 -> bn1 -> ReLU -> max pool, Identity for CIFAR) of a ResNet or its C4
    trunk, then its stages ``stage_names`` in order; yields each stage's output."""
    x = net.maxpool(net.relu(conv_norm(net.conv1, net.bn1, x)))
    for name in stage_names:
        x = getattr(net, name)(x)
        yield x


def _last_stage_output(net: nn.Module, x: Tensor, stage_names: Sequence[str]) -> Tensor:
    """What the last of ``stage_names`` gives; earlier outputs are not kept."""
    for x in _stage_outputs(net, x, stage_names):
        pass
    return x


class ResNet(nn.Module):
    """A residual (or plain) network of He et al. 2015.

    Args:
        depth: 18, 34, 50, 101, 152 for ``stem="imagenet"`` (Table 1); 6n+2 for ``"cifar"``.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max pool, four stages) or "cifar" (3x3 conv, three
            stages at 16/32/64 filters, Sec 4.2).
        num_classes: size of ``fc`` after global average pooling; None builds a backbone
            without avgpool/fc.
        residual: False builds the plain counterpart (same layers, no shortcuts; Sec 3.3).
        shortcut: "A" zero-padding identity, "B" projections only where the shape changes,
            "C" projections everywhere (Sec 3.3, Table 3). None: "A" for CIFAR (Sec 4.2),
            "B" for ImageNet (as the paper's bottleneck nets, Sec 4.1; torchvision's layout).
        stride_in_1x1: stride in the first 1x1 of a bottleneck (MSRA original) instead of the 3x3
            (torchvision weights).
        width: channels of conv1 and of the first stage (64 ImageNet, 16 CIFAR when None);
            stage k has ``width * 2**k`` (times 4 at a bottleneck's output).
        norm: "bn", "frozen_bn" (statistics and affine fixed) or "gn" (GroupNorm, ``gn_groups``).
        freeze_at: as detectron2: 0 freezes nothing, 1 the stem (conv1, bn1), k >= 2 the stem and
            layer1..layer(k-1). Frozen parameters get ``requires_grad=False`` and frozen
            BatchNorm2d layers are replaced by FrozenBatchNorm2d, so ``train()`` cannot update
            their statistics.
        zero_init_residual: zero the last norm's scale in each block, so that every residual
            block starts as the identity (Goyal et al. 2017); only for residual nets.

    Attributes:
        feature_specs: ``{"res2": FeatureSpec(channels, stride), ...}``, what forward_features
            returns.
    """

    def __init__(self, depth: int = 50, *, stem: str = "imagenet", num_classes: int | None = 1000,
                 residual: bool = True, shortcut: str | None = None, stride_in_1x1: bool = False,
                 width: int | None = None, norm: str = "bn", gn_groups: int = 32,
                 freeze_at: int = 0, zero_init_residual: bool = False) -> None:
        super().__init__()
        block, blocks_per_stage = _stage_plan(depth, stem)
        shortcut = shortcut if shortcut is not None else ("A" if stem == "cifar" else "B")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut option {shortcut!r}; valid: {', '.join(SHORTCUTS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        if zero_init_residual and not residual:
            raise ValueError("zero_init_residual would zero every block of a plain net")
        self.depth, self.stem, self.residual, self.shortcut = depth, stem, residual, shortcut
        width = width if width is not None else (16 if stem == "cifar" else 64)
        self.stride_in_1x1, self.width = stride_in_1x1, width

        if stem == "imagenet":  # Table 1 conv1: 7x7, 64, stride 2; 3x3 max pool, stride 2
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
            stride, stage_strides = 4, (1, 2, 2, 2)
        else:  # Sec 4.2: "The first layer is 3x3 convolutions", no pooling, 32x32 inputs
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
            stride, stage_strides = 1, (1, 2, 2)
        self.bn1 = make_norm(norm, width, gn_groups)
        self.relu = nn.ReLU(inplace=True)

        self.stage_names: list[str] = []
        self.feature_specs: dict[str, FeatureSpec] = {}
        in_channels = width
        for i, (num_blocks, stage_stride) in enumerate(zip(blocks_per_stage, stage_strides)):
            stage = _make_stage(block, in_channels, width * 2**i, num_blocks, stage_stride,
                                residual, shortcut, norm, gn_groups, stride_in_1x1)
            in_channels, stride = width * 2**i * block.expansion, stride * stage_stride
            self.add_module(f"layer{i + 1}", stage)
            self.stage_names.append(f"layer{i + 1}")
            self.feature_specs[f"res{i + 2}"] = FeatureSpec(in_channels, stride)

        self.avgpool = nn.AdaptiveAvgPool2d(1) if num_classes is not None else None
        self.fc = nn.Linear(in_channels, num_classes) if num_classes is not None else None
        self._init_weights(zero_init_residual)
        self._freeze(freeze_at)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # "We initialize the weights as in [13]" (Sec 3.4): He et al. 2015 ("Delving deep"),
        # whose Sec 2.2 shows the fan_out form works as well as fan_in; torchvision uses fan_out.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.bn3.weight if isinstance(m, Bottleneck) else m.bn2.weight)

    def _freeze(self, freeze_at: int) -> None:
        last = len(self.stage_names) + 1
        if not 0 <= freeze_at <= last:
            raise ValueError(f"freeze_at must be in 0..{last}; got {freeze_at}")
        frozen = ["conv1", "bn1"] if freeze_at >= 1 else []
        frozen += self.stage_names[: max(freeze_at - 1, 0)]
        for name in frozen:
            module = getattr(self, name)
            for p in module.parameters():
                p.requires_grad_(False)
            setattr(self, name, freeze_batchnorm(module))

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """(N, 3, H, W) -> {"res2": (N, C2, H/4, W/4), ..., "res5": (N, C5, H/32, W/32)}.

        CIFAR nets give res2..res4 at strides 1, 2, 4. See ``feature_specs``.
        """
        return dict(zip(self.feature_specs, _stage_outputs(self, x, self.stage_names)))

    def forward(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) -> logits (N, num_classes); without fc, the last stage's features."""
        x = _last_stage_output(self, x, self.stage_names)
        if self.fc is None:
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def c4_split(self) -> tuple["ResNetTrunk", "ResNetHead"]:
        """Faster R-CNN's C4 layout (Appendix A): conv1..conv4_x shared by the RPN and the
        detector, conv5_x run per RoI. Both parts share modules with this model (no copies)."""
        if len(self.stage_names) != 4:
            raise ValueError("the C4 split needs a four-stage (ImageNet) ResNet")
        return ResNetTrunk(self), ResNetHead(self.layer4, self.feature_specs["res4"].channels,
                                             self.feature_specs["res5"].channels)

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, stem={self.stem!r}, residual={self.residual}, "
                f"shortcut={self.shortcut!r}")

    def arch(self) -> dict[str, Any]:
        """What a backbone file records (``weights.backbone_file``): every choice that changes
        the function without changing a parameter shape, beside those that do."""
        return {"depth": self.depth, "stem": self.stem, "residual": self.residual,
                "shortcut": self.shortcut, "stride_in_1x1": self.stride_in_1x1,
                "width": self.width}


class ResNetTrunk(nn.Module):
    """conv1..conv4_x: (N, 3, H, W) -> (N, out_channels, H/16, W/16); ResNet's parameter names."""

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = resnet.conv1, resnet.bn1, resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.stage_names = resnet.stage_names[:3]
        self.out_channels = resnet.feature_specs["res4"].channels
        self.stride = resnet.feature_specs["res4"].stride

    def forward(self, x: Tensor) -> Tensor:
        return _last_stage_output(self, x, self.stage_names)


class ResNetHead(nn.Module):
    """conv5_x (``layer4``): (R, in_channels, h, w) -> (R, out_channels, h/2, w/2); run on RoI
    features, before global average pooling and the box layers (Appendix A)."""

    def __init__(self, layer4: nn.Module, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.layer4 = layer4
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, 2

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(x)
