"""How the C4 detector's cost grows: time and peak memory of inference and of a training step
against the number of RoIs, the shorter side and the batch, and where inference time goes.

One factor moves at a time around the base case (300 RoIs, 600x1000, one image): RoIs 100,
300, 1000, 2000; shorter side 400, 600, 800, 1000 (longer side 5/3 of it, the 600x1000
aspect); batch 1, 2, 4. The detector is the paper's (ResNet-101 C4, RoIPool 14x14, conv5_x
once per region; Appendix A) with random weights; the RPN runs in full but hands on FIXED
random boxes, so conv5_x runs on exactly the stated RoIs (inference: that many proposals per
image; training: that many sampled RoIs per image out of max(2000, RoIs) proposals).
Inference runs the form evaluation and the Predictor run (models/inference_form.py), in
fp32; its time is split into trunk (normalize, conv1..conv4_x), RPN (head, decoding, NMS),
RoI pooling (with the pooled maps' change to the trunk's layout), conv5_x per region (with its average pool) and
post-processing (box layers, softmax, decoding, per-class NMS). Peak memory is the growth of
the process's resident set over the pass (/proc/self/status VmHWM after resetting it, Linux),
or CUDA's peak allocation.

    python benchmarks/cost_growth.py --json docs/cost_growth.json --plot docs/cost_growth.png
    python benchmarks/cost_growth.py --quick        # RoIs and batch sweeps, inference only
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from detector_speed import fix_proposals, random_boxes   # this folder's benchmark

from detres.boxes import boxes_to_rois
from detres.config import replace as replace_config
from detres.models import roi_ops
from detres.models.inference_form import prepare_for_inference
from detres.models.roi_head import pool_rois
from detres.structures import ImageBatch, Targets
from detres.tasks.detection.build import build_detector
from detres.tasks.detection.config import DetModelConfig

BASE = {"rois": 300, "short": 600, "batch": 1}
SWEEPS = {"rois": (100, 300, 1000, 2000), "short": (400, 600, 800, 1000), "batch": (1, 2, 4)}
STAGES = ("trunk", "rpn", "roi_pool", "conv5_x", "postprocess")


class PeakMemory:
    """Peak resident-set growth (MiB) over a block: CPU via VmHWM, CUDA via its allocator."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)   # freed blocks back to the system
            Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS
            self.start = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.mib = (_status_kib("VmHWM") * 1024 - self.start) / 2**20


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def inference_stages(model, images: ImageBatch, boxes: list[torch.Tensor],
                     device: torch.device) -> dict[str, float]:
    """Seconds per stage of one inference pass with ``boxes`` as the proposals."""
    times, head = {}, model.roi_head
    start = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        sync(device)
        now = time.perf_counter()
        times[name] = now - start
        start = now
    with torch.inference_mode():
        features = model.trunk(model.normalize(images))
        lap("trunk")
        model.rpn.propose(features, images.sizes, images.scales)
        lap("rpn")
        rois = boxes_to_rois(boxes)
        x = pool_rois(features, rois, head.roi_op, head.pooled_size, head.spatial_scale,
                      head.sampling_ratio, head.aligned)
        x = x.contiguous(memory_format=torch.channels_last if model.channels_last
                         else torch.contiguous_format)
        lap("roi_pool")
        x = head.res5(x).mean(dim=(2, 3))
        lap("conv5_x")
        logits, deltas = head.box_predictor(x)
        head.detect(logits, deltas, rois, [len(b) for b in boxes], images.sizes)
        lap("postprocess")
    return times


def training_step(model, images: ImageBatch, targets: list[Targets],
                  optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        out = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(out.losses.values()).backward()
        optimizer.step()
    return step


def case_inputs(short: int, batch: int, rois: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = (short, round(short * 5 / 3))
    images = ImageBatch.from_tensors([torch.rand(3, *size, generator=g) * 255
                                      for _ in range(batch)]).to(device)
    boxes = [random_boxes(rois, size, g).to(device) for _ in range(batch)]
    train_boxes = [random_boxes(max(rois, 2000), size, g).to(device) for _ in range(batch)]
    targets = [Targets(random_boxes(5, size, g), torch.randint(80, (5,), generator=g), i)
               .to(device) for i in range(batch)]
    return size, images, boxes, train_boxes, targets


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = replace_config(DetModelConfig(), [f"backbone.depth={args.depth}"])
    trained = build_detector(cfg, 80).to(device)
    fast = prepare_for_inference(trained)
    proposals: dict[bool, list[torch.Tensor]] = {}
    fix_proposals(trained, proposals)
    optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=1e-9)
    cases = [dict(BASE, **{factor: v}) for factor in args.sweeps for v in SWEEPS[factor]]
    rows, done = [], set()
    warm = False
    for case in cases:
        key = tuple(case.values())
        if key in done:
            continue
        done.add(key)
        size, images, boxes, train_boxes, targets = case_inputs(
            case["short"], case["batch"], case["rois"], device)
        if not warm:   # first-call costs (oneDNN primitive creation) out of the first row
            inference_stages(fast, images, boxes, device)
            warm = True
        with PeakMemory(device) as mem:
            stages = inference_stages(fast, images, boxes, device)
        row = {**case, "size": f"{size[0]}x{size[1]}", "infer_s": sum(stages.values()),
               "infer_mib": mem.mib, **{f"{k}_s": v for k, v in stages.items()}}
        if args.train:
            proposals[True] = train_boxes
            trained.train()
            trained.roi_head.batch_size_per_image = case["rois"]
            step = training_step(trained, images, targets, optimizer)
            with PeakMemory(device) as mem:
                start = time.perf_counter()
                step()
                sync(device)
            row.update(train_s=time.perf_counter() - start, train_mib=mem.mib)
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    stages = "  ".join(f"{s} {r[s + '_s']:6.2f}" for s in STAGES)
    train = (f"  | train {r['train_s']:6.2f} s {r['train_mib']:7.0f} MiB" if "train_s" in r
             else "")
    return (f"RoIs {r['rois']:5d} {r['size']:>9s} batch {r['batch']}: infer {r['infer_s']:6.2f} s "
            f"{r['infer_mib']:6.0f} MiB ({stages}){train}")


def markdown_table(rows: list[dict]) -> str:
    head = ("| RoIs/image | size | batch | inference s | trunk | RPN | RoI pool | conv5_x | "
            "post | inference MiB | training step s | training MiB |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['rois']} | {r['size']} | {r['batch']} | {r['infer_s']:.2f} | "
                     + " | ".join(f"{r[s + '_s']:.2f}" for s in STAGES)
                     + f" | {r['infer_mib']:.0f} | {r.get('train_s', float('nan')):.2f} | "
                     f"{r.get('train_mib', float('nan')):.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    factors = [f for f in SWEEPS if any(r[f] != BASE[f] for r in rows)]
    fig, axes = plt.subplots(1, len(factors), figsize=(5 * len(factors), 4), squeeze=False)
    labels = {"rois": "RoIs per image", "short": "shorter side (px)", "batch": "images per batch"}
    for ax, factor in zip(axes[0], factors):
        sel = sorted((r for r in rows if all(r[k] == BASE[k] for k in BASE if k != factor)),
                     key=lambda r: r[factor])
        xs = [r[factor] for r in sel]
        bottom = [0.0] * len(sel)
        for stage in STAGES:
            ys = [r[stage + "_s"] for r in sel]
            ax.bar([str(x) for x in xs], ys, bottom=bottom, label=f"inference: {stage}")
            bottom = [b + y for b, y in zip(bottom, ys)]
        if all("train_s" in r for r in sel):
            ax.plot([str(x) for x in xs], [r["train_s"] for r in sel], "k-o",
                    label="training step")
        ax.set_xlabel(labels[factor])
        ax.set_ylabel("seconds")
        ax2 = ax.twinx()
        ax2.plot([str(x) for x in xs], [r["infer_mib"] for r in sel], "r--s",
                 label="inference peak MiB")
        if all("train_mib" in r for r in sel):
            ax2.plot([str(x) for x in xs], [r["train_mib"] for r in sel], "m:^",
                     label="training peak MiB")
        ax2.legend(fontsize=7, loc="lower right")
        ax2.set_ylabel("peak memory growth (MiB)", color="r")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, default=101)
    p.add_argument("--sweeps", nargs="+", choices=tuple(SWEEPS), default=list(SWEEPS))
    p.add_argument("--no-train", dest="train", action="store_false",
                   help="inference only")
    p.add_argument("--quick", action="store_true",
                   help="RoIs and batch sweeps, inference only")
    p.add_argument("--roi-pool", choices=("auto", "torchvision"), default="auto",
                   help="auto: the detector's choice (the parallel gather on CPU where it is "
                        "faster); torchvision: torchvision's roi_pool kernel everywhere, as "
                        "before the gather existed")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--plot", help="write the plot here (PNG)")
    args = p.parse_args(argv)
    if args.quick:
        args.sweeps, args.train = ["rois", "batch"], False
    if args.roi_pool == "torchvision":
        roi_ops.TABLE_RATIO = 0     # the gather's size test then never passes
    print(f"ResNet-{args.depth} C4, {args.device}, {torch.get_num_threads()} threads, "
          f"RoI pooling: {args.roi_pool}, load average {os.getloadavg()[0]:.1f}")
    rows = run(args)
    print("\n" + markdown_table(rows))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot, f"ResNet-{args.depth} C4 Faster R-CNN, {args.device}, "
             f"{torch.get_num_threads()} threads: one factor at a time around 300 RoIs, "
             f"600x1000, batch 1")


if __name__ == "__main__":
    main()
