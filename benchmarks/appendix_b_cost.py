"""The test-time cost of each of Appendix B's improvements, as a ratio to the baseline detector.

Runs the built-in demo detector (configs/frcnn_r18_shapes.yaml: narrow ResNet-18 C4, 256 px,
100 test proposals) over the first N images of the built-in val split, in one process and in
turn: baseline, + box refinement, + global context (another model: the head sees 2D inputs),
+ multi-scale testing (5 scales, 1/3..5/3 of the test size as the paper's 200..1000 of 600),
+ flip, + an ensemble of two, and all together. Prints seconds per image and the ratio to the
baseline measured in the same run; AP is not the point here (see README, the ablation).

    python benchmarks/appendix_b_cost.py [--images N] [--weights BASE.pth --context-weights CTX.pth]

Without weights, randomly initialised detectors are timed: their RPN still returns its top 100
proposals per image after NMS, so the head runs on as many RoIs as a trained one's (refinement
then pools 100 more per image); trained weights make the post-processing (thresholds, NMS,
voting) see realistic score distributions. Single-threaded by default (``--threads``), so the
ratios hold on a shared machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from detres.cli import CONFIGS
from detres.config import load_config
from detres.engine.distributed import DistInfo
from detres.tasks.detection.build import (build_det_dataset, build_det_test_loader, build_detector,
                                          build_test_detector)
from detres.tasks.detection.config import DetectionConfig, DetTestConfig
from detres.tasks.detection.load import load_detector

BASE = 256
SCALES = (86, 171, 256, 341, 427)   # 1/3, 2/3, 1, 4/3, 5/3 of 256


def load_models(cfg: DetectionConfig, args: argparse.Namespace, num_classes: int):
    if args.weights:
        (base,) = load_detector(args.weights, cfg).detectors
        ctx_cfg = dataclasses.replace(cfg.model, roi_head=dataclasses.replace(
            cfg.model.roi_head, global_context=True))
        (context,) = load_detector(args.context_weights,
                                   dataclasses.replace(cfg, model=ctx_cfg)).detectors
        return base, context
    torch.manual_seed(0)
    base = build_detector(cfg.model, num_classes).eval()
    context = build_detector(dataclasses.replace(cfg.model, roi_head=dataclasses.replace(
        cfg.model.roi_head, global_context=True)), num_classes).eval()
    return base, context


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


@torch.no_grad()
def time_variant(model: torch.nn.Module, batches: list) -> float:
    model(batches[0][0])                                  # warm-up
    start = time.perf_counter()
    for images, _ in batches:
        model(images)
    return (time.perf_counter() - start) / sum(len(images) for images, _ in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--weights", help="a trained demo checkpoint (baseline)")
    parser.add_argument("--context-weights", help="a demo checkpoint trained with context")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if bool(args.weights) != bool(args.context_weights):
        parser.error("give both --weights and --context-weights, or neither")
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIGS / "frcnn_r18_shapes.yaml", schema=DetectionConfig)
    no_workers = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, num_workers=0))

    def read_batches(scales: tuple[int, ...] = ()) -> tuple:
        """The val images as the test reads them: at the pyramid's top level with scales."""
        dataset = build_det_dataset(cfg.data.val, cfg.data, train=False, key="data.val",
                                    test_scales=scales)
        dataset.index = dataset.index.select(torch.arange(min(args.images, len(dataset))).numpy())
        return dataset, list(build_det_test_loader(no_workers, dataset, DistInfo(),
                                                   torch.device("cpu")))
    dataset, batches = read_batches()
    pyramid_batches = read_batches(SCALES)[1]
    base, context = load_models(cfg, args, dataset.num_classes)

    def wrap(models, **switches):
        return build_test_detector(dataclasses.replace(cfg, test=DetTestConfig(**switches)),
                                   models)
    variants = {
        "baseline": wrap([base]),
        "+ box refinement": wrap([base], box_refinement=True),
        "+ global context": wrap([context]),
        "+ multi-scale (5 scales)": wrap([base], scales=SCALES),
        "+ flip": wrap([base], flip=True),
        "ensemble of 2": wrap([base, context]),
        "context + refinement + multi-scale": wrap([context], box_refinement=True,
                                                   scales=SCALES),
    }
    print(f"{len(dataset)} built-in val images at {BASE} px, {args.threads} thread(s), "
          f"{'trained' if args.weights else 'random'} weights; {cpu_name()}")
    baseline = None
    for name, model in variants.items():
        seconds = time_variant(model, pyramid_batches if "multi-scale" in name else batches)
        baseline = baseline or seconds
        print(f"{name:36s} {seconds * 1000:8.1f} ms/image   {seconds / baseline:5.2f}x baseline")


if __name__ == "__main__":
    main()
