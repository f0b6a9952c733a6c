"""Speed of our C4 Faster R-CNN against torchvision's FasterRCNN built from the same parts.

Both detectors share weights and settings (tests/helpers.py ``torchvision_twin``): the same
ResNet trunk (conv1..conv4_x) and conv5_x box head, RoIAlign 14x14 with sampling_ratio 2 and
aligned=False (torchvision's MultiScaleRoIAlign), the same RPN head, anchors, NMS settings and
pixel mean/std. torchvision's transform gets inputs of the final size and its resize is
switched off, so it only normalizes and pads, as ours does. Both RPNs run in full (head,
decoding, proposal selection, losses), but their outputs are replaced by the same FIXED boxes
(``--proposals-test`` per image at test, ``--proposals-train`` in training): a random-weight
RPN proposes nothing useful, and the head's cost is set by the number of RoIs, so each model
runs conv5_x on exactly the RoIs stated.

Models ("variants"): ``ours`` is what evaluation, the Predictor and tools/infer.py run at test
time (models/inference_form.py: frozen BN folded, channels-last) and what tools/train_det.py
trains (channels-last); ``ours+bf16`` the same under CPU bf16 autocast (inference: the default
on CPUs with native bf16, ``test.cpu_amp``; training: ``train.amp=bf16``); ``ours-unfolded``
the trained form at test time; ``ours-nchw`` the NCHW layout; ``torchvision+cl`` torchvision
with channels-last weights.

Timings are interleaved (ours, torchvision, ours, ...) in one process with the same threads;
the median of ``--iters`` runs after ``--warmup`` is reported, with ratio = ours /
torchvision, and the achieved multiply-adds per second (convolutions and linear layers, as
detres.complexity counts them; training: forward plus twice the trainable part's forward)
beside the CPU's fp32 peak (cores x clock x FMAs per cycle from the vector width). The run ends
with one line per precision: ``inference ratio X, training ratio Y``.

    python benchmarks/detector_speed.py                  # R101-C4 600x1000, batch 1: ~5 min
    python benchmarks/detector_speed.py --full           # batches 1, 2; 10 runs; all variants
    python benchmarks/detector_speed.py --depth 50 --width 32 --size 320x512 --iters 2
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

from cpu_peak import cpu_fp32_peak   # benchmarks/cpu_peak.py, beside this script
from detres.complexity import detector_costs
from detres.config import replace as replace_config
from detres.cpu import cpu_has_native_bf16
from detres.models.inference_form import autocast, prepare_for_inference
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

VARIANTS = ("torchvision", "ours", "ours+bf16", "ours-unfolded", "ours-nchw", "torchvision+cl")
INFERENCE_ONLY = ("ours-unfolded",)


def fix_proposals(model: nn.Module, proposals: dict[bool, list[torch.Tensor]]) -> None:
    """Runs the model's own proposal selection, then hands ``proposals[training]`` onwards."""
    if isinstance(model, FasterRCNN):
        select = model.rpn.select_proposals

        def fixed_ours(*args, **kwargs):
            _, logits = select(*args, **kwargs)
            return proposals[model.training], logits
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
              amp: torch.dtype | None = None) -> Callable[[], None]:
    """One inference pass or one training step (forward, backward, SGD update)."""
    ours = isinstance(model, FasterRCNN)
    size = tuple(images.shape[-2:])
    batch = ImageBatch(images, [size] * len(images))
    tv_images = list(images)
    tv_targets = [{"boxes": t.boxes, "labels": t.labels + 1} for t in targets]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-7) if train else None

    def step() -> None:
        if not train:
            with torch.inference_mode(), autocast(images.device, amp):
                model(batch) if ours else model(tv_images)
            return
        with autocast(images.device, amp):   # bf16: no loss scaling needed
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


def model_config(args: argparse.Namespace) -> DetModelConfig:
    """As the tools build it, with the twin's RoIAlign."""
    return replace_config(DetModelConfig(), [
        f"backbone.depth={args.depth}", f"backbone.width={args.width}", "channels_last=false",
        "anchors.sizes=[128,256,512]", "roi_head.roi_op=align", "roi_head.aligned=false",
        "roi_head.sampling_ratio=2", f"rpn.proposals_test={args.proposals_test}",
        f"rpn.proposals_train={args.proposals_train}", "rpn.pre_nms_topk_test=6000",
        "rpn.pre_nms_topk_train=12000", f"roi_head.batch_size_per_image={args.roi_batch}"])


def build_models(args: argparse.Namespace, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    ours = build_detector(model_config(args), args.num_classes)
    ours.rpn.min_box_size = 1e-3      # torchvision's fixed minimum sizes, for equal work
    ours.roi_head.min_box_size = 1e-2
    ours = ours.to(device)
    tv = torchvision_twin(ours, args.size).to(device)
    variants = {
        "torchvision": lambda: tv,
        "ours": lambda: copy.deepcopy(ours).use_channels_last(),   # build_detector's default
        "ours+bf16": lambda: None,                                  # shares ours' copies
        "ours-unfolded": lambda: None,                              # shares ours' training copy
        "ours-nchw": lambda: ours,
        "torchvision+cl": lambda: copy.deepcopy(tv).to(memory_format=torch.channels_last),
    }
    return {name: variants[name]() for name in args.variants}


def multiply_adds(args: argparse.Namespace, train: bool, batch: int) -> float:
    """Multiply-adds of one pass (inference) or step (training) over ``batch`` images."""
    cfg = model_config(args)
    costs = detector_costs(cfg, args.num_classes, args.size)
    image, region = costs["image"][-1].macs, costs["region"][-1].macs
    if not train:
        return batch * (image + args.proposals_test * region)
    frozen_stages = 1 + (cfg.backbone.freeze_at >= 2)      # stem, and res2 at freeze_at 2
    frozen = sum(r.macs for r in costs["image"][:frozen_stages])
    forward = image + args.roi_batch * region
    return batch * (forward + 2 * (forward - frozen))     # backward: input and weight grads


def run_case(models: dict[str, nn.Module], proposals: dict[bool, list[torch.Tensor]],
             mode: str, batch: int, args: argparse.Namespace, device: torch.device
             ) -> dict[str, float]:
    """Times every variant on one case; returns the median seconds per variant."""
    g = torch.Generator().manual_seed(batch)
    h, w = args.size
    images = (torch.rand(batch, 3, h, w, generator=g) * 255).to(device)
    targets = [Targets(random_boxes(5, args.size, g),
                       torch.randint(args.num_classes, (5,), generator=g), i).to(device)
               for i in range(batch)]
    for training, num in ((True, args.proposals_train), (False, args.proposals_test)):
        proposals[training] = [random_boxes(num, args.size, g).to(device) for _ in range(batch)]
    train = mode == "train"
    steps = {}
    for name, model in models.items():
        if train and name in INFERENCE_ONLY:
            continue
        amp = torch.bfloat16 if name == "ours+bf16" or args.amp == "bf16" else None
        steps[name] = make_step(model.train(train), train, images, targets, amp)
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, 0.0)
    for i in range(args.warmup + args.iters):
        for name, step in steps.items():  # interleaved: drift hits every model alike
            t = timed(step, device)
            if i >= args.warmup:
                times[name].append(t)
            if device.type == "cuda":   # timed() resets the peak before each step
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**20)
    medians = {name: statistics.median(t) for name, t in times.items()}
    macs = multiply_adds(args, train, batch)
    rois = (f"{args.roi_batch} sampled of {args.proposals_train}" if train
            else args.proposals_test)
    print(f"\n{mode} batch {batch} ({h}x{w}, {rois} RoIs/image, {macs / batch / 1e9:.3g} GMAC "
          f"per image{' per step' if train else ''})")
    for name, med in medians.items():
        peak = f"   peak {peaks[name]:8.0f} MiB" if device.type == "cuda" else ""
        print(f"  {name:16s} {1000 * med:9.1f} ms   ratio {med / medians['torchvision']:5.3f}"
              f"   {batch / med:7.2f} images/s   {macs / med / 1e9:7.1f} GMAC/s{peak}")
    if args.profile:
        for name, step in steps.items():
            profile(f"{name} {mode} batch {batch}", step, device)
    return medians


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, default=101, choices=(18, 34, 50, 101, 152))
    p.add_argument("--size", default="600x1000", help="HxW of the (pre-resized) input")
    p.add_argument("--full", action="store_true",
                   help="the full sweep: batches 1 and 2, 10 runs after 2, every variant")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 (full: 1 2)")
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=("infer", "train"))
    p.add_argument("--iters", type=int, default=None, help="default 3 (full: 10)")
    p.add_argument("--warmup", type=int, default=None, help="default 1 (full: 2)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--width", type=int, default=64, help="ResNet width (64 = the paper's)")
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--roi-batch", type=int, default=512, help="sampled RoIs per image in training")
    p.add_argument("--proposals-test", type=int, default=300)
    p.add_argument("--proposals-train", type=int, default=2000)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                   help="default: torchvision, ours, and ours+bf16 on CPUs with native bf16")
    p.add_argument("--ghz", type=float, default=None, help="clock for the peak (default: cpuinfo)")
    p.add_argument("--fma-per-cycle", type=int, default=None,
                   help="fp32 FMAs per cycle per core for the peak (default: from the flags)")
    p.add_argument("--amp", default="none", choices=("none", "bf16"),
                   help="autocast every variant, training included (the GPU benchmark)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top operators")
    args = p.parse_args(argv)
    h, w = (int(v) for v in args.size.lower().split("x"))
    args.size = (h, w)
    args.batch = args.batch or ([1, 2] if args.full else [1])
    args.iters = args.iters or (10 if args.full else 3)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.full else 1)
    native = args.device == "cpu" and cpu_has_native_bf16()
    if args.variants is None:
        args.variants = list(VARIANTS) if args.full else \
            ["torchvision", "ours"] + (["ours+bf16"] if native else [])
    if "torchvision" not in args.variants:
        args.variants.insert(0, "torchvision")   # every ratio is to it
    return args


def prepare_variants(models: dict[str, nn.Module], mode: str) -> dict[str, nn.Module]:
    """The model each variant runs in ``mode``: at test time ``ours`` and ``ours+bf16`` run
    the inference form (models/inference_form.py), ``ours-unfolded`` the trained form."""
    out = dict(models)
    if "ours+bf16" in models:
        out["ours+bf16"] = models["ours"]           # the same weights, under autocast
    if mode == "infer" and "ours" in models:
        trained = models["ours"]
        out["ours"] = prepare_for_inference(trained)
        if "ours+bf16" in models:
            out["ours+bf16"] = out["ours"]
        if "ours-unfolded" in models:
            out["ours-unfolded"] = trained
    return {name: model for name, model in out.items() if model is not None}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    built = build_models(args, device)
    processor = (torch.cuda.get_device_name(device) if device.type == "cuda"
                 else platform.processor() or "cpu")
    print(f"ResNet-{args.depth} C4, torch {torch.__version__}, {device} ({processor}), "
          f"{args.threads} threads, median of {args.iters} after {args.warmup} warm-up")
    if device.type == "cpu":
        peak, how = cpu_fp32_peak(args.threads, args.ghz, args.fma_per_cycle)
        print(f"CPU fp32 peak {peak:.0f} GMAC/s ({how}); native bf16: {cpu_has_native_bf16()}")
    ratios: dict[str, dict[str, list[float]]] = {}
    for mode in args.modes:
        models = prepare_variants(built, mode)
        proposals: dict[bool, list[torch.Tensor]] = {}
        for model in {id(m): m for m in models.values()}.values():
            fix_proposals(model, proposals)
        for batch in args.batch:
            medians = run_case(models, proposals, mode, batch, args, device)
            for name, med in medians.items():
                ratios.setdefault(name, {}).setdefault(mode, []).append(
                    med / medians["torchvision"])
        for model in models.values():    # the next mode patches its own copies again
            if isinstance(model, FasterRCNN):
                model.rpn.__dict__.pop("select_proposals", None)
            elif hasattr(model, "rpn"):
                model.rpn.__dict__.pop("filter_proposals", None)
    if device.type == "cpu":
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\nprocess max RSS {max_rss:.0f} MiB (CPU peak memory is process-wide)")
    print()
    for name, precision in (("ours", "fp32" if args.amp == "none" else "bf16 autocast"),
                            ("ours+bf16", "bf16 autocast")):
        if name in ratios:
            by_mode = {m: statistics.median(r) for m, r in ratios[name].items()}
            fmt = {m: f"{by_mode[m]:.3f}" if m in by_mode else "n/a" for m in ("infer", "train")}
            base = args.amp.replace("none", "fp32")
            print(f"{name} ({precision}) vs torchvision {base}: inference ratio "
                  f"{fmt['infer']}, training ratio {fmt['train']}")


if __name__ == "__main__":
    main()
