"""The speed benchmarks as a user runs them: benchmarks/gpu_bench.sh dry-runs on the CPU and
prints every model's line and the summary; detector_speed.py's default run is the short one
(the full sweep behind --full) and counts the C4 head's multiply-adds. On a
CUDA machine, the detector's hot path makes no host synchronisation beyond proposal and
detection selection (NMS and the filtering around it)."""
import importlib.util
import re
import subprocess
import sys
import traceback
import warnings

import pytest
import torch

from helpers import ROOT, narrow_detector

from detres.cpu import cpu_has_native_bf16
from detres.structures import ImageBatch, Targets


def _benchmark(name: str):
    """``benchmarks/<name>.py`` as a module; its sibling modules (``cpu_peak``) import as
    they do when the script runs."""
    path = ROOT / "benchmarks" / f"{name}.py"
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_dry_runs_on_the_cpu_and_prints_each_model_and_the_summary():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_bench.sh"), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for mode in ("train", "infer"):
        section = out.split(f"\n{mode} batch 2 ")[1].split("\n\n")[0]
        for name in ("torchvision", "torchvision+cl", "ours"):
            assert re.search(rf"^  {re.escape(name)}\s+[\d.]+ ms\s+ratio [\d.]+\s+[\d.]+ images/s",
                             section, re.M), (name, section)
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"ours \(bf16 autocast\) vs torchvision bf16: inference ratio "
                        r"\d+\.\d{3}, training ratio \d+\.\d{3}", last), last


def test_detector_speed_defaults_are_the_short_run_and_full_is_the_sweep():
    bench = _benchmark("detector_speed")
    short = bench.parse_args([])
    assert (short.depth, short.size, short.batch, short.iters, short.warmup) == (
        101, (600, 1000), [1], 3, 1)
    assert short.variants == ["torchvision", "ours"] + (
        ["ours+bf16"] if cpu_has_native_bf16() and short.device == "cpu" else [])
    full = bench.parse_args(["--full"])
    assert (full.batch, full.iters, full.warmup, full.variants) == (
        [1, 2], 10, 2, list(bench.VARIANTS))


def test_detector_speed_counts_the_c4_multiply_adds():
    """R101-C4 at 600x1000 (padded to 608x1024): conv5_x on a 14x14 RoI is 3 bottlenecks, the
    first 1x1 at 14x14 and the rest at 7x7 (stride in the 3x3, projection strided):
    196*1024*512 + 49 * (9*512*512 + 512*2048 + 1024*2048) + 2 * 49 * (2048*512 + 9*512*512
    + 512*2048) = 0.81 G multiply-adds per region (plus the box layers), so 300 RoIs cost
    243 G beside the trunk's ~85 G and the RPN's 3x3 conv, 38*64 * 9*1024*1024 = 22.5 G."""
    bench = _benchmark("detector_speed")
    args = bench.parse_args([])
    per_region = 196 * 1024 * 512 + 49 * (9 * 512 * 512 + 512 * 2048 + 1024 * 2048) \
        + 2 * 49 * (2048 * 512 + 9 * 512 * 512 + 512 * 2048)
    box_layers = 2048 * (81 + 320)
    total = bench.multiply_adds(args, train=False, batch=1)
    rpn = 38 * 64 * (9 * 1024 * 1024 + 1024 * 15)
    trunk = total - 300 * (per_region + box_layers) - rpn
    assert 80e9 < trunk < 90e9, trunk
    assert bench.multiply_adds(args, train=False, batch=2) == 2 * total


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hot_path_synchronises_only_around_nms():
    """Every device-to-host synchronisation (torch.cuda.set_sync_debug_mode) of a training step
    and of inference comes from proposal selection, detection post-processing (variable-size
    filtering and NMS) or the one up-front target check."""
    allowed = {"select_proposals", "postprocess", "check_targets", "nms", "batched_nms"}
    model = narrow_detector().cuda()
    g = torch.Generator().manual_seed(0)
    images = ImageBatch.from_tensors([torch.rand(3, 96, 128, generator=g) * 255,
                                      torch.rand(3, 80, 112, generator=g) * 255]).to("cuda")
    targets = [Targets(torch.tensor([[10.0, 12.0, 60.0, 70.0]]), torch.tensor([1]), i).to("cuda")
               for i in range(2)]
    for _ in range(2):   # first calls (anchor caches, cuDNN plans) outside the check
        sum(model.train()(images, targets).losses.values()).backward()
    offenders = []

    def record(message, category, filename, lineno, file=None, line=None):
        stack = traceback.extract_stack()[:-1]
        if not any(frame.name in allowed for frame in stack):
            offenders.append(f"{message}\n" + "".join(traceback.format_list(stack[-8:])))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            out = model.train()(images, targets)
            sum(out.losses.values()).backward()
            with torch.no_grad():
                model.eval()(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not offenders, "\n\n".join(offenders)
