"""RoI pooling on the CPU as gathers over the table of feature vectors, equal to torchvision's
``roi_pool`` and ``roi_align`` and parallel over torch's intra-op threads, where torchvision's
CPU kernels loop over RoIs on one thread.

Shapes: N images, C channels, H x W feature map, R RoIs (rows [image index, x1, y1, x2, y2]),
S output size, B = R*S*S output bins. The table is the (N*H*W, C) view of NHWC features; the
results are (R, C, S, S) in channels_last layout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_pool

# torchvision's roi_pool starts every bin's running max at -FLT_MAX and takes a value only when
# strictly greater: NaN, -inf and -FLT_MAX itself are never taken, and a non-empty bin of only
# those outputs -FLT_MAX and passes no gradient.
FLT_LOWEST = torch.finfo(torch.float32).min


def _feature_table(features: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C) float32 rows of feature vectors; a view for channels_last."""
    n, c, h, w = features.shape
    return features.float().permute(0, 2, 3, 1).reshape(n * h * w, c).contiguous()


def _pooled_to_nchw(pooled: Tensor, num_rois: int, size: int, dtype: torch.dtype) -> Tensor:
    """(R*S*S, C) -> (R, C, S, S) in channels_last layout (no copy)."""
    return pooled.view(num_rois, size, size, -1).permute(0, 3, 1, 2).to(dtype)


def _bilinear_axis(coords: Tensor, size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's bilinear_interpolate along one axis: (..., ) sample coordinates ->
    low index, high index, low weight, high weight; weights 0 outside [-1, size]."""
    inside = (coords >= -1) & (coords <= size)
    coords = coords.clamp(min=0)
    low = coords.floor().long().clamp(max=size - 1)
    high = (low + 1).clamp(max=size - 1)
    coords = torch.where(low >= size - 1, low.to(coords.dtype), coords)
    frac = coords - low
    return low, high, (1 - frac) * inside, frac * inside


def roi_align_gather(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
                     sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign equal to ``torchvision.ops.roi_align``, as one weighted gather (embedding_bag).

    Each output bin is a weighted sum of at most G*G*4 feature vectors (G samples per bin side,
    4 bilinear corners), so pooling is ``embedding_bag`` over the (N*H*W, C) table of feature
    vectors; its backward is a parallel scatter-add, where torchvision's CPU kernel loops over
    RoIs on one thread (10x slower at R-50 C4 sizes). The table is a free view of NHWC
    (channels_last) features, and the result is (R, C, S, S) in channels_last layout.
    Adaptive sampling (``sampling_ratio <= 0``: G = ceil(RoI side / S) per RoI) pads every RoI
    to the largest G with zero weights; that needs the largest G on the host.
    """
    num_rois, (h, w), size = rois.shape[0], features.shape[-2:], output_size
    boxes = rois[:, 1:].float() * spatial_scale - (0.5 if aligned else 0.0)
    roi_w, roi_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if not aligned:  # legacy RoIAlign: RoIs at least 1x1 feature cell
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    bin_w, bin_h = roi_w / size, roi_h / size                                   # (R,)
    if sampling_ratio > 0:
        grid_w = grid_h = torch.full_like(bin_w, sampling_ratio)
        g = sampling_ratio
    else:
        grid_w, grid_h = bin_w.ceil(), bin_h.ceil()
        g = max(int(torch.max(grid_w.max(), grid_h.max()).item()), 1) if num_rois else 1
    steps = torch.arange(g, device=rois.device, dtype=torch.float32)
    bins = torch.arange(size, device=rois.device, dtype=torch.float32)[None, :, None]
    grid_h, grid_w = grid_h[:, None, None], grid_w[:, None, None]             # (R, 1, 1)
    # Sample coordinates (R, S, G): bin start + (i + 0.5) * bin / grid, for i < grid (else
    # weight 0); clamp(min=1) only keeps empty aligned RoIs (grid 0) finite.
    ys = boxes[:, 1, None, None] + bin_h[:, None, None] * (bins + (steps + 0.5) / grid_h.clamp(1))
    xs = boxes[:, 0, None, None] + bin_w[:, None, None] * (bins + (steps + 0.5) / grid_w.clamp(1))
    y0, y1, wy0, wy1 = _bilinear_axis(ys, h)
    x0, x1, wx0, wx1 = _bilinear_axis(xs, w)
    wy0, wy1 = wy0 * (steps < grid_h), wy1 * (steps < grid_h)
    wx0, wx1 = wx0 * (steps < grid_w), wx1 * (steps < grid_w)
    # Corners (R, S, G, 1, 1, 2, 1) + (R, 1, 1, S, G, 1, 2) -> (R, S, G, S, G, 2, 2).
    iy = torch.stack((y0, y1), -1)[:, :, :, None, None, :, None]
    ix = torch.stack((x0, x1), -1)[:, None, None, :, :, None, :]
    wy = torch.stack((wy0, wy1), -1)[:, :, :, None, None, :, None]
    wx = torch.stack((wx0, wx1), -1)[:, None, None, :, :, None, :]
    count = (grid_h * grid_w).clamp(min=1)[..., None, None, None, None]     # samples per bin
    base = rois[:, 0].long()[:, None, None, None, None, None, None] * (h * w)
    index = (base + iy * w + ix).permute(0, 1, 3, 2, 4, 5, 6).reshape(num_rois * size * size, -1)
    weight = (wy * wx / count).permute(0, 1, 3, 2, 4, 5, 6).reshape(num_rois * size * size, -1)
    pooled = _WeightedGather.apply(_feature_table(features), index, weight)   # (B, C)
    return _pooled_to_nchw(pooled, num_rois, size, features.dtype)


class _WeightedGather(torch.autograd.Function):
    """(T, C) table, (B, K) row indices and weights -> (B, C) weighted row sums, one
    ``embedding_bag``. The backward is the transposed gather: the (index, bin, weight) triples
    sorted by table row, then one ``embedding_bag`` over the rows of the (B, C) gradient per
    table row. embedding_bag's own backward accumulates the K*B weighted rows serially, 3-5x
    slower on a small feature map that many RoIs sample (the demo's 256 RoIs on 16 x 16)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(index, weight)
        ctx.rows = table.shape[0]
        return F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        index, weight = ctx.saved_tensors
        flat = index.reshape(-1)
        keys = flat.int() if ctx.rows < 2**31 else flat     # int32 sorts in half the time
        order = keys.argsort(stable=True)
        bins = torch.div(order, index.shape[1], rounding_mode="floor")
        counts = torch.bincount(flat, minlength=ctx.rows)
        offsets = torch.cumsum(counts, 0) - counts
        grad_table = F.embedding_bag(bins, grad.contiguous(), offsets,
                                     per_sample_weights=weight.reshape(-1)[order], mode="sum")
        return grad_table, None, None


def _round_half_away(v: Tensor) -> Tensor:
    """C's round(), which the kernel uses: halves away from zero (torch.round: to even)."""
    whole = v.trunc()
    return whole + v.sign() * ((v - whole).abs() >= 0.5)


def roi_pool_bins(rois: Tensor, output_size: int, spatial_scale: float, height: int,
                  width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """torchvision's roi_pool bins, in its float32 arithmetic: (R, 5) rois -> (R, S) first row,
    end row, first column, end column of each bin in feature cells, clipped to the map (a bin
    is empty where end <= first)."""
    scale = torch.tensor(spatial_scale, dtype=torch.float32, device=rois.device)
    corners = _round_half_away(rois[:, 1:].float() * scale).long()        # x1, y1, x2, y2
    steps = torch.arange(output_size + 1, dtype=torch.float32, device=rois.device)
    edges = []
    for start, end, limit in ((corners[:, 1], corners[:, 3], height),
                              (corners[:, 0], corners[:, 2], width)):
        bin_size = (end - start + 1).clamp(min=1).float() / output_size  # malformed RoIs: 1 cell
        first = (steps[:-1] * bin_size[:, None]).floor().long() + start[:, None]
        last = (steps[1:] * bin_size[:, None]).ceil().long() + start[:, None]
        edges += [first.clamp(0, limit), last.clamp(0, limit)]
    return edges[0], edges[1], edges[2], edges[3]


def window_max_tables(x: Tensor, rows: int, cols: int, with_index: bool
                      ) -> tuple[Tensor, Tensor | None]:
    """Max over every window of up to ``rows`` x ``cols`` cells, and where the max is.

    x (N, H, W, C) -> values (rows*cols*N*H*W + 1, C), whose row ((i*cols + j)*N + n)*H*W +
    y*W + x0 holds max x[n, y:y+i+1, x0:x0+j+1] (where that window fits in the map) and whose
    last row is zeros (empty bins); with ``with_index``, int32 ``index`` of the same shape: the
    row n*H*W + y'*W + x' of the window's first maximum in row-major order (torchvision's tie
    rule), N*H*W in the last row.
    """
    n, h, w, c = x.shape
    values = x.new_empty(rows * cols * n * h * w + 1, c)
    values[-1] = 0
    grid = values[:-1].view(rows, cols, n, h, w, c)
    grid[0, 0] = x
    index = index_grid = taken = None
    if with_index:
        index = torch.empty(values.shape, dtype=torch.int32, device=x.device)
        index[-1] = n * h * w
        index_grid = index[:-1].view(rows, cols, n, h, w, c)
        index_grid[0, 0] = torch.arange(n * h * w, dtype=torch.int32, device=x.device
                                        ).view(n, h, w, 1)
        taken = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    for i in range(rows):
        for j in range(cols):
            if i == j == 0:
                continue
            # A window grows from a smaller one by its last column (first row) or its last
            # row: cells later in row-major order, which take over only where strictly greater.
            smaller, added = ((i - 1, j, 0, 0), (0, j, i, 0)) if i else ((0, j - 1, 0, 0),
                                                                        (0, 0, 0, j))

            def part(t: Tensor, a: int, b: int, dy: int, dx: int) -> Tensor:
                return t[a, b, :, dy: dy + h - i, dx: dx + w - j]

            old, new = part(grid, *smaller), part(grid, *added)
            if index_grid is not None:
                # the added cells' argmax is past the smaller window's, so where the added
                # cells take over, the larger index is theirs (cheaper than torch.where)
                greater = torch.gt(new, old, out=taken[:, : h - i, : w - j])
                out = torch.mul(part(index_grid, *added), greater,
                                out=part(index_grid, i, j, 0, 0))
                torch.maximum(out, part(index_grid, *smaller), out=out)
            torch.maximum(old, new, out=part(grid, i, j, 0, 0))
    return values, index


def largest_bin(bins: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[int, int]:
    """Rows x columns of the largest bin of :func:`roi_pool_bins`, at least 1 x 1."""
    y0, y1, x0, x1 = bins
    if not y0.numel():
        return 1, 1
    return max(int((y1 - y0).max()), 1), max(int((x1 - x0).max()), 1)


def _bin_rows(bins: tuple[Tensor, Tensor, Tensor, Tensor], image: Tensor,
              windows: tuple[int, int], shape: tuple[int, int, int]) -> Tensor:
    """(R, S) bin edges, (R,) image indices -> (B,) rows of :func:`window_max_tables` built
    for ``windows`` (rows, columns); empty bins take its last row (zeros)."""
    y0, y1, x0, x1 = bins
    n, h, w = shape
    height, width = (y1 - y0)[:, :, None], (x1 - x0)[:, None, :]          # (R, S, 1), (R, 1, S)
    window = (height - 1) * windows[1] + width - 1
    row = (window * n + image[:, None, None]) * (h * w) + (y0 * w)[:, :, None] + x0[:, None]
    empty = (height <= 0) | (width <= 0)
    return row.masked_fill_(empty, windows[0] * windows[1] * n * h * w).view(-1)


class _RoIPoolGather(torch.autograd.Function):
    """Forward: one row gather from :func:`window_max_tables`; backward: the bins' gradients
    added at their argmax, channel by channel (each channel's (N*H*W,) slice stays in cache),
    in RoI, row, column order like torchvision's kernel."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, output_size: int,
                spatial_scale: float) -> Tensor:
        n, c, h, w = features.shape
        num_rois, size = rois.shape[0], output_size
        bins = roi_pool_bins(rois, size, spatial_scale, h, w)
        windows = largest_bin(bins)
        floor = torch.tensor(FLT_LOWEST).to(features.dtype)      # -inf in bf16 and fp16
        x = features.permute(0, 2, 3, 1)                        # (N, H, W, C)
        taken = x > floor
        all_taken = bool(taken.all())
        if not all_taken:
            x = torch.where(taken, x, floor)                    # only values the kernel takes
        values, index = window_max_tables(x, *windows, ctx.needs_input_grad[0])
        bin_rows = _bin_rows(bins, rois[:, 0].long(), windows, (n, h, w))
        pooled = values.index_select(0, bin_rows)               # (B, C)
        if index is not None:
            argmax = index.index_select(0, bin_rows)
            if not all_taken:                                   # nothing taken: no gradient
                argmax.masked_fill_(pooled == floor, n * h * w)
            ctx.save_for_backward(argmax)
        ctx.shape, ctx.dtype = (n, c, h, w), features.dtype
        return pooled.view(num_rois, size, size, c).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        argmax, = ctx.saved_tensors                             # (B, C) int32
        n, c, h, w = ctx.shape
        num_rois, size = grad.shape[0], grad.shape[-1]
        grad_table = grad.new_zeros(c, n * h * w + 1, dtype=torch.float32)   # + dump column
        chunk = max(1, 2 ** 22 // (c * size * size))   # 16 MB of index: kept by malloc, unlike
        # blocks past its 32 MB mmap threshold, which fault their pages in anew each time
        for start in range(0, num_rois, chunk):
            g = grad[start: start + chunk].float().permute(1, 0, 2, 3).reshape(c, -1)
            g = g.contiguous()                  # from channels_last: a blocked transpose
            at = argmax[start * size * size: (start + chunk) * size * size].t().contiguous()
            grad_table.scatter_add_(1, at, g)
        grad_features = grad_table[:, :-1].view(c, n, h, w).permute(1, 0, 2, 3)
        return grad_features.to(ctx.dtype), None, None, None


def roi_pool_gather(features: Tensor, rois: Tensor, output_size: int,
                    spatial_scale: float) -> Tensor:
    """RoI max pooling equal to ``torchvision.ops.roi_pool`` in values and gradients.

    Every bin of torchvision's kernel (scaled corners rounded half away from zero, bins
    floor(i * bin) .. ceil((i + 1) * bin) cells from the RoI start, clipped to the map; empty
    bins 0) is a window of at most h x w cells, so the maxima of all windows of up to the
    largest h x w (:func:`window_max_tables`) make pooling one row gather, and its backward a
    scatter-add; both run on all intra-op threads. Pools in the features' dtype, exact there as
    a max only selects (float64 is pooled in float32, as torchvision's op after ``.float()``).

    Args:
        features: (N, C, H, W) on the CPU.
        rois: (R, 5) [image index, x1, y1, x2, y2] in image pixels.

    Returns:
        (R, C, S, S) in channels_last layout.
    """
    if features.dtype == torch.float64:
        return _RoIPoolGather.apply(features.float(), rois, output_size,
                                    spatial_scale).to(features.dtype)
    return _RoIPoolGather.apply(features, rois, output_size, spatial_scale)


# A table element costs about what an output element of the gather costs (both mostly the
# first touch of fresh pages), torchvision's loop 4-6 times that at the C4 head's sizes
# (benchmarks/roi_pool_speed.py). On 1024 x 38 x 63 features the gather overtook it from ~40
# RoIs (tables ~6x the output) in inference and from ~130 (~2x) with the backward, which adds
# argmax tables: it runs where its tables are at most TABLE_RATIO times the output, half that
# with gradients; this also bounds their memory.
TABLE_RATIO = 4


def roi_max_pool(features: Tensor, rois: Tensor, output_size: int,
                 spatial_scale: float) -> Tensor:
    """``torchvision.ops.roi_pool``'s values and gradients in the features' dtype (R, C, S, S):
    :func:`roi_pool_gather` where it is the faster, else torchvision's op, in float32 (it has
    no bf16 kernel nor autocast rule).

    The gather runs on CPU features in channels_last layout (the detector's default), which its
    result keeps; NCHW features want NCHW maps, and turning its result into those costs about
    what it saves.
    """
    n, _, h, w = features.shape
    nhwc = features.is_contiguous(memory_format=torch.channels_last) and not (
        features.is_contiguous())
    if features.device.type == "cpu" and nhwc:
        rows, cols = largest_bin(roi_pool_bins(rois, output_size, spatial_scale, h, w))
        training = features.requires_grad and torch.is_grad_enabled()
        ratio = TABLE_RATIO / 2 if training else TABLE_RATIO
        if rows * cols * n * h * w <= ratio * len(rois) * output_size ** 2:
            return roi_pool_gather(features, rois, output_size, spatial_scale)
    pooled = roi_pool(features.float(), rois.float(), output_size, spatial_scale)
    return pooled.to(features.dtype)
