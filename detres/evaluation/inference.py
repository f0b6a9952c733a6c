"""The one inference loop: every task's evaluation (and the localizer's training proposals)
runs a model over a loader through :func:`run_inference`.

:func:`inference_context` puts the model in eval mode and gives back its previous mode on
leaving, also when an exception leaves the loop (as detectron2's ``inference_context``); the
loop runs under ``torch.no_grad`` with a progress bar on the main process.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from tqdm import tqdm

from detres.engine import distributed as du

T = TypeVar("T")


@contextlib.contextmanager
def inference_context(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; on exit every submodule gets back its own
    train/eval mode (a single ``model.train(was_training)`` would wake up submodules that
    training keeps in eval mode, e.g. frozen BatchNorm)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def run_inference(model: nn.Module, loader: Iterable[Any], step: Callable[[Any], list[T]],
                  desc: str = "eval", progress: bool = True) -> list[T]:
    """``step(batch)`` for every batch of ``loader`` with ``model`` in eval mode and no
    autograd; returns the concatenated per-batch lists, in loader order."""
    out: list[T] = []
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = tqdm(loader, total=total, desc=desc, dynamic_ncols=True, leave=False,
               disable=not (progress and du.get_dist_info().is_main))
    with inference_context(model), torch.no_grad():
        for batch in bar:
            out.extend(step(batch))
    return out
