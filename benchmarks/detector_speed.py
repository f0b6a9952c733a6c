"""Speed of our C4 Faster R-CNN against torchvision's FasterRCNN built from the same parts.

Both detectors share weights and settings: the same ResNet trunk (conv1..conv4_x) and conv5_x
box head (deep copies), RoIAlign 14x14 with sampling_ratio 2 and aligned=False (torchvision's
MultiScaleRoIAlign), the same RPN head, anchors and NMS settings, the same pixel mean/std.
torchvision's transform gets inputs of the final size and its resize is switched off, so it
only normalizes and pads, as ours does. Both RPNs run in full (head, decoding, proposal
selection, losses), but their outputs are replaced by the same FIXED boxes (300 per image at
test, 2000 in training): a random-weight RPN proposes nothing useful, and the head's cost
depends on the number of RoIs.

Timings are interleaved (ours, torchvision, ours, ...) in one process with the same threads;
the median of ``--iters`` runs after ``--warmup`` is reported, with ratio = ours / torchvision
(goal: <= 0.9). ``--variants`` picks the models: ours as ``build_detector`` builds it
(channels_last), with frozen BN folded into the convolutions (``fused``, inference only), in
NCHW layout like torchvision (``nchw``), and torchvision with channels_last weights for
reference. ``--profile`` prints torch.profiler's top operators for each model.

    python benchmarks/detector_speed.py --device cpu --depth 50 --width 32 --size 320x512 --iters 3
    python benchmarks/detector_speed.py --device cuda --depth 101 --size 600x1000 --iters 20
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN

from detres.config import replace as replace_config
from detres.models.faster_rcnn import FasterRCNN
from detres.structures import ImageBatch, Targets
from detres.tasks.detection.build import build_detector
from detres.tasks.detection.config import DetModelConfig


def _load_test_helpers():
    """tests/helpers.py, where the torchvision twin lives (it is the detector tests' oracle)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "helpers.py"
    spec = importlib.util.spec_from_file_location("detres_test_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


torchvision_twin = _load_test_helpers().torchvision_twin


VARIANTS = ("torchvision", "ours", "ours+fused", "ours-nchw", "ours-nchw+fused", "torchvision+cl")


def fix_proposals(model: nn.Module, proposals: dict[bool, list[torch.Tensor]]) -> None:
    """Runs the model's own proposal selection, then hands ``proposals[training]`` onwards."""
    if isinstance(model, FasterRCNN):
        select = model.rpn.select_proposals

        def fixed_ours(*args, **kwargs):
            select(*args, **kwargs)
            return proposals[model.training]
        model.rpn.select_proposals = fixed_ours
    else:
        select_tv = model.rpn.filter_proposals

        def fixed_tv(*args, **kwargs):
            _, scores = select_tv(*args, **kwargs)
            return proposals[model.training], scores
        model.rpn.filter_proposals = fixed_tv


def random_boxes(n: int, size: tuple[int, int], g: torch.Generator,
                 min_side: float = 16) -> torch.Tensor:
    h, w = size
    x1 = torch.rand(n, generator=g) * (w - min_side)
    y1 = torch.rand(n, generator=g) * (h - min_side)
    bw = min_side + torch.rand(n, generator=g) * (w / 2)
    bh = min_side + torch.rand(n, generator=g) * (h / 2)
    return torch.stack((x1, y1, (x1 + bw).clamp(max=w), (y1 + bh).clamp(max=h)), dim=1)


def make_step(model: nn.Module, train: bool, images: torch.Tensor, targets: list[Targets],
              optimizer: torch.optim.Optimizer | None) -> Callable[[], None]:
    """One inference pass or one training step (forward, backward, SGD update)."""
    ours = isinstance(model, FasterRCNN)
    size = tuple(images.shape[-2:])
    batch = ImageBatch(images, [size] * len(images))
    tv_images = list(images)
    tv_targets = [{"boxes": t.boxes, "labels": t.labels + 1} for t in targets]

    def step() -> None:
        if not train:
            with torch.inference_mode():
                model(batch) if ours else model(tv_images)
            return
        out = model(batch, targets) if ours else model(tv_images, tv_targets)
        losses = out.losses if ours else out
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    return step


def timed(step: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return float("nan")


def build(args: argparse.Namespace, device: torch.device) -> tuple[FasterRCNN, TVFasterRCNN]:
    torch.manual_seed(0)
    cfg = replace_config(DetModelConfig(), [   # as the tools build it, with the twin's RoIAlign
        f"backbone.depth={args.depth}", f"backbone.width={args.width}", "channels_last=false",
        "anchors.sizes=[128,256,512]", "roi_head.roi_op=align", "roi_head.aligned=false",
        "roi_head.sampling_ratio=2", f"rpn.proposals_test={args.proposals_test}",
        f"rpn.proposals_train={args.proposals_train}", "rpn.pre_nms_topk_test=6000",
        "rpn.pre_nms_topk_train=12000", f"roi_head.batch_size_per_image={args.roi_batch}"])
    ours = build_detector(cfg, args.num_classes)
    ours.rpn.min_box_size = 1e-3      # torchvision's fixed minimum sizes, for equal work
    ours.roi_head.min_box_size = 1e-2
    return ours.to(device), torchvision_twin(ours, args.size).to(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, default=101, choices=(18, 34, 50, 101, 152))
    p.add_argument("--size", default="600x1000", help="HxW of the (pre-resized) input")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=("infer", "train"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--width", type=int, default=64, help="ResNet width (64 = the paper's)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--roi-batch", type=int, default=512, help="sampled RoIs per image in training")
    p.add_argument("--proposals-test", type=int, default=300)
    p.add_argument("--proposals-train", type=int, default=2000)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:4]),
                   help="models to time: ours as build_detector builds it (channels_last), with "
                        "frozen BN folded into the convolutions ('fused', inference only), in "
                        "NCHW layout ('nchw'), and torchvision with channels_last weights")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top operators")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    args.size = (h, w)
    return args


def profile(name: str, step: Callable[[], None], device: torch.device) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {name} ---")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


def run_case(models: dict[str, nn.Module], proposals: dict[bool, list[torch.Tensor]],
             mode: str, batch: int, args: argparse.Namespace, device: torch.device) -> None:
    g = torch.Generator().manual_seed(batch)
    h, w = args.size
    images = (torch.rand(batch, 3, h, w, generator=g) * 255).to(device)
    targets = [Targets(random_boxes(5, args.size, g),
                       torch.randint(args.num_classes, (5,), generator=g), i).to(device)
               for i in range(batch)]
    for train, num in ((True, args.proposals_train), (False, args.proposals_test)):
        proposals[train] = [random_boxes(num, args.size, g).to(device) for _ in range(batch)]
    train = mode == "train"
    steps = {}
    for name, model in models.items():
        if train and name.endswith("fused"):
            continue
        model.train(train)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-7) if train else None
        steps[name] = make_step(model, train, images, targets, optimizer)
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, float] = {name: float("nan") for name in steps}
    for i in range(args.warmup + args.iters):
        for name, step in steps.items():  # interleaved: drift hits every model alike
            t = timed(step, device)
            if i >= args.warmup:
                times[name].append(t)
                peaks[name] = max(peak_memory_mb(device), peaks[name] if i > args.warmup else 0.0)
    base = statistics.median(times["torchvision"])
    print(f"\n{mode} batch {batch} ({h}x{w}, {len(proposals[train][0])} RoIs/image)")
    for name in steps:
        med = statistics.median(times[name])
        peak = f"{peaks[name]:8.0f} MiB" if device.type == "cuda" else "n/a (CPU)"
        print(f"  {name:16s} {1000 * med:9.1f} ms   ratio {med / base:5.3f}   peak {peak}")
    if args.profile:
        for name, step in steps.items():
            profile(f"{name} {mode} batch {batch}", step, device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    ours, tv = build(args, device)
    variants = {
        "torchvision": lambda: tv,
        "ours": lambda: copy.deepcopy(ours).use_channels_last(),   # build_detector's default
        "ours+fused": lambda: copy.deepcopy(ours).use_channels_last().fuse_frozen_bn(),
        "ours-nchw": lambda: ours,
        "ours-nchw+fused": lambda: copy.deepcopy(ours).fuse_frozen_bn(),
        "torchvision+cl": lambda: copy.deepcopy(tv).to(memory_format=torch.channels_last),
    }
    models: dict[str, nn.Module] = {name: variants[name]() for name in args.variants}
    proposals: dict[bool, list[torch.Tensor]] = {}
    for model in models.values():
        fix_proposals(model, proposals)
    gpu = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or "cpu")
    print(f"ResNet-{args.depth} C4, torch {torch.__version__}, {device} ({gpu}), "
          f"{args.threads} threads, median of {args.iters} after {args.warmup} warm-up")
    for mode in args.modes:
        for batch in args.batch:
            run_case(models, proposals, mode, batch, args, device)
    if device.type == "cpu":
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\nprocess max RSS {max_rss:.0f} MiB "
              "(CPU peak memory is process-wide, not per model)")


if __name__ == "__main__":
    main()
