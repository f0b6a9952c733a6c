"""A frozen BN is folded into its convolution on the fly in training (models/resnet.py::
conv_norm): the trunk's outputs and every trainable weight's gradient equal torchvision's
ResNet with its FrozenBatchNorm2d, which multiplies and adds after each convolution."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

from detres.models.resnet import ResNet


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_frozen_bn_trains_as_torchvisions(channels_last):
    torch.manual_seed(0)
    ours = ResNet(50, num_classes=10, norm="frozen_bn", width=16)
    for name, buf in ours.named_buffers():      # statistics and affine far from the identity
        if name.endswith(("running_mean", "bias")):
            buf.copy_(torch.randn_like(buf) * 0.2)
        elif name.endswith(("running_var", "weight")):
            buf.copy_(torch.rand_like(buf) + 0.5)
    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("num_batches_tracked")}
    theirs = _torchvision_at_width(16)
    theirs.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    if channels_last:
        ours, theirs = ours.to(memory_format=torch.channels_last), \
            theirs.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    for model in (ours, theirs):
        model.train()
        model(x).square().sum().backward()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        want = theirs_params[name].grad       # float32 sums in another order: relative to the
        scale = float(want.abs().max())       # tensor's largest gradient
        torch.testing.assert_close(p.grad, want, rtol=0, atol=2e-4 * scale,
                                   msg=lambda m: f"{name}: {m}")


def _torchvision_at_width(width: int) -> torch.nn.Module:
    """torchvision's ResNet-50 layout with base width ``width`` (its own builder fixes 64)."""
    class Narrow(torchvision.models.ResNet):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self._norm_layer = TorchvisionFrozenBN
            self.inplanes, self.dilation, self.groups, self.base_width = width, 1, 1, 64
            self.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = TorchvisionFrozenBN(width)
            self.relu = torch.nn.ReLU(inplace=True)
            self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
            block = torchvision.models.resnet.Bottleneck
            self.layer1 = self._make_layer(block, width, 3)
            self.layer2 = self._make_layer(block, width * 2, 4, stride=2)
            self.layer3 = self._make_layer(block, width * 4, 6, stride=2)
            self.layer4 = self._make_layer(block, width * 8, 3, stride=2)
            self.avgpool = torch.nn.AdaptiveAvgPool2d(1)
            self.fc = torch.nn.Linear(width * 8 * 4, 10)
    return Narrow()
