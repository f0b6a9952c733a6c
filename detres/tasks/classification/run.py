"""Classification runs: ``train(cfg)`` pretrains a ResNet (Sec 3.4, 4.2) and writes
``backbone.pth``, the detector's initial weights; ``evaluate(cfg, weights)`` scores a
checkpoint on ``data.val``. Both write ``eval/metrics.json`` ({"top1_err", "top5_err"},
percent) and return the metrics: ``train`` into ``train.output_dir``, ``evaluate`` into its own
new ``train.output_dir/eval_only/<YYYYmmdd-HHMMSS>/`` (``engine/launch.py::setup_run``)."""
from __future__ import annotations

import functools
import logging
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detres.config import to_dict
from detres.engine.checkpoint import atomic_save, extract_backbone, load_checkpoint_weights
from detres.engine.launch import begin_resumed_run, releases_run_lock, setup_run
from detres.engine.logging import write_json
from detres.engine.loop import Trainer
from detres.engine.precise_bn import recompute_bn_stats
from detres.evaluation.classification import ClassificationEvaluator
from detres.evaluation.inference import inference_on_dataset
from detres.models.classifier import mean_softmax
from detres.weights_io import backbone_file
from detres.tasks.classification.build import (TASK, build_classifier, build_cls_datasets,
                                               build_cls_test_loader, build_cls_train_loader,
                                               describe_classifier)
from detres.tasks.classification.config import ClassificationConfig
from detres.tasks.common import build_lr_schedule, build_optimizer, scale_schedule

logger = logging.getLogger("detres")
BACKBONE_FILE = "backbone.pth"   # the trunk's weights: this task's own record of a run


class ClassifierScores(nn.Module):
    """The classifier as evaluation runs it: a test batch ``(images, labels)`` -> (N, K)
    class scores. images (N, 3, H, W) give the logits; (N, C, 3, H, W) crops (C = 10) or per
    image a list of views of different sizes (multi-scale testing) give the softmax scores
    averaged over each image's views (Sec. 3.4, ``models.classifier.mean_softmax``)."""

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:
        super().__init__()
        self.model, self.device = model, torch.device(device)

    def forward(self, batch: Sequence[Any]) -> Tensor:
        images = batch[0]
        if isinstance(images, Tensor) and images.dim() == 4:
            return self.model(images.to(self.device, non_blocking=True)).logits.float()
        return mean_softmax(self.model, [list(v) for v in images], self.device)


def evaluate_classifier(model: nn.Module, loader: Iterable[Sequence[Any]],
                        device: torch.device | str = "cpu") -> dict[str, float]:
    """Top-1/top-5 error of ``model`` (returning ``.logits``) over ``loader``'s
    (images, labels) batches, over all ranks (``ClassificationEvaluator.evaluate``)."""
    return inference_on_dataset(ClassifierScores(model, device), loader,
                                ClassificationEvaluator(), device)


def _write_eval(output_dir: Path, results: dict[str, Any]) -> None:
    write_json(output_dir / "eval" / "metrics.json",
               {k: results[k] for k in ("top1_err", "top5_err")})


def _setup(cfg: ClassificationConfig, mode: str, notes: Sequence[str] = ()):
    device, dist, output_dir, log = setup_run(cfg, mode, records=(BACKBONE_FILE,))
    for note in notes:
        log.info(note)
    train_set, val_set, mean_image = build_cls_datasets(cfg.data)
    model = build_classifier(cfg, train_set.num_classes, mean_image).to(device)
    val_loader = build_cls_test_loader(cfg, val_set, dist, device)
    log.info(f"{len(train_set)} training and {len(val_set)} test images, "
             f"{train_set.num_classes} classes; {describe_classifier(model, cfg.model.backbone)}")
    eval_fn = functools.partial(evaluate_classifier, loader=val_loader, device=device)
    return device, dist, output_dir, train_set, val_set, model, eval_fn


def evaluate(cfg: ClassificationConfig, weights: str) -> dict[str, Any]:
    """Top-1/top-5 error of checkpoint ``weights`` on ``data.val``."""
    _, dist, output_dir, _, _, model, eval_fn = _setup(cfg, "eval")
    load_checkpoint_weights(model, weights, TASK)
    results = eval_fn(model)
    if dist.is_main:
        _write_eval(output_dir, results)
    logger.info(f"{weights}: top-1 error {results['top1_err']:.2f}%, "
                f"top-5 error {results['top5_err']:.2f}% on {results['num_images']} images")
    return results


@releases_run_lock
def train(cfg: ClassificationConfig, resume: bool = False, typed: Collection[str] = ()
          ) -> dict[str, Any]:
    """Trains (continuing from ``last_checkpoint`` with ``resume``), evaluates, and writes
    ``backbone.pth``; returns the final metrics. ``typed``: the keys the user set on the
    command line, which ``scale_schedule`` keeps as they are."""
    cfg, notes = scale_schedule(cfg, typed)
    device, dist, output_dir, train_set, val_set, model, eval_fn = _setup(
        cfg, "resume" if resume else "train", notes)
    train_loader, sampler = build_cls_train_loader(cfg, train_set, dist, device)
    trainer = Trainer(
        model, build_optimizer(cfg.solver, model), build_lr_schedule(cfg.solver),
        train_loader, max_iter=cfg.train.max_iter, device=device, output_dir=output_dir,
        sampler=sampler, task=TASK,
        meta={"arch": describe_classifier(model, cfg.model.backbone), "config": to_dict(cfg),
              "class_names": list(train_set.class_names)},
        amp=cfg.train.amp, clip_grad_norm=cfg.solver.clip_grad_norm,
        checkpoint_period=cfg.train.checkpoint_period, log_period=cfg.train.log_period,
        eval_fn=eval_fn, eval_period=cfg.train.eval_period,
        best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode,
        finish_fn=functools.partial(precise_bn, cfg=cfg, train_set=train_set, dist=dist,
                                    device=device) if cfg.precise_bn.num_batches else None)
    if resume:
        trainer.resume()        # refuses other classes or another network: nothing written yet
        begin_resumed_run(cfg, output_dir, device, dist, records=(BACKBONE_FILE,))
    result = trainer.run()
    trainer.close()
    if dist.is_main:
        atomic_save(backbone_file(extract_backbone(model.state_dict(), "net."),
                                  model.net.arch()), output_dir / BACKBONE_FILE)
        _write_eval(output_dir, result.eval_results)
    for dataset in (train_set, val_set):
        if hasattr(dataset, "report_skipped_images"):      # data.skip_bad_images
            dataset.report_skipped_images()
    logger.info(f"done: top-1 error {result.eval_results['top1_err']:.2f}%, top-5 error "
                f"{result.eval_results['top5_err']:.2f}%; backbone weights in "
                f"{output_dir / BACKBONE_FILE}")
    return result.eval_results


def precise_bn(model: torch.nn.Module, cfg: ClassificationConfig, train_set, dist,
               device) -> None:
    """Recomputes BN statistics over cfg.precise_bn.num_batches augmented training batches."""
    loader, _ = build_cls_train_loader(cfg, train_set, dist, device, seed=cfg.train.seed + 1)
    used = recompute_bn_stats(model, ((images,) for images, _ in loader),
                              cfg.precise_bn.num_batches, device)
    logger.info(f"precise BN: statistics recomputed over {used} batches")
