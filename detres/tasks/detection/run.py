"""Detection runs: ``train(cfg)`` trains and evaluates Faster R-CNN C4 (Appendix A);
``evaluate(cfg, weights)`` scores a checkpoint on ``data.val``. Both return the metrics and
write into the run folder of docs/architecture.md: ``train`` into ``train.output_dir``,
``evaluate`` into its own new ``train.output_dir/eval_only/<YYYYmmdd-HHMMSS>/`` (without a
config: beside the checkpoint)."""
from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from typing import Any

from detres.config import ConfigError, to_dict
from detres.engine.checkpoint import CheckpointError, class_difference
from detres.engine.launch import (begin_resumed_run, beside_weights, releases_run_lock,
                                  setup_run)
from detres.engine.loop import Trainer
from detres.engine.precision import cuda_amp_dtype
from detres.evaluation.detection import (BoxEvaluator, COCOEvaluator, FormatOnlyEvaluator,
                                        VOCEvaluator)
from detres.evaluation.inference import inference_on_dataset
from detres.models.inference_form import inference_amp_dtype
from detres.tasks.common import build_lr_schedule, build_optimizer, scale_schedule
from detres.tasks.detection.build import (TASK, build_det_dataset, build_det_test_loader,
                                          build_det_train_loader, build_detector,
                                          build_test_detector, describe_detector)
from detres.tasks.detection.config import DetectionConfig
from detres.tasks.detection.inference import dataset_info, ready_detector
from detres.tasks.detection.load import load_detector
from detres.tasks.detection.memory import check_iteration_memory


def _evaluator(cfg: DetectionConfig, device, dist, output_dir, metric: str | None = None,
               engine: str = "faster"):
    """(val set, ``models -> metrics``) for ``data.val`` with ``test.metric`` (or ``metric``);
    the function takes a detector or a list (an ensemble), applies the ``test.*`` switches
    (``build_test_detector``) and runs it in its inference form (``ready_detector``)."""
    val_set = build_det_dataset(cfg.data.val, cfg.data, train=False, key="data.val",
                                test_scales=cfg.test.scales)
    if not getattr(val_set, "has_annotations", True) and not cfg.test.format_only:
        raise ConfigError(f"data.val: {val_set.source} has no ground truth (image info only, "
                          f"as COCO test-dev); set test.format_only=true (tools/eval_det.py "
                          f"--format-only) to write the results for the evaluation server")
    if cfg.test.format_only and cfg.data.val.type == "imagenet_det" \
            and (metric or cfg.test.metric) != "coco" and not val_set.label_to_category_id:
        raise ConfigError(f"data.val: {val_set.source}: the ILSVRC server's results file needs "
                          f"each class's DET id from the devkit's devkit/data/map_det.txt, not "
                          f"found in data.val.root (or not listing every class)")
    val_loader = build_det_test_loader(cfg, val_set, dist, device)
    info, metric = dataset_info(val_set), metric or cfg.test.metric
    amp = inference_amp_dtype(device, cfg.test.cpu_amp, cuda_amp_dtype(cfg.train.amp))

    def box_evaluator(summary_only: bool) -> BoxEvaluator:
        if cfg.test.format_only:
            voc_split = tuple(cfg.data.val.splits[0].split("/", 1)) \
                if cfg.data.val.type == "voc" else ("2012", "test")
            style = ("coco" if metric == "coco" else
                     "ilsvrc_det" if cfg.data.val.type == "imagenet_det" else "voc")
            return FormatOnlyEvaluator(info, output_dir, style, voc_split)
        if metric == "coco":
            return COCOEvaluator(info, output_dir, engine, summary_only)
        return VOCEvaluator(info, metric, output_dir, summary_only)

    def evaluate_models(models, summary_only: bool = True) -> dict[str, Any]:
        models = models if isinstance(models, (list, tuple)) else [models]
        model = ready_detector(build_test_detector(cfg, models), device, cfg.test.fast_path,
                               cfg.test.compile)
        return inference_on_dataset(model, val_loader, box_evaluator(summary_only), device, amp)
    return val_set, evaluate_models


def evaluate(cfg: DetectionConfig | None, weights: str | Sequence[str],
             metric: str | None = None, engine: str = "faster", summary_only: bool = True,
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Scores checkpoint ``weights`` (several: an ensemble, Appendix B) on ``data.val``
    (``metric`` overrides ``test.metric``, ``engine`` picks the COCO engine); per-class AP
    too when not ``summary_only`` (the training log and ``tools/train_det.py --eval-only``
    return the summary, as training does).

    ``cfg`` None: the config stored in the (first) checkpoint with ``overrides``, its records
    beside that checkpoint unless the overrides set ``train.output_dir``. The checkpoints are
    checked (``load_detector``) before any record is written."""
    paths = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
    loaded = load_detector(paths, cfg, overrides)
    run_cfg = loaded.cfg if cfg is not None else beside_weights(
        loaded.cfg, paths[0], {item.partition("=")[0].strip() for item in overrides})
    device, dist, output_dir, logger = setup_run(run_cfg, "eval")
    val_set, eval_fn = _evaluator(run_cfg, device, dist, output_dir, metric, engine)
    trained, held = list(loaded.class_names), list(val_set.class_names)
    if trained != held:     # the same count with other names would be scored label by label
        raise CheckpointError(f"{paths[0]} was trained on other classes than data.val holds: "
                              f"{class_difference(trained, held, here='in data.val')}; "
                              f"evaluate it on the data it was trained on")
    metrics = eval_fn([d.to(device) for d in loaded.detectors], summary_only=summary_only)
    logger.info(f"records in {output_dir}")
    return metrics


def check_trainable(cfg: DetectionConfig) -> None:
    """Frozen BN keeps the statistics and affine of pretraining (Appendix A): a randomly
    initialised net has none to keep, and its first loss is not finite."""
    b = cfg.model.backbone
    if b.norm == "frozen_bn" and not b.weights and not cfg.model.weights:
        raise ConfigError(
            "model.backbone.norm = frozen_bn with model.backbone.weights = null: frozen "
            "BatchNorm keeps the statistics of pretraining, and a random network has none; "
            "give pretrained weights (model.backbone.weights=torchvision://resnet50, a backbone "
            "file of tools/pretrain_cls.py, or model.weights) or train from scratch with "
            "model.backbone.norm=gn")


@releases_run_lock
def train(cfg: DetectionConfig, resume: bool = False, typed: Collection[str] = ()
          ) -> dict[str, Any]:
    """Trains (continuing from ``last_checkpoint`` with ``resume``) and evaluates; returns the
    final summary metrics. ``typed``: the keys the user set on the command line, which
    ``scale_schedule`` keeps as they are."""
    check_trainable(cfg)
    cfg, notes = scale_schedule(cfg, typed)
    device, dist, output_dir, logger = setup_run(cfg, "resume" if resume else "train")
    for note in notes:
        logger.info(note)
    val_set, eval_fn = _evaluator(cfg, device, dist, output_dir)
    train_set = build_det_dataset(cfg.data.train, cfg.data, train=True, key="data.train")
    if list(val_set.class_names) != list(train_set.class_names):
        raise ConfigError(f"data.val has classes {val_set.class_names[:5]}... but data.train has "
                          f"{train_set.class_names[:5]}...; both must share one class list")
    # before the model is built (and its weights downloaded): a run that cannot fit stops here
    check_iteration_memory(cfg, train_set.num_classes, dist, device, logger)
    model = build_detector(cfg.model, train_set.num_classes).to(device)
    train_loader = build_det_train_loader(cfg, train_set, dist, device)
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(f"{len(train_set)} training and {len(val_set)} test images, "
                f"{train_set.num_classes} classes; {num_params / 1e6:.2f}M trainable parameters")
    trainer = Trainer(
        model, build_optimizer(cfg.solver, model), build_lr_schedule(cfg.solver),
        train_loader, max_iter=cfg.train.max_iter, device=device, output_dir=output_dir,
        sampler=train_loader.batch_sampler, task=TASK,
        meta={"arch": describe_detector(cfg.model, train_set.num_classes),
              "config": to_dict(cfg), "class_names": list(train_set.class_names),
              "category_ids": [int(c) for c in getattr(train_set, "label_to_category_id", [])]},
        amp=cfg.train.amp, clip_grad_norm=cfg.solver.clip_grad_norm,
        checkpoint_period=cfg.train.checkpoint_period, log_period=cfg.train.log_period,
        eval_fn=eval_fn, eval_period=cfg.train.eval_period,
        best_metric=cfg.train.best_metric, best_mode=cfg.train.best_mode, metrics_prefix="bbox")
    if resume:
        trainer.resume()        # refuses other classes or another network: nothing written yet
        begin_resumed_run(cfg, output_dir, device, dist)
    result = trainer.run()
    trainer.close()
    for dataset in (train_set, val_set):
        dataset.report_skipped_images()
    logger.info("done: " + ", ".join(f"{k} {v:.1f}" for k, v in result.eval_results.items()
                                     if isinstance(v, float)))
    return result.eval_results
