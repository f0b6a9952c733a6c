"""The best checkpoint: ``model_best.pth``, the training state that scored best on one
evaluation metric so far, kept beside the periodic checkpoints.

The metric is named as in ``eval/metrics.json`` with ``/`` between levels: ``bbox/AP`` (COCO),
``bbox/mAP`` (VOC), ``top1_err`` (classification). The direction is ``max``, ``min``, or
``auto``: minimise a name whose last part contains ``err`` or ``loss`` (top-1 error, a loss),
maximise any other (AP, accuracy). Only a strictly better value replaces the best, and a NaN
never does.

``model_best.pth`` is a full checkpoint (what ``model_XXXXXXX.pth`` holds) whose ``best`` entry
is ``{"metric", "mode", "value", "iteration"}``; ``model_best.json`` repeats that entry for
scripts. Both are written atomically, and ``last_checkpoint`` never names ``model_best.pth``.
The best so far is also stored in every checkpoint, and on resume the better of that and the
``best`` entry of the folder's ``model_best.pth`` is restored: a checkpoint taken just before
an evaluation does not know that evaluation's result, the file does.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from detres.config import ConfigError
from detres.weights_io import UnreadableWeightsError, read_torch_file

BEST_CHECKPOINT = "model_best.pth"
BEST_RECORD = "model_best.json"
Mode = Literal["auto", "max", "min"]
logger = logging.getLogger("detres")


def metric_direction(metric: str, mode: Mode = "auto") -> Literal["max", "min"]:
    """``mode`` itself, or for ``auto``: ``min`` when the last part of ``metric`` names an
    error or a loss, else ``max``."""
    if mode in ("max", "min"):
        return mode
    if mode != "auto":
        raise ValueError(f"best mode must be auto, max or min, got {mode!r}")
    last = metric.rsplit("/", 1)[-1].lower()
    return "min" if "err" in last or "loss" in last else "max"


def flatten_metrics(results: Mapping[str, Any], prefix: str | None = None) -> dict[str, float]:
    """The numbers of a (nested) results dict under ``/``-joined names, e.g.
    ``{"AP": 40.0, "per_class": {"cat": 38.0}}`` with prefix ``bbox`` ->
    ``{"bbox/AP": 40.0, "bbox/per_class/cat": 38.0}``."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


class BestTracker:
    """Remembers the best value of ``metric`` seen so far and at which iteration.

    Args:
        metric: the metric's name in ``eval/metrics.json`` (``train.best_metric``).
        mode: ``auto``, ``max`` or ``min`` (``train.best_mode``); see the module docstring.
        prefix: the name the evaluation's results stand under in ``eval/metrics.json``
            (``bbox`` for detection; None when they stand at the top, as for classification).
    """

    def __init__(self, metric: str, mode: Mode = "auto", prefix: str | None = None) -> None:
        self.metric, self.mode, self.prefix = metric, mode, prefix
        self.direction = metric_direction(metric, mode)
        self.value: float | None = None
        self.iteration: int | None = None

    def value_of(self, results: Mapping[str, Any]) -> float:
        """The metric's value in ``results``; a ConfigError naming the key and every metric
        the evaluation produced when it is not there."""
        flat = flatten_metrics(results, self.prefix)
        if self.metric not in flat:
            shown = ", ".join(name for name in flat if "/per_class/" not in name)
            raise ConfigError(f"train.best_metric: the evaluation has no metric "
                              f"{self.metric!r}; it has: {shown or 'none'}")
        return flat[self.metric]

    def is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.direction == "max" else value < self.value

    def update(self, results: Mapping[str, Any], iteration: int) -> bool:
        """Takes the evaluation ``results`` of ``iteration``; True when they are the new best."""
        value = self.value_of(results)
        if not self.is_better(value):
            return False
        self.value, self.iteration = value, iteration
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "mode": self.direction, "value": self.value,
                "iteration": self.iteration}

    def load_state_dict(self, state: Mapping[str, Any] | None, source: str) -> None:
        """Restores a best from ``state`` (as ``state_dict`` wrote it) when it is for the same
        metric and direction and better than the one held; otherwise keeps the one held."""
        if not state or state.get("value") is None:
            return
        if (state.get("metric"), state.get("mode")) != (self.metric, self.direction):
            logger.warning(f"{source} kept the best by {state.get('metric')} "
                           f"({state.get('mode')}); this run keeps it by {self.metric} "
                           f"({self.direction}), so its first evaluation starts a new best")
            return
        if self.is_better(float(state["value"])):
            self.value, self.iteration = float(state["value"]), int(state["iteration"])


def read_best_entry(path: Path) -> dict[str, Any] | None:
    """The ``best`` entry of the checkpoint at ``path``, or None when there is no such file.

    Memory-mapped: the tensors are not read, so this costs little even for a large model."""
    if not path.is_file():
        return None
    try:
        ckpt = read_torch_file(path, "checkpoint", mmap=True)
    except UnreadableWeightsError as e:  # the next better evaluation replaces it
        logger.warning(f"{e}; the next evaluation replaces it")
        return None
    return ckpt.get("best") if isinstance(ckpt, dict) else None
