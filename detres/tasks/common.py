"""What the tasks share: the backbone, solver, run and anchor sections of the schema, the
builders for them (ResNet, optimizer, LR schedule), and the name a classification checkpoint
records (localization starts from one).

A task's own schema and build live in ``detres/tasks/<task>/``; this module is the part that
classification, detection and localization have in common.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from detres.config_checks import (AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, SEED, Range,
                                  checked)
from detres.config import replace as replace_config
from detres.engine.schedule import WarmupMultiStepSchedule
from detres.models.resnet import IMAGENET_DEPTHS, ResNet
from detres.weights_io import load_backbone_weights

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
CLASSIFICATION_TASK = "classification"   # a checkpoint's "task" (docs/architecture.md, Carriers)
NON_EMPTY_POSITIVE = Range(0, lo_open=True, non_empty=True)
IOU_PAIR = Range(0, 1, ascending=True)             # (negative below, positive at or above)


# ----------------------------------------------------------------------------- schema
def _valid_depth(depth: int, backbone: BackboneConfig) -> str | None:
    if backbone.stem == "imagenet" and depth not in IMAGENET_DEPTHS:
        return (f"must be one of {', '.join(map(str, IMAGENET_DEPTHS))} with stem imagenet "
                "(Table 1; 6n+2 depths need stem cifar)")
    if backbone.stem == "cifar" and (depth < 8 or (depth - 2) % 6):
        return "must be 6n+2 (20, 32, 44, 56, 110, 1202, ...) with stem cifar (Sec. 4.2)"
    return None


def _valid_freeze_at(freeze_at: int, backbone: BackboneConfig) -> str | None:
    last = 5 if backbone.stem == "imagenet" else 4      # the stem and each stage
    return None if 0 <= freeze_at <= last else f"must be in 0..{last} with stem {backbone.stem}"


def _valid_gn_groups(groups: int, backbone: BackboneConfig) -> str | None:
    # every stage's width is a multiple of the first's, so dividing it suffices
    width = backbone.width or (64 if backbone.stem == "imagenet" else 16)
    if groups < 1 or (backbone.norm == "gn" and width % groups):
        return f"must be an integer >= 1 that divides the backbone width, {width} (norm: gn)"
    return None


def _plain_net_zero_init(zero_init: bool, backbone: BackboneConfig) -> str | None:
    if zero_init and not backbone.residual:       # it would zero every block
        return "must be false for a plain net (residual: false)"
    return None


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    # 18/34/50/101/152 for ImageNet nets (Table 1); 6n+2 (20, 32, ..., 1202) for CIFAR nets (Sec. 4.2)
    depth: int = checked(50, _valid_depth)
    # imagenet: 7x7 stem + max pool, four stages; cifar: 3x3 stem, three stages (Sec. 4.2)
    stem: Literal["imagenet", "cifar"] = "imagenet"
    # false gives the plain net of the same depth: no shortcuts (Fig. 3 middle, Table 2, Fig. 6)
    residual: bool = True
    # A: zero-padding identity, B: projections where shape changes, C: all projections (Table 3)
    shortcut: Literal["A", "B", "C"] = "B"
    # true: stride in the first 1x1 of a bottleneck (MSRA original); false: in the 3x3 (torchvision)
    stride_in_1x1: bool = False
    # base channel count; null means the paper's (64 ImageNet, 16 CIFAR); narrow nets suit CPUs
    width: int | None = checked(None, AT_LEAST_1)
    # bn | frozen_bn (statistics and affine fixed, as for detection, Appendix A) | gn
    norm: Literal["bn", "frozen_bn", "gn"] = "bn"
    gn_groups: int = checked(32, _valid_gn_groups)
    # 0 trains everything; 1 freezes the stem (conv1); k freezes the stem and the first k-1 stages
    freeze_at: int = checked(0, _valid_freeze_at)
    # null (random init), a local state-dict file, or torchvision://resnet50 (ImageNet weights)
    weights: str | None = None
    # zero-init the last norm of each residual branch, so blocks start as identities
    zero_init_residual: bool = checked(False, _plain_net_zero_init)


@dataclass(frozen=True, kw_only=True)
class AnchorConfig:
    # paper VOC: 128, 256, 512; paper COCO adds 64 (Appendix A); modern: 32..512
    sizes: tuple[float, ...] = checked((64.0, 128.0, 256.0, 512.0), NON_EMPTY_POSITIVE)
    aspect_ratios: tuple[float, ...] = checked((0.5, 1.0, 2.0), NON_EMPTY_POSITIVE)


@dataclass(frozen=True, kw_only=True)
class SolverConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"       # SGD with momentum as in the paper (Sec. 3.4)
    base_lr: float = checked(0.1, POSITIVE)           # for ims_per_batch images (Sec. 3.4: 0.1 at 256)
    # global batch over all processes; each rank takes ims_per_batch / world_size
    ims_per_batch: int = checked(256, AT_LEAST_1)
    # the batch that base_lr and the iteration counts are written for: when set, the LR is
    # multiplied by ims_per_batch / reference_batch (linear scaling rule) and, in
    # tools/train_det.py, max_iter, steps, warmup and the periods divided by it
    reference_batch: int | None = checked(None, AT_LEAST_1)
    momentum: float = checked(0.9, FRACTION)
    weight_decay: float = checked(1e-4, AT_LEAST_0)
    # no weight decay on norm weights and biases (common for AdamW; the paper decays all)
    no_decay_norm_bias: bool = False
    steps: tuple[int, ...] = checked((), AT_LEAST_1)  # iterations where the LR is multiplied by gamma
    gamma: float = checked(0.1, POSITIVE)
    warmup_iters: int = checked(0, AT_LEAST_0)         # linear warmup length in iterations
    warmup_factor: float = checked(0.001, FRACTION)    # LR multiplier at iteration 0 of the warmup
    # constant warmup at warmup_factor instead of linear (ResNet-110 on CIFAR: 0.01 for 400 iters)
    warmup_method: Literal["linear", "constant"] = "linear"
    clip_grad_norm: float | None = checked(None, POSITIVE)   # null: no clipping
    betas: tuple[float, float] = checked((0.9, 0.999), Range(0, 1, hi_open=True))  # AdamW only


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    # where a run writes (docs/architecture.md, Run folder) and how; TrainConfig adds iterations
    output_dir: str = "output/run"
    # a fresh run into an output_dir that holds a run: false refuses; true removes the old run's
    # records (checkpoints, last_checkpoint, metrics, eval/, eval_only/, stage folders) first
    overwrite: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = checked(0, SEED)
    # autocast: auto = bf16 on CUDA, float32 on CPUs; bf16 = bf16 on CUDA and on CPUs that
    # compute bf16 natively (avx512_bf16, amx_bf16); fp16 (CUDA, with loss scaling); none
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    checkpoint_period: int = checked(1000, AT_LEAST_0)     # 0: at the end only
    log_period: int = checked(20, AT_LEAST_0)
    num_workers: int = checked(2, AT_LEAST_0)
    deterministic: bool = False                         # torch.use_deterministic_algorithms
    # intra-op CPU threads per process; 0 keeps PyTorch's default (one per core). 1 is faster
    # on a CPU shared with other jobs, where spinning OpenMP threads wait on each other
    num_threads: int = checked(0, AT_LEAST_0)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
    max_iter: int = checked(1000, AT_LEAST_1)
    eval_period: int = checked(0, AT_LEAST_0)          # 0: evaluate at the end only
    # keep model_best.pth, the checkpoint that scored best at the evaluations so far, by this
    # metric named as in eval/metrics.json: bbox/AP (bbox/mAP with VOC metrics), top1_err, ...;
    # null keeps none (model_best.json records its value and iteration)
    best_metric: str | None = None
    # max | min | auto: minimise a metric whose name has "err" or "loss" in it, maximise others
    best_mode: Literal["auto", "max", "min"] = "auto"


# ----------------------------------------------------------------------------- builders
def build_backbone(cfg: BackboneConfig, num_classes: int | None = None) -> ResNet:
    """A ResNet from ``model.backbone``; with ``num_classes`` it has avgpool + fc.

    ``cfg.weights`` is loaded with ``fc`` ignored (a backbone file or an ImageNet classifier
    initialises any head size).
    """
    net = ResNet(cfg.depth, stem=cfg.stem, num_classes=num_classes, residual=cfg.residual,
                 shortcut=cfg.shortcut, stride_in_1x1=cfg.stride_in_1x1, width=cfg.width,
                 norm=cfg.norm, gn_groups=cfg.gn_groups, freeze_at=cfg.freeze_at,
                 zero_init_residual=cfg.zero_init_residual)
    if cfg.weights:
        load_backbone_weights(net, cfg.weights, ignore_prefixes=("fc.",))
    return net


def build_optimizer(cfg: SolverConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (Sec 3.4) or AdamW over the trainable parameters.

    The LR is ``base_lr`` (:func:`scale_schedule` has adapted it to the batch). With
    ``no_decay_norm_bias`` norm weights and all biases get no weight decay.
    """
    lr = cfg.base_lr
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = cfg.no_decay_norm_bias and (isinstance(module, NORM_TYPES) or name == "bias")
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas)


def build_lr_schedule(cfg: SolverConfig) -> WarmupMultiStepSchedule:
    return WarmupMultiStepSchedule(steps=tuple(cfg.steps), gamma=cfg.gamma,
                                   warmup_iters=cfg.warmup_iters,
                                   warmup_factor=cfg.warmup_factor,
                                   warmup_method=cfg.warmup_method)


# ----------------------------------------------------------------------------- batch scaling
C = TypeVar("C")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def scale_schedule(cfg: C, typed: Collection[str] = (),
                   stages: Sequence[tuple[str, str]] = (("solver", "train"),)
                   ) -> tuple[C, list[str]]:
    """Adapts schedules written for ``solver.reference_batch`` images to ``ims_per_batch``,
    the same way for every task; returns the resolved config and one line per scaled stage.

    With k = ims_per_batch / reference_batch, the LR is multiplied by k (linear scaling rule)
    and the iteration counts (max_iter, steps, warmup; checkpoint and eval periods for the
    ``train`` section) divided by it, so the run sees as many images. What the user typed
    (``typed``: dotted keys of the command line's overrides) runs as typed. The resolved config
    sets reference_batch = ims_per_batch, so running from a run's ``config.yaml`` does not
    scale again. ``stages``: (solver section, section holding max_iter) per network trained.
    """
    overrides, notes = [], []
    for solver_key, iters_key in stages:
        solver, iters = _get(cfg, solver_key), _get(cfg, iters_key)
        ref, ims = solver.reference_batch, solver.ims_per_batch
        if not ref or ref == ims:
            continue
        k = ims / ref
        values = {f"{solver_key}.base_lr": (solver.base_lr, solver.base_lr * k),
                  f"{iters_key}.max_iter": (iters.max_iter, _scaled(iters.max_iter, k)),
                  f"{solver_key}.steps": (list(solver.steps), [_scaled(n, k) for n in solver.steps]),
                  f"{solver_key}.warmup_iters": (solver.warmup_iters,
                                                 _scaled(solver.warmup_iters, k))}
        if iters_key == "train":
            for period in ("checkpoint_period", "eval_period"):
                n = getattr(iters, period)
                values[f"train.{period}"] = (n, _scaled(n, k))
        changes = []
        for key, (before, after) in values.items():
            if key in typed:
                changes.append(f"{key} {before} (as typed)")
            elif before != after:
                overrides.append(f"{key}={after}")
                changes.append(f"{key} {before} -> {after:.6g}" if isinstance(after, float)
                               else f"{key} {before} -> {after}")
        overrides.append(f"{solver_key}.reference_batch={ims}")
        notes.append(f"{solver_key}.ims_per_batch {ims} is {k:.4g}x {solver_key}.reference_batch "
                     f"{ref}, so the schedule is scaled: " + ", ".join(changes))
    return (replace_config(cfg, overrides) if overrides else cfg), notes


def _scaled(n: int, k: float) -> int:
    return max(int(round(n / k)), 1) if n else 0
