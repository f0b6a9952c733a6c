"""Training speed of detres ResNets vs torchvision's (same ops, so the ratio should be ~1).

Measures forward + backward images/s of ResNet-50 and ResNet-101 (ours, ``stride_in_1x1=False``,
and ``torchvision.models.resnetXX``) on the same random batch, same thread count, in one process.
Repetitions alternate ours / torchvision so that drift in machine load hits both; the median of
the repetitions is reported after warm-up, and the ratio of the fastest repetitions too (less
sensitive to other processes on a shared machine).

    python benchmarks/resnet_speed.py                       # CPU defaults: a few minutes on 2 cores
    python benchmarks/resnet_speed.py --device cuda --batch 32 --size 224 --reps 20

Goal: ours / torchvision >= 0.97 for every depth.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torchvision

from detres.models.resnet import ResNet


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[50, 101])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=160, help="square input side in pixels")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per model")
    parser.add_argument("--iters", type=int, default=2, help="forward+backward steps per rep")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def step(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()


def timed(model: torch.nn.Module, x: torch.Tensor, iters: int, device: torch.device) -> float:
    """Seconds for ``iters`` forward+backward steps."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step(model, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(depth: int, args: argparse.Namespace,
            device: torch.device) -> dict[str, list[float]]:
    """Seconds per repetition of ours and torchvision's for one depth, with identical weights."""
    ref = getattr(torchvision.models, f"resnet{depth}")(weights=None).to(device).train()
    ours = ResNet(depth, stride_in_1x1=False, norm="bn").to(device).train()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    for _ in range(args.warmup):
        step(ours, x)
        step(ref, x)
    times: dict[str, list[float]] = {"ours": [], "torchvision": []}
    for rep in range(args.reps):
        # Alternate which one goes first, so neither always follows the other's cache state.
        order = [("ours", ours), ("torchvision", ref)]
        for name, model in order if rep % 2 == 0 else order[::-1]:
            times[name].append(timed(model, x, args.iters, device))
    return times


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device} "
          f"({hardware or platform.machine()}), threads {torch.get_num_threads()}, "
          f"batch {args.batch}, size {args.size}, reps {args.reps} x {args.iters} iters")
    print(f"{'model':<12}{'ours img/s':>12}{'tv img/s':>12}{'ours/tv':>10}{'best/best':>11}")
    ratios = []
    images = args.batch * args.iters
    for depth in args.depths:
        times = compare(depth, args, device)
        ours = images / statistics.median(times["ours"])
        theirs = images / statistics.median(times["torchvision"])
        best = min(times["torchvision"]) / min(times["ours"])
        ratios.append(ours / theirs)
        print(f"{'ResNet-' + str(depth):<12}{ours:>12.2f}{theirs:>12.2f}{ours / theirs:>10.3f}"
              f"{best:>11.3f}")
    verdict = "ok" if min(ratios) >= 0.97 else "BELOW GOAL"
    print(f"min ratio {min(ratios):.3f} (goal >= 0.97): {verdict}")


if __name__ == "__main__":
    main()
