"""Tests for detres/models/resnet.py: torchvision oracles with shared weights, the paper's
parameter counts (Table 6), shortcut options counted by hand, freezing, the C4 split and
weights loading (no network: a temporary hub cache)."""
from __future__ import annotations

import os
from urllib.parse import urlparse

import pytest
import torch
import torchvision
from torch import nn

from detres.models.norm import FrozenBatchNorm2d
from detres.models.resnet import ResNet, ZeroPadShortcut
from detres.weights_io import (BackboneArchError, WeightsMismatchError, WeightsNotFoundError,
                               backbone_file, load_backbone_weights, read_torch_file)

# Table 1 blocks per stage; torchvision counts with 1000 classes.
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3),
          152: (3, 8, 36, 3)}
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160,
                      152: 60_192_808}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(fn, *args, **kwargs) -> nn.Module:
    """Builds a model without allocating or initializing weights: counting is then instant."""
    with torch.device("meta"):
        return fn(*args, **kwargs)


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine, so eval-mode comparisons exercise them."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.25)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)


# --- torchvision oracle -----------------------------------------------------------------------

@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_matches_torchvision_with_shared_weights(depth):
    torch.manual_seed(depth)
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    randomize_norms(ref)
    ours = ResNet(depth=depth, stride_in_1x1=False, norm="bn").eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same parameter names by design
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_parameter_counts_match_torchvision(depth):
    ref = on_meta(getattr(torchvision.models, f"resnet{depth}"), weights=None)
    ours = on_meta(ResNet, depth)
    assert num_params(ours) == num_params(ref) == TORCHVISION_PARAMS[depth]
    assert list(ours.state_dict()) == list(ref.state_dict())


def test_hand_counts_resnet50_and_101():
    assert round(num_params(on_meta(ResNet, 50)) / 1e6, 2) == 25.56
    assert round(num_params(on_meta(ResNet, 101)) / 1e6, 2) == 44.55


@pytest.mark.parametrize("depth,millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85),
                                            (110, 1.7), (1202, 19.4)])
def test_cifar_sizes_match_table6(depth, millions):
    model = on_meta(ResNet, depth, stem="cifar", num_classes=10)  # option A by default
    assert model.shortcut == "A"
    assert abs(num_params(model) / 1e6 - millions) <= 0.03 * millions


# --- shortcut options and plain nets --------------------------------------------------------

def projection_params(c_in: int, c_out: int) -> int:
    return c_in * c_out + 2 * c_out  # 1x1 conv without bias + BN scale and shift


def stage_channels(depth: int, width: int) -> list[tuple[int, int, int]]:
    """(input channels, output channels, blocks) per stage, from Table 1."""
    expansion = 4 if depth >= 50 else 1
    out, c_in = [], width
    for i, blocks in enumerate(BLOCKS[depth]):
        c_out = width * 2**i * expansion
        out.append((c_in, c_out, blocks))
        c_in = c_out
    return out


@pytest.mark.parametrize("depth", [18, 50])
def test_shortcut_options_parameter_counts(depth):
    width = 8
    counts = {s: num_params(on_meta(ResNet, depth, width=width, shortcut=s, num_classes=10))
              for s in "ABC"}
    plain = num_params(on_meta(ResNet, depth, width=width, residual=False, num_classes=10))
    stages = stage_channels(depth, width)
    # B projects where the shape changes: the first block of each stage whose channels or
    # stride change (layer1 of a basic net keeps both, so it has none).
    changed = [(c_in, c_out) for i, (c_in, c_out, _) in enumerate(stages) if i > 0 or c_in != c_out]
    assert counts["B"] - counts["A"] == sum(projection_params(a, b) for a, b in changed)
    # C adds a projection to every remaining block.
    extra_c = sum((n - 1) * projection_params(c, c) for _, c, n in stages)
    extra_c += sum(projection_params(c, c) for i, (c, c2, _) in enumerate(stages)
                   if i == 0 and c == c2)
    assert counts["C"] - counts["B"] == extra_c
    assert plain == counts["A"]  # option A and plain nets have no shortcut parameters


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
@pytest.mark.parametrize("residual", [True, False])
def test_options_output_shapes(shortcut, residual):
    model = ResNet(50, width=8, shortcut=shortcut, residual=residual, num_classes=3)
    cifar = ResNet(20, stem="cifar", shortcut=shortcut, residual=residual, num_classes=10)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)
    assert cifar(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    feats = cifar.forward_features(torch.randn(1, 3, 32, 32))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "res2": (16, 32, 32), "res3": (32, 16, 16), "res4": (64, 8, 8)}
    assert [s.stride for s in cifar.feature_specs.values()] == [1, 2, 4]
    if not residual:
        assert not any("downsample" in k for k in model.state_dict())


def test_option_a_subsamples_and_zero_pads():
    x = torch.randn(2, 4, 5, 7)
    y = ZeroPadShortcut(4, 8, stride=2)(x)
    assert y.shape == (2, 8, 3, 4)  # ceil(5/2), ceil(7/2): the size of a stride-2 3x3 conv
    torch.testing.assert_close(y[:, :4], x[:, :, ::2, ::2])
    assert (y[:, 4:] == 0).all()


# --- stride placement -------------------------------------------------------------------------

def test_stride_in_1x1_same_params_different_outputs():
    torch.manual_seed(0)
    a = ResNet(50, width=8, stride_in_1x1=False, num_classes=None).eval()
    b = ResNet(50, width=8, stride_in_1x1=True, num_classes=None).eval()
    assert num_params(a) == num_params(b)
    b.load_state_dict(a.state_dict(), strict=True)
    assert b.layer2[0].conv1.stride == (2, 2) and b.layer2[0].conv2.stride == (1, 1)
    assert a.layer2[0].conv1.stride == (1, 1) and a.layer2[0].conv2.stride == (2, 2)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        fa, fb = a.forward_features(x), b.forward_features(x)
    for name, stride in zip(["res2", "res3", "res4", "res5"], [4, 8, 16, 32]):
        assert fa[name].shape == fb[name].shape == (1, 8 * 2 ** (int(name[3]) - 2) * 4,
                                                    96 // stride, 64 // stride)
        assert a.feature_specs[name].stride == stride
    assert not torch.allclose(fa["res5"], fb["res5"])
    assert a(x).shape == (1, 256, 3, 2)  # without fc, forward returns res5


# --- norms, freezing, gradients ----------------------------------------------------------------

@pytest.mark.parametrize("requires_grad", [False, True])
def test_frozen_bn_equals_batchnorm_in_eval(requires_grad):
    bn = nn.BatchNorm2d(6)
    randomize_norms(bn)
    bn.eval()
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    x = torch.randn(2, 6, 5, 5, requires_grad=requires_grad)
    torch.testing.assert_close(frozen(x), bn(x))
    assert list(frozen.state_dict()) == list(bn.state_dict())
    assert not list(frozen.parameters())
    sd = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    FrozenBatchNorm2d(6).load_state_dict(sd, strict=True)  # files from before PyTorch 0.4.1


def test_frozen_bn_resnet_matches_torchvision():
    ref = torchvision.models.resnet18(weights=None).eval()
    randomize_norms(ref)
    ours = ResNet(18, norm="frozen_bn")  # stays frozen in train mode
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("freeze_at", [0, 1, 2, 5])
def test_freeze_at(freeze_at):
    model = ResNet(50, width=8, num_classes=3, freeze_at=freeze_at).train()
    frozen_prefixes = (["conv1.", "bn1."] if freeze_at >= 1 else []) + [
        f"layer{i}." for i in range(1, freeze_at)]
    stats_before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    (model(torch.randn(2, 3, 64, 64)) * torch.randn(2, 3)).sum().backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(tuple(frozen_prefixes))
        assert p.requires_grad != frozen, name
        assert (p.grad is None) == frozen, name
    for name, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            assert isinstance(m, FrozenBatchNorm2d) == (name + ".").startswith(
                tuple(frozen_prefixes)), name
    after = model.state_dict()
    for k, v in stats_before.items():  # frozen statistics do not move in train mode
        assert torch.equal(v, after[k]) == k.startswith(tuple(frozen_prefixes)), k
    with pytest.raises(ValueError, match="freeze_at must be in 0..5"):
        ResNet(18, freeze_at=6)


@pytest.mark.parametrize("kwargs", [
    dict(depth=50, width=8, shortcut="B"),
    dict(depth=18, width=8, shortcut="A", norm="gn", gn_groups=4),
    dict(depth=34, width=8, shortcut="C", norm="frozen_bn"),
    dict(depth=50, width=8, residual=False, stride_in_1x1=True),
    dict(depth=20, stem="cifar", norm="gn", gn_groups=8),
])
def test_every_trainable_parameter_gets_a_gradient(kwargs):
    torch.manual_seed(0)
    size = 32 if kwargs.get("stem") == "cifar" else 64
    model = ResNet(num_classes=3, **kwargs).train()
    (model(torch.randn(2, 3, size, size)) * torch.randn(2, 3)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_group_norm():
    model = ResNet(50, width=16, norm="gn", gn_groups=8, num_classes=None)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model.bn1.num_groups == 8
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
    with pytest.raises(ValueError, match="gn_groups=32 does not divide 16 channels"):
        ResNet(18, width=16, norm="gn")


def test_init_and_zero_init_residual():
    model = ResNet(50, width=16, zero_init_residual=True)
    conv = model.layer3[1].conv2  # 3x3, 64 -> 64: fan_out = 9 * 64 (He et al. 2015b)
    assert abs(conv.weight.std().item() / (2 / (9 * 64)) ** 0.5 - 1) < 0.1
    assert all((b.bn3.weight == 0).all() for b in model.layer2)
    assert (model.layer2[0].bn1.weight == 1).all() and (model.layer2[0].bn1.bias == 0).all()
    with pytest.raises(ValueError, match="plain net"):
        ResNet(18, residual=False, zero_init_residual=True)


# --- C4 split ------------------------------------------------------------------------------

def test_c4_split():
    model = ResNet(50, width=8, num_classes=None).eval()
    trunk, head = model.c4_split()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        shared = trunk(x)
        assert shared.shape == (1, trunk.out_channels, 6, 8) and trunk.stride == 16
        out = head(shared)
        assert out.shape == (1, head.out_channels, 3, 4) and head.stride == 2
        torch.testing.assert_close(out, model.forward_features(x)["res5"])
    keys = set(model.state_dict())
    assert set(trunk.state_dict()) | set(head.state_dict()) == keys  # same names, shared modules
    big_trunk, big_head = on_meta(ResNet, 101).c4_split()
    assert (big_trunk.out_channels, big_head.in_channels, big_head.out_channels) == (1024, 1024,
                                                                                      2048)
    with pytest.raises(ValueError, match="four-stage"):
        ResNet(20, stem="cifar").c4_split()


# --- argument errors -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(depth=42), "valid: 18, 34, 50, 101, 152"),
    (dict(depth=21, stem="cifar"), "6n\\+2"),
    (dict(depth=50, norm="ln"), "unknown norm 'ln'; valid: bn, frozen_bn, gn"),
    (dict(depth=50, shortcut="D"), "valid: A, B, C"),
    (dict(depth=50, stem="mnist"), "valid: imagenet, cifar"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        ResNet(**kwargs)
    assert "\n" not in str(info.value)


# --- weights -------------------------------------------------------------------------------

def _no_network(*args, **kwargs):
    raise OSError("network disabled in tests")


def _cache_torchvision(tmp_path, monkeypatch, weights, model) -> None:
    """``model``'s state dict where torchvision://NAME reads ``weights`` (nothing downloads)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    cached = tmp_path / "hub" / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    cached.parent.mkdir(parents=True)
    torch.save(model.state_dict(), cached)


def test_torchvision_spec_reads_hub_cache(tmp_path, monkeypatch):
    ref = torchvision.models.resnet18(weights=None)
    _cache_torchvision(tmp_path, monkeypatch, torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
                       ref)
    ours = ResNet(18)
    load_backbone_weights(ours, "torchvision://resnet18")
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    backbone = ResNet(18, num_classes=None, freeze_at=2)
    load_backbone_weights(backbone, "torchvision://resnet18.IMAGENET1K_V1", ignore_prefixes=("fc.",))
    assert torch.equal(backbone.bn1.running_var, ref.bn1.running_var)
    with pytest.raises(WeightsMismatchError, match="ignore_prefixes=\\('fc.',\\)"):
        load_backbone_weights(backbone, "torchvision://resnet18")


def test_torchvision_weights_imply_their_stride_placement(tmp_path, monkeypatch):
    # torchvision puts the stride in the 3x3: an MSRA-layout model (stride in the 1x1) has the
    # same shapes, so only the implied record can refuse it
    _cache_torchvision(tmp_path, monkeypatch, torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
                       torchvision.models.resnet50(weights=None))
    with pytest.raises(BackboneArchError, match="stride_in_1x1: file False, model True"):
        load_backbone_weights(ResNet(50, stride_in_1x1=True), "torchvision://resnet50")
    load_backbone_weights(ResNet(50), "torchvision://resnet50")


def test_backbone_file_records_its_arch(tmp_path):
    source = ResNet(50, width=8, num_classes=None, stride_in_1x1=True)
    randomize_norms(source)
    path = tmp_path / "backbone.pth"
    torch.save(backbone_file(source.state_dict(), source.arch()), path)
    assert read_torch_file(path, "file")["arch"]["stride_in_1x1"] is True
    target = ResNet(50, width=8, num_classes=None, stride_in_1x1=True)
    load_backbone_weights(target, str(path))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(target.eval().forward_features(x)["res5"],
                       source.eval().forward_features(x)["res5"])
    with pytest.raises(BackboneArchError, match="stride_in_1x1") as info:   # same shapes
        load_backbone_weights(ResNet(50, width=8, num_classes=None), str(path))
    assert "model.backbone" in str(info.value)
    plain = ResNet(50, width=8, num_classes=None, stride_in_1x1=True, residual=False)
    with pytest.raises(BackboneArchError, match="residual: file True, model False"):
        load_backbone_weights(plain, str(path))
    with pytest.raises(ValueError, match="unknown backbone arch keys"):
        backbone_file(source.state_dict(), {"depth": 50, "dilation": 2})


def test_torchvision_spec_missing_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_network)
    v2 = os.path.basename(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url)
    with pytest.raises(WeightsNotFoundError, match="hub cache") as info:
        load_backbone_weights(ResNet(50, width=8), "torchvision://resnet50.IMAGENET1K_V2")
    assert str(tmp_path / "hub" / "checkpoints" / v2) in str(info.value)
    with pytest.raises(ValueError, match="valid: IMAGENET1K_V1, IMAGENET1K_V2"):
        load_backbone_weights(ResNet(50, width=8), "torchvision://resnet50.IMAGENET1K_V9")
    with pytest.raises(ValueError, match="no model 'resnet42'"):
        load_backbone_weights(ResNet(50, width=8), "torchvision://resnet42")


def test_local_path_state_dict_or_checkpoint(tmp_path):
    source = ResNet(34, width=8, num_classes=3)
    randomize_norms(source)
    raw, ckpt = tmp_path / "raw.pth", tmp_path / "ckpt.pth"
    torch.save(source.state_dict(), raw)
    torch.save({"model": source.state_dict(), "iteration": 7}, ckpt)
    for path in (raw, ckpt):
        target = ResNet(34, width=8, num_classes=3, norm="frozen_bn")
        load_backbone_weights(target, str(path))
        for k, v in source.state_dict().items():
            assert torch.equal(target.state_dict()[k], v), k
    with pytest.raises(WeightsNotFoundError, match="not found"):
        load_backbone_weights(ResNet(34, width=8), str(tmp_path / "absent.pth"))


def test_weights_for_another_depth_are_a_clear_error(tmp_path):
    r50, r34 = tmp_path / "r50.pth", tmp_path / "r34.pth"
    torch.save(ResNet(50, width=8, num_classes=3).state_dict(), r50)
    torch.save(ResNet(34, width=8, num_classes=3).state_dict(), r34)
    with pytest.raises(WeightsMismatchError) as info:
        load_backbone_weights(ResNet(18, width=8, num_classes=3), str(r50))
    message = str(info.value)
    assert str(r50) in message and "another depth" in message
    assert "unexpected keys: layer1.0.conv3.weight" in message
    assert "wrongly shaped keys: layer1.0.conv1.weight (file (8, 8, 1, 1), model (8, 8, 3, 3))" \
        in message
    assert "... and" in message  # long lists are truncated
    with pytest.raises(WeightsMismatchError, match="missing keys: layer1.0.conv3.weight"):
        load_backbone_weights(ResNet(50, width=8, num_classes=3), str(r34))
