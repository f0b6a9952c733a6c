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
import functools
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from common import parse_tool_args, run_main, setup_run  # noqa: E402
from detres import build  # noqa: E402
from detres.config import ConfigError, DetectionConfig, load_config, to_dict  # noqa: E402
from detres.engine.loop import AMP_DTYPES, Trainer  # noqa: E402
from detres.evaluation.detection import evaluate_detector  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "frcnn_r18_shapes.yaml"
TASK = "detection"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_tool_args(__doc__, "configs/frcnn_r18_shapes.yaml, the built-in demo",
                           "Example: python tools/train_det.py configs/frcnn_r101_coco.yaml "
                           "solver.ims_per_batch=8 train.output_dir=output/r101", argv)


def main(argv: list[str] | None = None, summary_only: bool = True) -> dict:
    """Trains (or with --eval-only evaluates); returns the final metrics, per-class AP
    included unless ``summary_only``."""
    args = parse_args(argv)
    cfg = build.scale_schedule(
        load_config(args.config or DEFAULT_CONFIG, args.overrides, schema=DetectionConfig))
    device, dist, output_dir, logger = setup_run(cfg, write_config=not args.eval_only)
    val_set = build.build_det_dataset(cfg.data.val, cfg.data, train=False, key="data.val")
    val_loader = build.build_det_test_loader(cfg, val_set, dist, device)
    amp = AMP_DTYPES.get(cfg.train.amp) if device.type == "cuda" else None
    eval_fn = functools.partial(evaluate_detector, loader=val_loader, dataset=val_set,
                                device=device, metric=cfg.test.metric, output_dir=output_dir,
                                amp_dtype=amp)
    if args.eval_only:
        model = build.build_detector(cfg.model, val_set.num_classes).to(device)
        build.load_detector_weights(model, args.weights)
        return eval_fn(model, summary_only=summary_only)

    train_set = build.build_det_dataset(cfg.data.train, cfg.data, train=True, key="data.train")
    if list(val_set.class_names) != list(train_set.class_names):
        raise ConfigError(f"data.val has classes {val_set.class_names[:5]}... but data.train has "
                          f"{train_set.class_names[:5]}...; both must share one class list")
    model = build.build_detector(cfg.model, train_set.num_classes).to(device)
    train_loader = build.build_det_train_loader(cfg, train_set, dist, device)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"{len(train_set)} training and {len(val_set)} test images, "
                f"{train_set.num_classes} classes; {num_params / 1e6:.2f}M trainable parameters")
    trainer = Trainer(
        model, build.build_optimizer(cfg.solver, model), build.build_lr_schedule(cfg.solver),
        train_loader, max_iter=cfg.train.max_iter, device=device, output_dir=output_dir,
        sampler=train_loader.batch_sampler, task=TASK,
        meta={"arch": build.describe_detector(cfg.model, train_set.num_classes),
              "config": to_dict(cfg), "class_names": list(train_set.class_names),
              "category_ids": [int(c) for c in getattr(train_set, "label_to_category_id", [])]},
        amp=cfg.train.amp, clip_grad_norm=cfg.solver.clip_grad_norm,
        checkpoint_period=cfg.train.checkpoint_period, log_period=cfg.train.log_period,
        eval_fn=eval_fn, eval_period=cfg.train.eval_period)
    if args.resume:
        trainer.resume()
    result = trainer.run()
    trainer.close()
    for dataset in (train_set, val_set):
        dataset.report_skipped_images()
    logger.info("done: " + ", ".join(f"{k} {v:.1f}" for k, v in result.eval_results.items()
                                     if isinstance(v, float)))
    return result.eval_results


if __name__ == "__main__":
    run_main(main)
