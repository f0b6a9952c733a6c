"""What every task shares: the backbone, solver and run sections of the schema, and the
builders for them (ResNet, optimizer, LR schedule).

A task's own schema and build live in ``detres/tasks/<task>/``; this module is the part that
classification, detection and localization have in common.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from detres.engine.schedule import WarmupMultiStepSchedule, scale_lr
from detres.models.resnet import ResNet
from detres.models.weights import load_weights

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


# ----------------------------------------------------------------------------- schema
@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    # 18/34/50/101/152 for ImageNet nets (Table 1); 6n+2 (20, 32, ..., 1202) for CIFAR nets (Sec. 4.2)
    depth: int = 50
    # imagenet: 7x7 stem + max pool, four stages; cifar: 3x3 stem, three stages (Sec. 4.2)
    stem: Literal["imagenet", "cifar"] = "imagenet"
    # false gives the plain net of the same depth: no shortcuts (Fig. 3 middle, Table 2, Fig. 6)
    residual: bool = True
    # A: zero-padding identity, B: projections where shape changes, C: all projections (Table 3)
    shortcut: Literal["A", "B", "C"] = "B"
    # true: stride in the first 1x1 of a bottleneck (MSRA original); false: in the 3x3 (torchvision)
    stride_in_1x1: bool = False
    # base channel count; null means the paper's (64 ImageNet, 16 CIFAR); narrow nets suit CPUs
    width: int | None = None
    # bn | frozen_bn (statistics and affine fixed, as for detection, Appendix A) | gn
    norm: Literal["bn", "frozen_bn", "gn"] = "bn"
    gn_groups: int = 32
    # 0 trains everything; 1 freezes the stem (conv1); k freezes the stem and the first k-1 stages
    freeze_at: int = 0
    # null (random init), a local state-dict file, or torchvision://resnet50 (ImageNet weights)
    weights: str | None = None
    # zero-init the last norm of each residual branch, so blocks start as identities
    zero_init_residual: bool = False


@dataclass(frozen=True, kw_only=True)
class SolverConfig:
    optimizer: Literal["sgd", "adamw"] = "sgd"       # SGD with momentum as in the paper (Sec. 3.4)
    base_lr: float = 0.1                              # for ims_per_batch images (Sec. 3.4: 0.1 at 256)
    # global batch over all processes; each rank takes ims_per_batch / world_size
    ims_per_batch: int = 256
    # the batch that base_lr and the iteration counts are written for: when set, the LR is
    # multiplied by ims_per_batch / reference_batch (linear scaling rule) and, in
    # tools/train_det.py, max_iter, steps, warmup and the periods divided by it
    reference_batch: int | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # no weight decay on norm weights and biases (common for AdamW; the paper decays all)
    no_decay_norm_bias: bool = False
    steps: tuple[int, ...] = ()                       # iterations at which the LR is multiplied by gamma
    gamma: float = 0.1
    warmup_iters: int = 0                              # linear warmup length in iterations
    warmup_factor: float = 0.001                       # LR multiplier at iteration 0 of the warmup
    # constant warmup at warmup_factor instead of linear (ResNet-110 on CIFAR: 0.01 for 400 iters)
    warmup_method: Literal["linear", "constant"] = "linear"
    clip_grad_norm: float | None = None                # null: no clipping
    betas: tuple[float, float] = (0.9, 0.999)          # AdamW only


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    # where a run writes (docs/architecture.md, Run folder) and how; TrainConfig adds iterations
    output_dir: str = "output/run"
    # a fresh run into an output_dir that holds a run: false refuses; true removes the old run's
    # records (checkpoints, last_checkpoint, metrics, eval/, eval_only/, stage folders) first
    overwrite: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    # mixed precision on CUDA only; ignored on CPU
    amp: Literal["none", "bf16", "fp16"] = "bf16"
    checkpoint_period: int = 1000
    log_period: int = 20
    num_workers: int = 2
    deterministic: bool = False                         # torch.use_deterministic_algorithms
    # intra-op CPU threads per process; 0 keeps PyTorch's default (one per core). 1 is faster
    # on a CPU shared with other jobs, where spinning OpenMP threads wait on each other
    num_threads: int = 0


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
    max_iter: int = 1000
    eval_period: int = 0                               # 0: evaluate at the end only
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
        load_weights(net, cfg.weights, ignore_prefixes=("fc.",))
    return net


def build_optimizer(cfg: SolverConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum (Sec 3.4) or AdamW over the trainable parameters.

    The LR is ``base_lr``, times ``ims_per_batch / reference_batch`` when ``reference_batch``
    is set. With ``no_decay_norm_bias`` norm weights and all biases get no weight decay.
    """
    lr = scale_lr(cfg.base_lr, cfg.ims_per_batch, cfg.reference_batch)
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
