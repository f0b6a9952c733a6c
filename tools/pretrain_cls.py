#!/usr/bin/env python
"""Pretrain a ResNet by image classification (He et al. 2015, Sec 3.4 and 4.2).

    python tools/pretrain_cls.py [CONFIG] [key=value ...] [--resume] [--eval-only --weights W]

Without CONFIG it trains configs/cls_builtin.yaml: a narrow ResNet on the built-in synthetic
set (generated on first use), a few minutes on a laptop CPU. Under torchrun it trains with
DistributedDataParallel (``torchrun --nproc_per_node=8 tools/pretrain_cls.py CONFIG``).

Writes into train.output_dir: config.yaml, env.json, log.txt, metrics.jsonl,
model_XXXXXXX.pth, last_checkpoint, model_final.pth, backbone.pth (the ResNet without fc,
with torchvision names: the detector's initial weights via model.backbone.weights) and
eval/metrics.json ({"top1_err", "top5_err"} in percent).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from detres.cli import parse_tool_args, run_main
from detres.config import load_config
from detres.tasks import classification

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cls_builtin.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_tool_args(__doc__, "configs/cls_builtin.yaml",
                           "Example: python tools/pretrain_cls.py configs/cls_resnet20_cifar10.yaml "
                           "solver.base_lr=0.05 train.output_dir=output/r20", argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides,
                      schema=classification.ClassificationConfig)
    if args.eval_only:
        return classification.evaluate(cfg, args.weights)
    return classification.train(cfg, resume=args.resume)


if __name__ == "__main__":
    run_main(main)
