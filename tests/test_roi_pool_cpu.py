"""RoI max pooling on the CPU (detres.models.roi_ops) against torchvision.ops.roi_pool: equal
values and gradients, bit for bit, on boxes that exercise the kernel's rounding, clipping, empty
bins and ties, and the C4 head's output unchanged."""
import pytest
import torch
from torch import nn
from torchvision.ops import roi_pool

from detres.models import roi_ops
from detres.models.roi_head import C4RoIHead
from detres.models.roi_ops import roi_max_pool, roi_pool_gather


def hard_rois(num: int, stride: int, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """(num, 5) RoIs over 2 images: random boxes partly and wholly past the borders, with x2 < x1
    or y2 < y1, smaller than a cell, on the borders, and on half cells (C's round() and
    torch.round disagree there)."""
    h, w = size[0] * stride, size[1] * stride
    corners = torch.rand(num, 4, generator=g) * torch.tensor([w, h, w, h]) * 1.4 - 0.2 * w
    corners[: num // 4] = torch.randint(-4, 2 * max(size) + 4, (num // 4, 4), generator=g) * (
        stride / 2.0)                                               # multiples of half a cell
    corners[num // 4: num // 3, 2:] = corners[num // 4: num // 3, :2] + 0.3 * stride   # tiny
    corners[-4:] = torch.tensor([[0.0, 0, w, h], [w - stride / 2, h - stride / 2, w, h],
                                 [2 * w, 0, 3 * w, h], [-stride / 2, -stride / 2, 0, 0]])
    image = torch.randint(2, (num, 1), generator=g).float()
    return torch.cat((image, corners), dim=1)


@pytest.mark.parametrize("scale", [1 / 16, 1 / 8])
@pytest.mark.parametrize("output_size", [7, 14])
@pytest.mark.parametrize("ties", [False, True])
def test_roi_pool_gather_equals_torchvision(scale, output_size, ties):
    """Values with torch.equal; gradients of integer upstream gradients (exact sums) on
    overlapping RoIs, so each goes to the same (first in row-major order) maximum."""
    g = torch.Generator().manual_seed(output_size + int(ties))
    size = (9, 11)
    if ties:
        features = torch.randint(0, 3, (2, 6, *size), generator=g).float()
    else:
        features = torch.randn(2, 6, *size, generator=g)
    rois = hard_rois(80, round(1 / scale), size, g)
    ours_in, ref_in = features.clone().requires_grad_(), features.clone().requires_grad_()
    got = roi_pool_gather(ours_in, rois, output_size, scale)
    expected = roi_pool(ref_in, rois, output_size, scale)
    assert torch.equal(got, expected)
    assert (expected == 0).any()                  # some empty bins among them
    grad = torch.randint(-4, 5, expected.shape, generator=g).float()
    got.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours_in.grad, ref_in.grad)


def test_corners_round_half_away_from_zero_like_c():
    """x 8 / 16 = 0.5 -> cell 1 (torch.round: 0), 40 / 16 = 2.5 -> 3 (torch.round: 2): the one
    bin is cells 1..3 in both axes, whose max in an increasing map is cell (3, 3)."""
    features = torch.arange(25.0).view(1, 1, 5, 5)
    rois = torch.tensor([[0.0, 8, 8, 40, 40]])
    assert roi_pool_gather(features, rois, 1, 1 / 16).item() == features[0, 0, 3, 3] == 18
    assert torch.equal(roi_pool_gather(features, rois, 2, 1 / 16),
                       roi_pool(features, rois, 2, 1 / 16))


def test_nan_inf_and_lowest_are_never_the_max():
    """The kernel keeps values strictly above -FLT_MAX: bins of only NaN, -inf or -FLT_MAX
    output -FLT_MAX and pass no gradient."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 3, 8, 10, generator=g)
    features[0, :, 2:5, 3:6] = float("nan")
    features[1, 1] = float("-inf")
    features[1, 2, :4] = torch.finfo(torch.float32).min
    rois = hard_rois(60, 16, (8, 10), g)
    ours_in, ref_in = features.clone().requires_grad_(), features.clone().requires_grad_()
    got, expected = roi_pool_gather(ours_in, rois, 7, 1 / 16), roi_pool(ref_in, rois, 7, 1 / 16)
    assert torch.equal(got, expected)             # no NaN in either
    assert (expected == torch.finfo(torch.float32).min).any()
    grad = torch.randint(-4, 5, expected.shape, generator=g).float()
    got.backward(grad)
    expected.backward(grad)
    assert torch.equal(ours_in.grad, ref_in.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_pool_like_torchvision_in_float32(dtype):
    """Output (and gradient) dtype and values as the head's former roi_pool(features.float())
    .to(features.dtype); bf16's -FLT_MAX is -inf."""
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 4, 7, 9, generator=g).to(dtype)
    features[1, 0] = float("-inf")
    rois = hard_rois(40, 16, (7, 9), g)
    ours_in, ref_in = features.clone().requires_grad_(), features.clone().requires_grad_()
    got = roi_pool_gather(ours_in, rois, 5, 1 / 16)
    expected = roi_pool(ref_in.float(), rois, 5, 1 / 16).to(dtype)
    assert got.dtype == dtype and torch.equal(got, expected)
    grad = torch.randint(-4, 5, expected.shape, generator=g).to(dtype)
    got.backward(grad)
    expected.backward(grad)
    assert ours_in.grad.dtype == dtype and torch.equal(ours_in.grad, ref_in.grad)


def test_zero_rois():
    features = torch.randn(1, 4, 6, 8, requires_grad=True)
    for op in (roi_pool_gather, roi_max_pool):
        pooled = op(features, torch.zeros(0, 5), 14, 1 / 16)
        assert pooled.shape == (0, 4, 14, 14)
        pooled.sum().backward()
        assert torch.equal(features.grad, torch.zeros_like(features))


def test_dispatch_gathers_on_channels_last_where_the_tables_are_small(monkeypatch):
    calls = []
    monkeypatch.setattr(roi_ops, "roi_pool_gather",
                        lambda *args: calls.append(len(args[1])) or roi_pool_gather(*args))
    features = torch.randn(1, 2, 30, 40).contiguous(memory_format=torch.channels_last)
    many = torch.tensor([[0.0, 0, 0, 640, 480]]).repeat(100, 1)
    roi_max_pool(features, many, 14, 1 / 16)        # 4 x 4 windows x 1200 cells <= 4 x 19600 bins
    roi_max_pool(features, many[:2], 14, 1 / 16)    # > 4 x 392 bins: torchvision's loop
    roi_max_pool(features.contiguous(), many, 14, 1 / 16)          # NCHW: torchvision's
    assert calls == [100]


def tiny_head(roi_op: str) -> C4RoIHead:
    torch.manual_seed(0)
    res5 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
    res5.out_channels = 16
    return C4RoIHead(res5, num_classes=3, out_channels=16, roi_op=roi_op, pooled_size=14)


def test_head_output_unchanged_with_roi_pool(monkeypatch):
    """The head's logits and deltas, values and gradients, equal those of torchvision's op, with
    channels_last features (the gather) and NCHW ones."""
    calls = []
    monkeypatch.setattr(roi_ops, "roi_pool_gather",
                        lambda *args: calls.append(1) or roi_pool_gather(*args))
    g = torch.Generator().manual_seed(5)
    head = tiny_head("pool")
    features = torch.randint(0, 4, (2, 8, 10, 12), generator=g).float()
    rois = hard_rois(60, 16, (10, 12), g)
    for layout in (torch.contiguous_format, torch.channels_last):
        ours_in = features.clone().contiguous(memory_format=layout).requires_grad_()
        ref_in = features.clone().contiguous(memory_format=layout).requires_grad_()
        logits, deltas = head.predict(ours_in, rois)
        x = roi_pool(ref_in, rois, 14, 1 / 16).contiguous(memory_format=layout)
        ref_logits, ref_deltas = head.box_predictor(head.res5(x).mean(dim=(2, 3)))
        assert torch.equal(logits, ref_logits) and torch.equal(deltas, ref_deltas)
        (logits.sum() + deltas.sum()).backward()
        (ref_logits.sum() + ref_deltas.sum()).backward()
        assert torch.equal(ours_in.grad, ref_in.grad)
    assert len(calls) == 1
