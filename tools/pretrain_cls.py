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
import functools
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from common import parse_tool_args, run_main, setup_run  # noqa: E402
from detres import build  # noqa: E402
from detres.config import load_config, to_dict  # noqa: E402
from detres.engine.checkpoint import (  # noqa: E402
    atomic_save, atomic_write_bytes, check_task, extract_backbone,
    load_checkpoint, load_model_state)
from detres.engine.loop import Trainer, recompute_bn_stats  # noqa: E402
from detres.evaluation.classification import evaluate_classifier  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "cls_builtin.yaml"
TASK = "classification"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_tool_args(__doc__, "configs/cls_builtin.yaml",
                           "Example: python tools/pretrain_cls.py configs/cls_resnet20_cifar10.yaml "
                           "solver.base_lr=0.05 train.output_dir=output/r20", argv)


def load_classifier_weights(model: torch.nn.Module, path: str) -> None:
    """Loads a classification checkpoint; other tasks and models fail with a short message."""
    ckpt = load_checkpoint(path)
    check_task(ckpt, path, TASK)
    load_model_state(model, ckpt, path)


def write_eval(output_dir: Path, results: dict) -> None:
    text = json.dumps({k: results[k] for k in ("top1_err", "top5_err")}, indent=2)
    atomic_write_bytes(output_dir / "eval" / "metrics.json", lambda f: f.write(text.encode()))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    device, dist, output_dir, logger = setup_run(cfg, write_config=not args.eval_only)

    train_set, val_set, mean_image = build.build_cls_datasets(cfg.data)
    model = build.build_classifier(cfg, train_set.num_classes, mean_image).to(device)
    train_loader, sampler = build.build_cls_train_loader(cfg, train_set, dist, device)
    val_loader = build.build_cls_test_loader(cfg, val_set, dist, device)
    arch = build.describe_classifier(model, cfg.model.backbone)
    logger.info(f"{len(train_set)} training and {len(val_set)} test images, "
                f"{train_set.num_classes} classes; {arch}")
    eval_fn = functools.partial(evaluate_classifier, loader=val_loader, device=device)

    if args.eval_only:
        load_classifier_weights(model, args.weights)
        results = eval_fn(model)
        if dist.is_main:
            write_eval(output_dir, results)
        logger.info(f"{args.weights}: top-1 error {results['top1_err']:.2f}%, "
                    f"top-5 error {results['top5_err']:.2f}% on {results['num_images']} images")
        return results

    trainer = Trainer(
        model, build.build_optimizer(cfg.solver, model), build.build_lr_schedule(cfg.solver),
        train_loader, max_iter=cfg.train.max_iter, device=device, output_dir=output_dir,
        sampler=sampler, task=TASK,
        meta={"arch": arch, "config": to_dict(cfg), "class_names": list(train_set.class_names)},
        amp=cfg.train.amp, clip_grad_norm=cfg.solver.clip_grad_norm,
        checkpoint_period=cfg.train.checkpoint_period, log_period=cfg.train.log_period,
        eval_fn=eval_fn, eval_period=cfg.train.eval_period,
        finish_fn=functools.partial(precise_bn, cfg=cfg, train_set=train_set, dist=dist,
                                    device=device) if cfg.precise_bn.num_batches else None)
    if args.resume:
        trainer.resume()
    result = trainer.run()
    trainer.close()
    if dist.is_main:
        atomic_save(extract_backbone(model.state_dict(), "net."), output_dir / "backbone.pth")
        write_eval(output_dir, result.eval_results)
    for dataset in (train_set, val_set):
        if hasattr(dataset, "report_skipped_images"):      # data.skip_bad_images
            dataset.report_skipped_images()
    logger.info(f"done: top-1 error {result.eval_results['top1_err']:.2f}%, top-5 error "
                f"{result.eval_results['top5_err']:.2f}%; backbone weights in "
                f"{output_dir / 'backbone.pth'}")
    return result.eval_results


def precise_bn(model: torch.nn.Module, cfg, train_set, dist, device) -> None:
    """Recomputes BN statistics over cfg.precise_bn.num_batches augmented training batches."""
    loader, _ = build.build_cls_train_loader(cfg, train_set, dist, device,
                                             seed=cfg.train.seed + 1)
    used = recompute_bn_stats(model, ((images,) for images, _ in loader),
                              cfg.precise_bn.num_batches, device)
    logging.getLogger("detres").info(f"precise BN: statistics recomputed over {used} batches")


if __name__ == "__main__":
    run_main(main)
