#!/usr/bin/env python
r"""Train and evaluate ImageNet localization with the per-class RPN (He et al. 2015, Appendix C).

    python tools/train_loc.py [CONFIG] [key=value ...] [--resume] [--eval-only --weights W]

Without CONFIG it runs the built-in demo, configs/loc_r18_builtin.yaml (built-in data, generated
on first use). Three stages, each an ordinary training run in its own sub-folder:

1. classifier/  the classification network (skipped when classifier.weights is given);
2. rpn/         the per-class RPN on random crops, a few anchors sampled per image;
3. rcnn/        the R-CNN refiner on the RPN's top proposals for each training image's classes
                (rcnn/proposals.rank<r>.npy per process, indexed by rcnn/proposals.pth),
                RoI-centric (skipped when rcnn.enabled is false).

Then train.output_dir holds config.yaml, env.json, log.txt, model_final.pth (all three networks)
and eval/metrics.json: {"RPN": {...}, "RPN+R-CNN": {...}} with the errors in percent
(gt_cls_loc_err, top1_loc_err, top5_loc_err, top1_cls_err, top5_cls_err), as Table 13.
With --resume, finished stages are loaded from their model_final.pth and an interrupted one
continues from its last checkpoint.

Example:

    python tools/train_loc.py configs/loc_r101_imagenet.yaml rpn.solver.ims_per_batch=64 \
        train.output_dir=output/loc
"""
from __future__ import annotations

import functools

from detres.cli import CONFIGS, run_main, task_tool_main
from detres.tasks import localization

main = functools.partial(task_tool_main, doc=__doc__, task=localization, stored_config=True,
                         default_config=CONFIGS / "loc_r18_builtin.yaml")

if __name__ == "__main__":
    run_main(main)
