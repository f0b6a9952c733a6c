"""Localization runs (He et al. 2015, Appendix C). ``train(cfg)`` trains the three networks in
turn, each an ordinary training run in its own sub-folder of ``train.output_dir``:

1. ``classifier/``: the classification network (skipped when ``classifier.weights`` is given);
2. ``rpn/``: the per-class RPN on random crops, a few anchors sampled per image;
3. ``rcnn/``: the R-CNN refiner on the RPN's top proposals for each training image's classes
   (``rcnn/proposals.pth`` and one ``proposals.rank{r}.npy`` per rank, read through memory
   maps: ``tasks/localization/proposals.py``), RoI-centric (skipped when ``rcnn.enabled`` is
   false);

then writes ``model_final.pth`` (all three) and evaluates. With ``resume`` finished stages are
loaded from their ``model_final.pth`` and an interrupted one continues from its last
checkpoint. ``evaluate(cfg, weights)`` scores a trained localizer. Both write
``eval/metrics.json`` ({"RPN": {...}, "RPN+R-CNN": {...}}, percent) and
``eval/predictions.json``: ``train`` into ``train.output_dir``, ``evaluate`` into its own new
``train.output_dir/eval_only/<YYYYmmdd-HHMMSS>/`` (``engine/launch.py::setup_run``).
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from detres.config import to_dict
from detres.data import loc_batches
from detres.data.samplers import TrainingSampler
from detres.engine import distributed as du
from detres.engine.checkpoint import (Checkpointer, atomic_save, check_resume,
                                      load_checkpoint_weights, read_checkpoint)
from detres.engine.launch import begin_resumed_run, releases_run_lock, setup_run
from detres.engine.loop import Trainer
from detres.evaluation.inference import inference_on_dataset
from detres.evaluation.localization_runner import LocalizationEvaluator
from detres.models.loc_inference import LocTestSettings
from detres.tasks.common import SolverConfig, build_lr_schedule, build_optimizer, scale_schedule
from detres.tasks.localization.build import (TASK, build_loc_dataset, build_loc_train_transform,
                                             build_localizer, copy_classifier_weights,
                                             index_cache_dir, load_localizers,
                                             loc_test_settings)
from detres.tasks.localization.config import LocalizationConfig
from detres.tasks.localization.inference import BatchLocalizer
from detres.tasks.localization.proposals import cached_training_proposals

STAGES = ("classifier", "rpn", "rcnn")      # the sub-folders of a training run, in order
# the R-CNN's training proposals (proposals.py): this task's own records of a run
RECORDS = ("rcnn/proposals.pth", "rcnn/proposals.rank[0-9]*.npy")


@dataclass(frozen=True)
class Run:
    """What every stage of one training run shares."""

    cfg: LocalizationConfig
    output_dir: Path
    device: torch.device
    dist: du.DistInfo
    resume: bool
    meta: dict[str, Any]

    def finished(self, stage: str) -> bool:
        return self.resume and (self.output_dir / stage / "model_final.pth").is_file()

    def inference_loader(self, dataset: Any):
        return loc_batches.inference_loader(dataset, self.cfg.test.ims_per_batch, self.dist.rank,
                                       self.dist.world_size, self.cfg.train.num_workers)


def train_stage(run: Run, name: str, module: torch.nn.Module, dataset: Any, collate: Any,
                solver: SolverConfig, max_iter: int, positions: bool = True) -> None:
    """Trains one network in ``output_dir/name``; with ``resume`` a finished stage is loaded
    from its model_final.pth and an interrupted one continues from its last checkpoint."""
    stage_dir, task = run.output_dir / name, f"{TASK}-{name}"
    if run.finished(name):
        load_checkpoint_weights(module, stage_dir / "model_final.pth", task)
        return
    cfg = run.cfg
    sampler = TrainingSampler(len(dataset), solver.ims_per_batch, seed=cfg.train.seed,
                              rank=run.dist.rank, world_size=run.dist.world_size,
                              key=f"{name}.solver.ims_per_batch")
    loader = loc_batches.train_loader(dataset, collate, sampler, cfg.train.num_workers,
                                      run.device.type == "cuda", positions)
    module.train()
    trainer = Trainer(module, build_optimizer(solver, module), build_lr_schedule(solver), loader,
                      max_iter=max_iter, device=run.device, output_dir=stage_dir,
                      sampler=sampler, task=task, meta=run.meta, amp=cfg.train.amp,
                      clip_grad_norm=solver.clip_grad_norm,
                      checkpoint_period=cfg.train.checkpoint_period,
                      log_period=cfg.train.log_period, name=name)
    if run.resume:
        trainer.resume()
    trainer.run()
    trainer.close()


def check_stages(run: Run, modules: dict[str, torch.nn.Module | None]) -> None:
    """Refuses to resume, before anything is written, when a stage's checkpoint (its
    model_final.pth when finished, else its last checkpoint) holds other classes or another
    network than ``modules`` (None: a stage this run does not train)."""
    for name, module in modules.items():
        stage_dir = run.output_dir / name
        path = (stage_dir / "model_final.pth" if run.finished(name)
                else Checkpointer(stage_dir).last_checkpoint())
        if module is not None and path is not None:
            check_resume(read_checkpoint(path), path, module, f"{TASK}-{name}",
                         run.meta["class_names"], run.meta["config"])


def evaluate_localizer(run: Run, model: torch.nn.Module, dataset: Any,
                       settings: LocTestSettings) -> dict[str, dict[str, float]]:
    """Runs and scores the pipeline on ``dataset`` (built with ``transform=None``) on every
    rank; the main rank logs the Table-13-style table and writes ``eval/``."""
    evaluator = LocalizationEvaluator(dataset, run.output_dir, settings.scales)
    return inference_on_dataset(BatchLocalizer(model, dataset, settings, run.device),
                                run.inference_loader(dataset), evaluator, run.device,
                                desc="localize")


def evaluate(cfg: LocalizationConfig | None, weights: str | Sequence[str],
             overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Scores the localizer of checkpoint ``weights`` (rebuilt from the config stored in it)
    on ``data.val`` with ``test``'s settings, both from ``cfg``, or when ``cfg`` is None from
    the (first) stored config with ``overrides`` (e.g. ``test.scales=[224,288]``). Several
    checkpoints are tested as one ensemble (``loc_inference.LocalizerEnsemble``)."""
    model, stored, meta = load_localizers(weights, overrides)
    cfg = cfg or stored
    device, dist, output_dir, _ = setup_run(cfg, "eval")
    val_set = build_loc_dataset(cfg.data.val, cfg.data, key="data.val",
                                class_names=meta["class_names"],
                                cache_dir=index_cache_dir(cfg.data, cfg.train.output_dir))
    run = Run(cfg, output_dir, device, dist, False, meta)
    return evaluate_localizer(run, model.to(device), val_set, loc_test_settings(cfg))


@releases_run_lock
def train(cfg: LocalizationConfig, resume: bool = False, typed: Collection[str] = ()
          ) -> dict[str, Any]:
    """Trains the three stages, saves ``model_final.pth`` and evaluates; returns the metrics
    per method. ``typed``: the keys the user set on the command line, which
    ``scale_schedule`` keeps as they are."""
    cfg, notes = scale_schedule(cfg, typed, [(f"{s}.solver", s) for s in STAGES])
    device, dist, output_dir, logger = setup_run(cfg, "resume" if resume else "train", STAGES,
                                            RECORDS)
    for note in notes:
        logger.info(note)
    settings = loc_test_settings(cfg)
    # indexed once; the stages see it through their own transforms
    cache_dir = index_cache_dir(cfg.data, cfg.train.output_dir)
    train_images = build_loc_dataset(cfg.data.train, cfg.data, key="data.train",
                                     cache_dir=cache_dir)
    names = list(train_images.class_names)
    train_set = train_images.with_transform(build_loc_train_transform(cfg.data))
    val_set = build_loc_dataset(cfg.data.val, cfg.data, key="data.val", class_names=names,
                                cache_dir=cache_dir)
    model = build_localizer(cfg, len(names)).to(device)
    logger.info(f"{len(train_set)} training and {len(val_set)} test images, {len(names)} "
                f"classes; R-CNN {'on' if model.rcnn is not None else 'off'}")
    run = Run(cfg, output_dir, device, dist, resume, {"config": to_dict(cfg), "class_names": names})
    if resume:
        check_stages(run, {"classifier": None if cfg.classifier.weights else model.classifier,
                           "rpn": model.rpn, "rcnn": model.rcnn})
        begin_resumed_run(cfg, output_dir, device, dist, STAGES, RECORDS)

    if not cfg.classifier.weights:
        cls_set = train_images.with_transform(build_loc_train_transform(
            cfg.data, cfg.classifier.scale_range, cfg.classifier.crop_size))
        train_stage(run, "classifier", model.classifier, cls_set, loc_batches.collate_classifier,
                    cfg.classifier.solver, cfg.classifier.max_iter)
    if cfg.rpn.init_from_classifier and not run.finished("rpn"):
        copy_classifier_weights(model.classifier, model.rpn.trunk, "rpn")
    train_stage(run, "rpn", model.rpn, train_set, loc_batches.collate_rpn, cfg.rpn.solver,
                cfg.rpn.max_iter)
    if model.rcnn is not None:
        if cfg.rcnn.init_from_classifier and not run.finished("rcnn"):
            copy_classifier_weights(model.classifier, model.rcnn.net, "rcnn")
        proposals = cached_training_proposals(
            output_dir / "rcnn" / "proposals.pth", resume, model.rpn,
            run.inference_loader(train_images), train_images, settings, device)
        samples = loc_batches.RCNNSamples(train_images, proposals, cfg.rcnn.rois_per_image,
                                          cfg.data.flip_prob)
        train_stage(run, "rcnn", model.rcnn, samples, loc_batches.collate_rcnn, cfg.rcnn.solver,
                    cfg.rcnn.max_iter, positions=False)

    if dist.is_main:
        atomic_save({"model": model.state_dict(), "task": TASK, **run.meta},
                    output_dir / "model_final.pth")
        logger.info(f"saved {output_dir / 'model_final.pth'}")
    metrics = evaluate_localizer(run, model, val_set, settings)
    for dataset in (train_set, val_set):
        dataset.report_skipped_images()
    return metrics

