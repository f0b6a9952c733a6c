"""Precise BN: BatchNorm statistics recomputed over training batches after training, before
BN is frozen for detection (Appendix A)."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from detres.engine import distributed as du
from detres.engine.loop import call_model, move_to_device


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, data: Iterable, num_batches: int,
                       device: torch.device | str = "cpu") -> int:
    """Precise BN: replaces BN running statistics by their average over ``num_batches``.

    The running averages collected during training lag behind the weights; the paper computes
    BN statistics on the training set before freezing BN for detection (Appendix A). Each
    BatchNorm gets momentum=None (a cumulative average) for the pass; under torchrun the
    statistics are then averaged over ranks. Returns the number of batches used.
    """
    bns = [m for m in model.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or num_batches <= 0:
        return 0
    was_training, momenta = model.training, [bn.momentum for bn in bns]
    model.train()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    used = 0
    for batch in data:
        if used == num_batches:
            break
        call_model(model, move_to_device(batch, torch.device(device)))
        used += 1
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        bn.running_mean.copy_(du.all_reduce_tensor(bn.running_mean))
        bn.running_var.copy_(du.all_reduce_tensor(bn.running_var))
    model.train(was_training)
    return used
