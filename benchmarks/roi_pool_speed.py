"""RoI max pooling on the CPU: torchvision's ``roi_pool`` (one thread, a loop over RoIs) against
``detres.models.roi_ops.roi_pool_gather`` (window-max tables and one gather, all threads).

The C4 head's case (Appendix A): conv4_x features of a 600x1000 image, 1024 x 38 x 63, pooled
to 14 x 14 at spatial scale 1/16, for 300 (test) and 2000 RoIs; boxes with sides log-uniform
from 16 pixels to the whole image, clipped to it, like proposals. Forward under no_grad
(inference), and forward + backward (training) with the features requiring grad, each with
the pooled maps' change to the trunk's layout as the head makes it (channels_last by default,
as the detector's; torchvision's op returns NCHW maps, ours channels_last). Repetitions
alternate the two ops, so that drift in machine load hits both; the median of them is
reported, with the load average, since other processes may share the machine. A case stops
repeating once it has taken --budget seconds: torchvision's 2000 RoIs take ~10 s a pass on 2
cores of an AMD EPYC, where the default run takes 1.5-2 minutes (most of it those passes).

    python benchmarks/roi_pool_speed.py
    python benchmarks/roi_pool_speed.py --rois 100 300 1000 2000 --threads 1 2 4 --reps 5
    python benchmarks/roi_pool_speed.py --rois 300 --layout nchw   # why NCHW keeps torchvision
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torchvision.ops import roi_pool

from detres.cpu import cpu_flags, cpuinfo
from detres.models.roi_ops import roi_pool_gather


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rois", type=int, nargs="+", default=[300, 2000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per op, at most")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="seconds after which a case stops repeating (at least one)")
    parser.add_argument("--channels", type=int, default=1024)
    parser.add_argument("--image", type=int, nargs=2, default=[600, 1000], metavar=("H", "W"))
    parser.add_argument("--pooled", type=int, default=14)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last",
                        help="the trunk's layout, which the head hands the pooled maps on in")
    return parser.parse_args()


def proposal_boxes(n: int, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """(n, 5) RoIs of image 0: sides log-uniform in [16, image side], clipped to the image."""
    h, w = size
    sides = torch.exp(torch.rand(n, 2, generator=g) * torch.log(torch.tensor([w / 16, h / 16])))
    sides = 16 * sides
    centres = torch.rand(n, 2, generator=g) * torch.tensor([w, h])
    limit = torch.tensor([w, h])
    boxes = torch.cat((centres - sides / 2, centres + sides / 2), dim=1)
    boxes = torch.minimum(boxes.clamp(min=0), limit.repeat(2))
    return torch.cat((torch.zeros(n, 1), boxes), dim=1)


def median_seconds(fns: dict[str, Callable[[], None]], reps: int, budget: float
                   ) -> tuple[dict[str, float], int]:
    """Median seconds of each op over up to ``reps`` alternating repetitions, fewer once they
    have taken ``budget`` seconds; and the number of repetitions."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps):
        order = list(fns.items())
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        if sum(map(sum, times.values())) > budget:
            break
    return {name: statistics.median(t) for name, t in times.items()}, rep + 1


def make_ops(features: torch.Tensor, rois: torch.Tensor, args: argparse.Namespace,
             train: bool) -> dict[str, Callable[[], None]]:
    scale = 1 / args.stride
    layout = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    features = features.contiguous(memory_format=layout)            # the trunk's output
    grad = torch.randn(len(rois), features.shape[1], args.pooled, args.pooled)
    grad = grad.contiguous(memory_format=layout)

    def run(op: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            if not train:
                with torch.no_grad():
                    op(features, rois, args.pooled, scale).contiguous(memory_format=layout)
                return
            x = features.detach().requires_grad_()
            op(x, rois, args.pooled, scale).contiguous(memory_format=layout).backward(grad)
        return step

    return {"torchvision": run(roi_pool), "ours": run(roi_pool_gather)}


def main() -> None:
    args = parse_args()
    flags = cpu_flags()
    native = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    print(f"CPU: {cpuinfo().get('model name', '?')}, {os.cpu_count()} logical cores, "
          f"bf16 flags: {', '.join(native) or 'none'}; torch {torch.__version__}")
    print(f"load average at the start {os.getloadavg()[0]:.1f}")
    h, w = (-(-s // args.stride) for s in args.image)     # conv4_x rounds up: 38 x 63
    g = torch.Generator().manual_seed(0)
    features = torch.randn(1, args.channels, h, w, generator=g)
    print(f"features 1 x {args.channels} x {h} x {w}, pooled {args.pooled}, {args.layout} "
          f"maps, median of up to {args.reps} repetitions")
    for train in (False, True):                 # warm-up: first calls, allocator
        median_seconds(make_ops(features, proposal_boxes(50, tuple(args.image), g), args, train),
                       1, 0)
    print(f"{'pass':<18}{'RoIs':>6}{'threads':>8}{'torchvision s':>15}{'ours s':>9}{'ratio':>7}"
          f"{'reps':>6}")
    for train in (False, True):
        for num_rois in args.rois:
            rois = proposal_boxes(num_rois, tuple(args.image), g)
            for threads in args.threads:
                torch.set_num_threads(threads)
                ops = make_ops(features, rois, args, train)
                t, reps = median_seconds(ops, args.reps, args.budget)
                name = "forward+backward" if train else "forward"
                print(f"{name:<18}{num_rois:>6}{threads:>8}{t['torchvision']:>15.3f}"
                      f"{t['ours']:>9.3f}{t['torchvision'] / t['ours']:>7.2f}{reps:>6}",
                      flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f} (ratio = torchvision / ours)")


if __name__ == "__main__":
    main()
