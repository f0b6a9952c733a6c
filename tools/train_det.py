#!/usr/bin/env python
r"""Train and evaluate Faster R-CNN with the C4 layout (He et al. 2015, Appendix A).

    python tools/train_det.py [CONFIG] [key=value ...] [--resume] [--eval-only --weights W]

Without CONFIG it runs the built-in demo, configs/frcnn_r18_shapes.yaml: a narrow ResNet-18
detector trained and evaluated on the built-in shapes set (generated on first use) in minutes on
a laptop CPU. On GPUs: ``torchrun --nproc_per_node=8 tools/train_det.py configs/frcnn_r101_coco.yaml``.

Writes into train.output_dir: config.yaml, env.json, log.txt, metrics.jsonl,
model_XXXXXXX.pth, last_checkpoint, model_final.pth, eval/metrics.json
({"bbox": {"AP", "AP50", ..., "per_class"}}, percent) and eval/coco_results.json.

Example:

    python tools/train_det.py configs/frcnn_r101_coco.yaml solver.ims_per_batch=8 \
        train.output_dir=output/r101
"""
from __future__ import annotations

import functools

from detres.cli import CONFIGS, run_main, task_tool_main
from detres.tasks import detection

main = functools.partial(task_tool_main, doc=__doc__, task=detection,
                         default_config=CONFIGS / "frcnn_r18_shapes.yaml")

if __name__ == "__main__":
    run_main(main)
