"""The one inference loop: every task's evaluation (and the localizer's training proposals)
runs a model over a loader through :func:`run_inference`; an evaluation through
:func:`inference_on_dataset` (detectron2's ``inference_on_dataset(model, loader, evaluator)``).

The task hands in a ready model: an ``nn.Module`` that maps one batch of its loader to the
outputs its evaluator reads (detections, class scores, localizations), in the form the task
chose to test (e.g. the detector's fused inference form). Evaluation imports nothing of
``data/`` or ``models/`` (docs/architecture.md, Layers): a metric reads outputs, not networks.

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
R = TypeVar("R")


class DatasetEvaluator:
    """A metric over a dataset, fed batch by batch (detectron2's ``DatasetEvaluator``).

    ``reset()`` before the first batch, ``process(inputs, outputs)`` for each batch of this
    rank (``inputs`` the loader's batch, ``outputs`` the ready model's answer to it), then
    ``evaluate()`` on every rank: the metrics of all ranks' batches, the same on every rank.
    """

    def reset(self) -> None:
        raise NotImplementedError

    def process(self, inputs: Any, outputs: Any) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict[str, Any]:
        raise NotImplementedError


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


def inference_on_dataset(model: nn.Module, loader: Iterable[Any], evaluator: DatasetEvaluator,
                         device: torch.device | str, amp_dtype: torch.dtype | None = None,
                         desc: str = "eval", progress: bool = True) -> dict[str, Any]:
    """Runs the ready ``model`` over this rank's ``loader`` and returns ``evaluator``'s
    metrics (the same on every rank).

    Args:
        model: maps a batch of ``loader`` to the outputs ``evaluator.process`` takes.
        device: where ``model`` runs (its autocast's device type).
        amp_dtype: autocast to this dtype around the model (None: fp32); the task chooses it.
    """
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                              enabled=amp_dtype is not None)

    def step(inputs: Any) -> list:
        with autocast:
            outputs = model(inputs)
        evaluator.process(inputs, outputs)
        return []                                  # the evaluator keeps what it needs

    evaluator.reset()
    run_inference(model, loader, step, desc=desc, progress=progress)
    return evaluator.evaluate()


def score_on_main(local: list[T], score: Callable[[list[T]], R]) -> R:
    """Every rank's ``local`` items, in rank order, go to the main rank, which alone calls
    ``score`` on them (metrics, file writing); its result comes back on every rank. An error
    in ``score`` stops every rank (named on the others), so that none waits for a result
    that never comes.

    Only the main rank holds the gathered items.
    """
    parts = du.gather_objects(local)
    result = None
    if parts is not None:
        items = [item for part in parts for item in part]
        del parts
        try:
            result = score(items)
        except Exception as e:
            du.broadcast_object((None, f"{type(e).__name__}: {e}"))
            raise
    result, error = du.broadcast_object((result, None))
    if error is not None:
        raise RuntimeError(f"evaluation failed on the main process: {error}")
    return result
