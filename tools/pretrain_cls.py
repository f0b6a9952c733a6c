#!/usr/bin/env python
r"""Pretrain a ResNet by image classification (He et al. 2015, Sec 3.4 and 4.2).

    python tools/pretrain_cls.py [CONFIG] [key=value ...] [--resume] [--eval-only --weights W]

Without CONFIG it trains configs/cls_builtin.yaml: a narrow ResNet on the built-in synthetic
set (generated on first use), a few minutes on a laptop CPU. Under torchrun it trains with
DistributedDataParallel (``torchrun --nproc_per_node=8 tools/pretrain_cls.py CONFIG``).

Writes into train.output_dir: config.yaml, env.json, log.txt, metrics.jsonl,
model_XXXXXXX.pth, last_checkpoint, model_final.pth, backbone.pth (the ResNet without fc,
with torchvision names: the detector's initial weights via model.backbone.weights) and
eval/metrics.json ({"top1_err", "top5_err"} in percent).

Example:

    python tools/pretrain_cls.py configs/cls_resnet20_cifar10.yaml solver.base_lr=0.05 \
        train.output_dir=output/r20
"""
from __future__ import annotations

import functools

from detres.cli import CONFIGS, run_main, task_tool_main
from detres.tasks import classification

main = functools.partial(task_tool_main, doc=__doc__, task=classification,
                         default_config=CONFIGS / "cls_builtin.yaml")

if __name__ == "__main__":
    run_main(main)
