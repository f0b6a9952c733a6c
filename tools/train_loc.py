#!/usr/bin/env python
"""Train and evaluate ImageNet localization with the per-class RPN (He et al. 2015, Appendix C).

    python tools/train_loc.py [CONFIG] [key=value ...] [--resume] [--eval-only --weights W]

Without CONFIG it runs the built-in demo, configs/loc_r18_builtin.yaml (built-in data, generated
on first use). Three stages, each an ordinary training run in its own sub-folder:

1. classifier/  the classification network (skipped when classifier.weights is given);
2. rpn/         the per-class RPN on random crops, a few anchors sampled per image;
3. rcnn/        the R-CNN refiner on the RPN's top proposals for each training image's classes
                (rcnn/proposals.pth), RoI-centric (skipped when rcnn.enabled is false).

Then train.output_dir holds config.yaml, env.json, log.txt, model_final.pth (all three networks)
and eval/metrics.json: {"RPN": {...}, "RPN+R-CNN": {...}} with the errors in percent
(gt_cls_loc_err, top1_loc_err, top5_loc_err, top1_cls_err, top5_cls_err), as Table 13.
With --resume, finished stages are loaded from their model_final.pth and an interrupted one
continues from its last checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from common import parse_tool_args, run_main, setup_run  # noqa: E402
from detres import build  # noqa: E402
from detres.config import (ConfigError, LocalizationConfig, SolverConfig, load_config,  # noqa: E402
                           to_dict)  # noqa: E402
from detres.data import loc_batches  # noqa: E402
from detres.data.classification import InfiniteBatchSampler  # noqa: E402
from detres.engine import distributed as du  # noqa: E402
from detres.engine.checkpoint import atomic_save, load_checkpoint, load_model_state  # noqa: E402
from detres.engine.loop import Trainer  # noqa: E402
from detres.evaluation.localize import evaluate_localizer, training_proposals  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "loc_r18_builtin.yaml"
TASK = "localization"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_tool_args(__doc__, "configs/loc_r18_builtin.yaml, the built-in demo",
                           "Example: python tools/train_loc.py configs/loc_r101_imagenet.yaml "
                           "rpn.solver.ims_per_batch=64 train.output_dir=output/loc", argv)


def run_stage(name: str, module: torch.nn.Module, dataset: Any, collate: Any,
              solver: SolverConfig, max_iter: int, cfg: LocalizationConfig, output_dir: Path,
              device: torch.device, dist: du.DistInfo, resume: bool, meta: dict,
              positions: bool = True) -> None:
    """Trains one network in ``output_dir/name``; with ``resume`` a finished stage is loaded
    from its model_final.pth and an interrupted one continues from its last checkpoint."""
    stage_dir = output_dir / name
    final = stage_dir / "model_final.pth"
    if resume and final.is_file():
        load_model_state(module, load_checkpoint(final), final)
        return
    if solver.ims_per_batch % dist.world_size:
        raise ConfigError(f"{name}.solver.ims_per_batch={solver.ims_per_batch} is not "
                          f"divisible by the {dist.world_size} processes")
    sampler = InfiniteBatchSampler(len(dataset), solver.ims_per_batch, seed=cfg.train.seed,
                                   rank=dist.rank, world_size=dist.world_size)
    loader = loc_batches.train_loader(dataset, collate, sampler, cfg.train.num_workers,
                                      device.type == "cuda", positions)
    module.train()
    trainer = Trainer(module, build.build_optimizer(solver, module),
                      build.build_lr_schedule(solver), loader, max_iter=max_iter, device=device,
                      output_dir=stage_dir, sampler=sampler, task=f"{TASK}-{name}",
                      meta=meta, amp=cfg.train.amp,
                      clip_grad_norm=solver.clip_grad_norm,
                      checkpoint_period=cfg.train.checkpoint_period,
                      log_period=cfg.train.log_period)
    if resume:
        trainer.resume()
    trainer.run()
    trainer.close()


def main(argv: list[str] | None = None) -> dict:
    """Trains (or with --eval-only evaluates); returns the metrics per method."""
    args = parse_args(argv)
    if args.eval_only:
        model, stored_cfg, meta = build.localizer_from_checkpoint(args.weights, args.overrides)
    cfg = (stored_cfg if args.eval_only and args.config is None else
           load_config(args.config or DEFAULT_CONFIG, args.overrides, schema=LocalizationConfig))
    device, dist, output_dir, logger = setup_run(cfg, write_config=not args.eval_only)
    settings = build.loc_test_settings(cfg)
    if args.eval_only:
        val_set = build.build_loc_dataset(cfg.data.val, cfg.data, key="data.val",
                                          class_names=meta["class_names"])
        return evaluate_localizer(model.to(device), _test_loader(cfg, val_set, dist), val_set,
                                  settings, device, output_dir)

    # indexed once; the stages see it through their own transforms
    train_images = build.build_loc_dataset(cfg.data.train, cfg.data, key="data.train")
    names = list(train_images.class_names)
    train_set = train_images.with_transform(build.build_loc_train_transform(cfg.data))
    val_set = build.build_loc_dataset(cfg.data.val, cfg.data, key="data.val", class_names=names)
    model = build.build_localizer(cfg, len(names)).to(device)
    logger.info(f"{len(train_set)} training and {len(val_set)} test images, {len(names)} "
                f"classes; R-CNN {'on' if model.rcnn is not None else 'off'}")
    meta = {"config": to_dict(cfg), "class_names": names}

    if not cfg.classifier.weights:
        cls_set = train_images.with_transform(build.build_loc_train_transform(
            cfg.data, cfg.classifier.scale_range, cfg.classifier.crop_size))
        run_stage("classifier", model.classifier, cls_set, loc_batches.collate_classifier,
                  cfg.classifier.solver, cfg.classifier.max_iter, cfg, output_dir, device, dist,
                  args.resume, meta)
    if cfg.rpn.init_from_classifier and not _finished(output_dir / "rpn", args.resume):
        build.copy_classifier_weights(model.classifier, model.rpn.trunk, "rpn")
    run_stage("rpn", model.rpn, train_set, loc_batches.collate_rpn, cfg.rpn.solver,
              cfg.rpn.max_iter, cfg, output_dir, device, dist, args.resume, meta)
    if model.rcnn is not None:
        if cfg.rcnn.init_from_classifier and not _finished(output_dir / "rcnn", args.resume):
            build.copy_classifier_weights(model.classifier, model.rcnn.net, "rcnn")
        proposals = _training_proposals(model, train_images, cfg, settings, output_dir, device,
                                        dist, args.resume)
        samples = loc_batches.RCNNSamples(train_images, proposals, cfg.rcnn.rois_per_image,
                                          cfg.data.flip_prob)
        run_stage("rcnn", model.rcnn, samples, loc_batches.collate_rcnn, cfg.rcnn.solver,
                  cfg.rcnn.max_iter, cfg, output_dir, device, dist, args.resume, meta,
                  positions=False)

    if dist.is_main:
        atomic_save({"model": model.state_dict(), "task": TASK, **meta},
                    output_dir / "model_final.pth")
        logger.info(f"saved {output_dir / 'model_final.pth'}")
    metrics = evaluate_localizer(model, _test_loader(cfg, val_set, dist), val_set, settings,
                                 device, output_dir)
    for dataset in (train_set, val_set):
        dataset.report_skipped_images()
    return metrics


def _finished(stage_dir: Path, resume: bool) -> bool:
    return resume and (stage_dir / "model_final.pth").is_file()


def _test_loader(cfg: LocalizationConfig, dataset: Any, dist: du.DistInfo):
    return loc_batches.test_loader(dataset, cfg.test.ims_per_batch, dist.rank, dist.world_size,
                                   cfg.train.num_workers)


def _training_proposals(model, dataset, cfg, settings, output_dir, device, dist, resume):
    """The RPN's proposals on the training images, cached in rcnn/proposals.pth."""
    path = output_dir / "rcnn" / "proposals.pth"
    if resume and path.is_file():
        stored = torch.load(path, map_location="cpu", weights_only=True)
        return {int(k): (v[0], v[1]) for k, v in stored.items()}
    proposals = training_proposals(model.rpn, _test_loader(cfg, dataset, dist), dataset,
                                   settings, device)
    if dist.is_main:
        atomic_save({k: list(v) for k, v in proposals.items()}, path)
    return proposals


if __name__ == "__main__":
    run_main(main)
