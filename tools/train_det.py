#!/usr/bin/env python
"""Train and evaluate Faster R-CNN with the C4 layout (He et al. 2015, Appendix A).

    python tools/train_det.py [CONFIG] [key=value ...] [--resume] [--eval-only --weights W]

Without CONFIG it runs the built-in demo, configs/frcnn_r18_shapes.yaml: a narrow ResNet-18
detector trained and evaluated on the built-in shapes set (generated on first use) in minutes on
a laptop CPU. On GPUs: ``torchrun --nproc_per_node=8 tools/train_det.py configs/frcnn_r101_coco.yaml``.

Writes into train.output_dir: config.yaml, env.json, log.txt, metrics.jsonl,
model_XXXXXXX.pth, last_checkpoint, model_final.pth, eval/metrics.json
({"bbox": {"AP", "AP50", ..., "per_class"}}, percent) and eval/coco_results.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from detres.cli import parse_tool_args, run_main
from detres.config import load_config
from detres.tasks import detection

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "frcnn_r18_shapes.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_tool_args(__doc__, "configs/frcnn_r18_shapes.yaml, the built-in demo",
                           "Example: python tools/train_det.py configs/frcnn_r101_coco.yaml "
                           "solver.ims_per_batch=8 train.output_dir=output/r101", argv)


def main(argv: list[str] | None = None) -> dict:
    """Trains (or with --eval-only evaluates); returns the final metrics."""
    args = parse_args(argv)
    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides,
                      schema=detection.DetectionConfig)
    if args.eval_only:
        return detection.evaluate(cfg, args.weights, summary_only=True)
    return detection.train(cfg, resume=args.resume)


if __name__ == "__main__":
    run_main(main)
