"""One training loop for classification, detection and localization.

The loop knows nothing about the task. It needs:

- a model whose forward, called as ``model(*batch)`` (a tuple/list batch) or ``model(batch)``,
  returns its losses: a dict of scalar tensors, an object with a ``.losses`` dict (e.g.
  ``DetectorOutput``, ``ClassifierOutput``) or one scalar tensor. An optional ``.stats`` dict
  of scalars (e.g. the batch's top-1 error) is logged beside the losses;
- an optimizer, a :class:`WarmupMultiStepSchedule` (the LR is a pure function of the iteration),
  and an iterable that yields one batch per iteration (tensors, or objects with ``.to(device)``
  such as ``ImageBatch``/``Targets``, possibly nested in tuples, lists and dicts);
- optionally an ``eval_fn(model) -> dict[str, float]`` run every ``eval_period`` iterations and
  at the end, and a ``finish_fn(model)`` run after the last iteration, before ``model_final.pth``
  is written (precise BN). With a ``best_metric`` each evaluation that beats the best so far
  writes ``model_best.pth`` (``detres.engine.best``).

Per iteration: LR from the schedule -> forward under autocast -> backward (grad scaler for
fp16) -> all ranks average the losses and a flag of non-finite gradients -> a non-finite loss,
or a non-finite gradient behind a finite loss, stops every rank before the update (nothing is
saved, so the last checkpoint stays good) -> optional gradient clipping -> step.

Ctrl-C (``detres.engine.interrupt``) lets the step in progress finish, writes a checkpoint of
that iteration and ends the run with :class:`TrainingInterrupted`; a second Ctrl-C ends at once.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from detres.config import ConfigError
from detres.engine import distributed as du
from detres.engine.best import BEST_CHECKPOINT, BEST_RECORD, BestTracker, read_best_entry
from detres.engine.checkpoint import (CheckpointError, Checkpointer, atomic_save, check_resume,
                                      get_rng_state, load_checkpoint_weights, read_checkpoint,
                                      periodic_name, set_rng_state)
from detres.engine.interrupt import StopOnInterrupt, TrainingInterrupted
from detres.engine.logging import MetricsWriter, format_record, write_json
from detres.engine.precision import training_amp_dtype
from detres.engine.schedule import WarmupMultiStepSchedule

logger = logging.getLogger("detres")
class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the message names the iteration and every loss value."""


class NonFiniteGradientError(NonFiniteLossError):
    """A gradient became NaN or Inf while every loss stayed finite (a subclass, so whatever
    handles a diverged run handles this one too)."""


@dataclass
class TrainResult:
    iteration: int                                       # finished iterations
    losses: list[float] = field(default_factory=list)    # total loss of each iteration run now
    eval_results: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None                   # BestTracker.state_dict(), if kept


def move_to_device(obj: Any, device: torch.device) -> Any:
    """Tensors and objects with ``.to`` go to ``device``; tuples, lists and dicts recursively."""
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    if hasattr(obj, "to"):
        return obj.to(device, non_blocking=True)
    return obj


def call_model(model: nn.Module, batch: Any) -> Any:
    return model(*batch) if isinstance(batch, (tuple, list)) else model(batch)


def losses_of(output: Any) -> dict[str, Tensor]:
    if isinstance(output, Tensor):
        return {"loss": output}
    losses = output if isinstance(output, dict) else getattr(output, "losses", None)
    if not isinstance(losses, dict) or not losses:
        raise TypeError(f"the model returned {type(output).__name__}; the training loop needs "
                        f"a dict of losses, an object with a non-empty .losses dict, or a tensor")
    return losses


class Trainer:
    """Trains ``model`` for ``max_iter`` iterations; see the module docstring.

    Args:
        model: the plain module (wrapped in DistributedDataParallel here under torchrun).
        optimizer: over ``model``'s parameters; each group's ``lr`` is its base LR.
        schedule: LR multiplier per iteration.
        data: one batch per iteration, endless (or at least ``max_iter`` batches).
        max_iter: total iterations of the run (not of this call).
        output_dir: where checkpoints and ``metrics.jsonl`` go; None writes nothing.
        sampler: the data's sampler; on resume ``sampler.load_state_dict({"next_batch": n})``
            makes the next iterator over ``data`` start at batch n (exact resume).
        task, meta: stored in every checkpoint (``task`` is checked on resume; ``meta`` holds
            e.g. ``arch``, ``config`` and ``class_names``).
        amp: "auto", "none", "bf16" or "fp16" (with a grad scaler): see
            :func:`detres.engine.precision.training_amp_dtype`.
        clip_grad_norm: max global gradient norm, or None.
        checkpoint_period, eval_period, log_period: in iterations (0: only at the end).
        best_metric: keep ``model_best.pth`` by this metric of ``eval_fn``'s results, named
            as in ``eval/metrics.json`` (e.g. ``bbox/AP``, ``top1_err``); None keeps none.
        best_mode: ``auto``, ``max`` or ``min`` (``detres.engine.best.metric_direction``).
        metrics_prefix: the name ``eval_fn``'s results stand under in ``eval/metrics.json``
            (``bbox`` for detection), so that ``best_metric`` reads as it does there.
        name: the stage, shown in console lines (the localizer's ``rpn``, ``rcnn``, ...).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: WarmupMultiStepSchedule, data: Iterable, *, max_iter: int,
                 device: torch.device | str = "cpu", output_dir: str | Path | None = None,
                 sampler: Any = None, task: str,
                 meta: dict[str, Any] | None = None, amp: str = "none",
                 clip_grad_norm: float | None = None, checkpoint_period: int = 0,
                 log_period: int = 20, eval_fn: Callable[[nn.Module], dict] | None = None,
                 eval_period: int = 0, finish_fn: Callable[[nn.Module], None] | None = None,
                 progress: bool = True, best_metric: str | None = None,
                 best_mode: str = "auto", metrics_prefix: str | None = None,
                 name: str | None = None) -> None:
        self.device = torch.device(device)
        self.module = model
        self.model = du.wrap_model(model, self.device)
        self.optimizer, self.schedule, self.data, self.sampler = optimizer, schedule, data, sampler
        self.max_iter, self.task, self.meta = max_iter, task, dict(meta or {})
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.dist = du.get_dist_info()
        self.checkpointer = (Checkpointer(self.output_dir, enabled=self.dist.is_main)
                             if self.output_dir is not None else None)
        self.amp_dtype = training_amp_dtype(amp, self.device)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.device.type == "cuda" and amp == "fp16")
        self.clip_grad_norm = clip_grad_norm
        self.checkpoint_period, self.log_period = checkpoint_period, max(log_period, 1)
        self.eval_fn, self.eval_period, self.finish_fn = eval_fn, eval_period, finish_fn
        self.progress, self.name = progress, name
        if best_metric and eval_fn is None:
            raise ConfigError(f"train.best_metric is {best_metric!r} but this run does not "
                              f"evaluate; set it to null")
        self.best = BestTracker(best_metric, best_mode, metrics_prefix) if best_metric else None
        self.iteration = 0
        self.lr = 0.0
        self.last_saved: Path | None = None
        self._data_iter = None
        self._writer: MetricsWriter | None = None
        self._interrupt = StopOnInterrupt()
        self.schedule.attach(self.optimizer)

    # ------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "iteration": self.iteration, "rng": get_rng_state(),
                "sampler": {"next_batch": self.iteration}, "task": self.task,
                **({"best": self.best.state_dict()} if self.best is not None else {}),
                **self.meta}

    def load_state_dict(self, ckpt: dict[str, Any], path: str | Path = "checkpoint") -> None:
        check_resume(ckpt, path, self.module, self.task, self.meta.get("class_names"),
                     self.meta.get("config"))
        load_checkpoint_weights(self.module, path, self.task, ckpt=ckpt)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit this optimizer "
                                  f"({e}); was solver.optimizer changed?") from None
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if ckpt.get("scheduler") not in (None, self.schedule.state_dict()):
            logger.warning(f"{path} was trained with LR schedule {ckpt['scheduler']}; "
                           f"continuing with {self.schedule.state_dict()}")
        self.iteration = int(ckpt["iteration"])
        set_rng_state(ckpt["rng"])
        if self.sampler is not None and "sampler" in ckpt:
            self.sampler.load_state_dict(ckpt["sampler"])
        if self.best is not None:
            self.best.load_state_dict(ckpt.get("best"), str(path))
        self._data_iter = None

    def resume(self, path: str | Path | None = None) -> bool:
        """Loads ``path`` or the output folder's ``last_checkpoint``; False when there is none."""
        if path is None:
            path = self.checkpointer.last_checkpoint() if self.checkpointer else None
            if path is None:
                logger.info("no checkpoint to resume from; starting at iteration 0")
                return False
        self.load_state_dict(read_checkpoint(path), path)
        if self.best is not None and self.output_dir is not None:
            best_file = self.output_dir / BEST_CHECKPOINT
            self.best.load_state_dict(read_best_entry(best_file), str(best_file))
        self.last_saved = Path(path)
        logger.info(f"resumed from {path} at iteration {self.iteration}")
        return True

    def save(self, name: str) -> None:
        if self.checkpointer is not None:
            self.last_saved = self.checkpointer.save(self.state_dict(), name)
            logger.info(f"saved {self.last_saved}")

    # ------------------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        """Trains from ``self.iteration`` to ``max_iter``; evaluates and saves at the end.
        Ctrl-C: see the module docstring."""
        result = TrainResult(self.iteration)
        if self._writer is None and self.output_dir is not None:
            self._writer = MetricsWriter(self.output_dir, self.dist.is_main, self.iteration)
        if self._data_iter is None:
            self._data_iter = iter(self.data)
        finished_before = self.iteration >= self.max_iter
        first, start = self.iteration, time.perf_counter()
        self.model.train()
        show_bar = self.progress and self.dist.is_main and sys.stderr.isatty()
        with self._interrupt, (logging_redirect_tqdm([logger]) if show_bar
                               else contextlib.nullcontext()):
            with tqdm(total=self.max_iter, initial=self.iteration, dynamic_ncols=True,
                      desc=self.name, disable=not show_bar) as bar:
                self._loop(result, bar)
        if self.iteration > first:
            seconds = time.perf_counter() - start
            logger.info("%strained iterations %d-%d in %s (%.3f s/it)",
                        f"{self.name}: " if self.name else "", first + 1, self.iteration,
                        datetime.timedelta(seconds=round(seconds)),
                        seconds / (self.iteration - first))
        if not finished_before:
            if self.finish_fn is not None:
                self.finish_fn(self.module)
                self.model.train()
            self.save("model_final")
        if self.eval_fn is not None:
            result.eval_results = self._evaluate()
            self.model.train()
        result.iteration = self.iteration
        result.best = self.best.state_dict() if self.best is not None else None
        return result

    def _loop(self, result: TrainResult, bar: tqdm) -> None:
        window: dict[str, float] = {}
        window_start, count = time.perf_counter(), 0
        while self.iteration < self.max_iter:
            # one process stops before fetching; ranks agree through the step's all-reduce
            if self._interrupt.requested and self.dist.world_size == 1:
                self._stop()
            t0 = time.perf_counter()
            batch = next(self._data_iter)
            data_time = time.perf_counter() - t0
            losses, stats, stop = self.step(batch)
            result.losses.append(losses["loss"])
            for key, value in (*losses.items(), *stats.items(), ("data_time", data_time)):
                window[key] = window.get(key, 0.0) + value
            count += 1
            bar.update(1)
            if self.iteration % self.log_period == 0 or self.iteration == self.max_iter \
                    or stop:
                seconds = (time.perf_counter() - window_start) / count
                self._log_window(window, count, seconds)
                window, window_start, count = {}, time.perf_counter(), 0
            if stop:
                self._stop()
            if self.iteration < self.max_iter:
                self._periodic()

    def _stop(self) -> None:
        """Ctrl-C: a checkpoint of the finished iteration, then TrainingInterrupted."""
        name = periodic_name(self.iteration)
        if self.iteration > 0 and (self.last_saved is None or self.last_saved.stem != name):
            self.save(name)                                  # (not when saved just now)
        raise TrainingInterrupted(self.iteration,
                                  str(self.last_saved) if self.last_saved is not None else None)

    def step(self, batch: Any) -> tuple[dict[str, float], dict[str, float], bool]:
        """One iteration on ``batch``: returns its losses (``loss`` is their sum) and the
        model's stats, both averaged over ranks, and whether some rank was asked to stop."""
        batch = move_to_device(batch, self.device)
        self.lr = self.schedule.apply(self.optimizer, self.iteration)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            output = call_model(self.model, batch)
        losses = losses_of(output)
        total = sum(losses.values())
        stats = {k: v for k, v in (getattr(output, "stats", None) or {}).items()
                 if isinstance(v, (Tensor, float, int))}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
        # One tensor, one all-reduce and one device->host copy per iteration. The last entries
        # are the shares of ranks asked to stop (Ctrl-C) and with a non-finite gradient: every
        # rank sees the same packet, so all stop at the same point (no rank left waiting).
        packed = torch.stack([total.detach().float()]
                             + [v.detach().float() for v in losses.values()]
                             + [torch.as_tensor(v, dtype=torch.float32, device=total.device)
                                for v in stats.values()]
                             + [torch.tensor(float(self._interrupt.requested),
                                             device=total.device),
                                self._non_finite_gradients(total.device)])
        host = du.all_reduce_tensor(packed).tolist()
        loss_values = dict(zip(["loss", *losses], host))
        stat_values = dict(zip(stats, host[len(loss_values):-2]))
        if not all(math.isfinite(v) for v in loss_values.values()):
            self._raise_non_finite(loss_values)
        if host[-1] != 0.0:
            self._raise_non_finite(loss_values, gradients=True)
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        return loss_values, stat_values, host[-2] != 0.0

    def _non_finite_gradients(self, device: torch.device) -> Tensor:
        """1.0 when some gradient holds a NaN or Inf, else 0.0. Always 0.0 with the fp16 grad
        scaler: it expects overflows and skips those updates itself."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if self.scaler.is_enabled() or not grads:
            return torch.zeros((), device=device)
        # The max-abs norm keeps NaN and Inf and cannot overflow; one fused kernel.
        norms = torch._foreach_norm(grads, float("inf"))
        return (~torch.stack([n.float() for n in norms]).isfinite().all()).float().to(device)

    def _raise_non_finite(self, values: dict[str, float], gradients: bool = False) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        kept = (f"the last checkpoint {self.last_saved} is intact"
                if self.last_saved is not None else "no checkpoint had been written yet")
        what, error = (("gradient", NonFiniteGradientError) if gradients
                       else ("loss", NonFiniteLossError))
        finite = " with finite losses" if gradients else ""
        raise error(
            f"non-finite {what} at iteration {self.iteration} (0-based){finite}: {shown}. "
            f"Training stopped before the update and without saving; {kept}. Try a lower "
            f"solver.base_lr, warmup (solver.warmup_iters) or solver.clip_grad_norm.")

    def _periodic(self) -> None:
        if self.checkpoint_period and self.iteration % self.checkpoint_period == 0:
            self.save(periodic_name(self.iteration))
        if self.eval_fn is not None and self.eval_period and \
                self.iteration % self.eval_period == 0:
            self._evaluate()
            self.model.train()

    def _evaluate(self) -> dict[str, float]:
        results = self.eval_fn(self.module)
        record = {"phase": "eval", "iteration": self.iteration, **results}
        logger.info("eval " + format_record(record))
        if self._writer is not None:
            self._writer.write(record)
        if self.best is not None:
            self._keep_best(results)
        return results

    def _keep_best(self, results: dict[str, Any]) -> None:
        """Writes model_best.pth and model_best.json when ``results`` beat the best so far."""
        previous = self.best.state_dict()
        if not self.best.update(results, self.iteration):
            logger.info(f"best {self.best.metric} stays {self.best.value:.4g} (iteration "
                        f"{self.best.iteration})" if self.best.value is not None else
                        f"{self.best.metric} is NaN: no best checkpoint yet")
            return
        was = (f" (was {previous['value']:.4g} at iteration {previous['iteration']})"
               if previous["value"] is not None else "")
        if self.output_dir is not None and self.dist.is_main:
            atomic_save(self.state_dict(), self.output_dir / BEST_CHECKPOINT)
            write_json(self.output_dir / BEST_RECORD,
                       {**self.best.state_dict(), "checkpoint": BEST_CHECKPOINT})
        logger.info(f"new best {self.best.metric} {self.best.value:.4g} at iteration "
                    f"{self.iteration}{was}" + (f" -> {self.output_dir / BEST_CHECKPOINT}"
                                                if self.output_dir is not None else ""))

    def _log_window(self, window: dict[str, float], count: int, seconds: float) -> None:
        record: dict[str, Any] = {"phase": "train", "iteration": self.iteration, "lr": self.lr}
        record.update({k: v / count for k, v in window.items()})
        record["time"] = seconds
        record["eta_seconds"] = seconds * (self.max_iter - self.iteration)
        if torch.cuda.is_available() and self.device.type == "cuda":
            record["max_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._writer is not None:
            self._writer.write(record)
        prefix = f"{self.name}: " if self.name else ""
        logger.info(prefix + format_record(record, self.max_iter, brief=True))

    def close(self) -> None:
        """Stops the data iterator (and its worker processes) and closes the metrics file."""
        self._data_iter = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
