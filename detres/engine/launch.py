"""Starting a run: device, torchrun process group, logger, seeds, the run folder and the records
every run writes first (the resolved ``config.yaml`` and ``env.json``).

The run folder (docs/architecture.md, Run folder): a fresh training run refuses a
``train.output_dir`` that holds a run (unless ``train.overwrite``, which removes the old run's
records first); a training run holds ``run.lock`` there so that a second process refuses the
folder; an evaluation-only run writes into a new sub-folder ``eval_only/<YYYYmmdd-HHMMSS>[-N]/``
and never touches the training run's records.
"""
from __future__ import annotations

import atexit
import fnmatch
import functools
import itertools
import logging
import os
import random
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from detres.config import ConfigError, dump
from detres.engine import distributed as du
from detres.engine.logging import setup_logger, write_env

Mode = Literal["train", "resume", "eval"]
LOCK_FILE = "run.lock"
EVAL_ONLY = "eval_only"
# what a run writes into its folder once it has started (and into each stage sub-folder of a
# localization run); with only SETUP_RECORDS a run stopped before its first step (e.g. on a
# missing dataset): a fresh run replaces those
RECORDS = frozenset({"metrics.jsonl", "last_checkpoint", "model_final.pth", "model_best.pth",
                     "model_best.json", "backbone.pth", "proposals.pth", "eval", "tensorboard"})
SETUP_RECORDS = ("config.yaml", "env.json", "log.txt")
_held_lock: Path | None = None    # the run.lock this process holds (main rank, training)
T = TypeVar("T")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _is_record(path: Path) -> bool:
    return path.name in RECORDS or fnmatch.fnmatch(path.name, "model_*.pth")


def run_records(folder: Path) -> list[Path]:
    """The entries of ``folder`` that belong to a training run: its records and the
    sub-folders holding records (the stages of a localization run); not ``eval_only/``."""
    if not folder.is_dir():
        return []
    return [p for p in sorted(folder.iterdir())
            if _is_record(p) or (p.is_dir() and p.name != EVAL_ONLY
                                 and any(_is_record(q) for q in p.iterdir()))]


def _lock_owner(lock: Path) -> str | None:
    """Who holds ``lock``: a description, or None when the lock is stale (its process, on this
    host, is gone) or already released."""
    try:
        pid_text, host = lock.read_text(encoding="utf-8").split()
        pid = int(pid_text)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return f"an unknown process ({lock} is unreadable)"
    if host != socket.gethostname():
        return f"process {pid} on {host}"
    if pid == os.getpid():
        return None                 # left by an earlier process with this pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:         # alive, another user's
        pass
    return f"process {pid}"


def acquire_run_lock(folder: Path) -> None:
    """Creates ``folder/run.lock`` holding this pid and host; a lock of a live process is a
    ConfigError, a stale one is taken over. A process holds one lock at a time."""
    global _held_lock
    release_run_lock()
    lock = folder / LOCK_FILE
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None:
                raise ConfigError(f"{folder} is in use by {owner} (lock file {lock}); wait for "
                                  f"that run or write elsewhere with train.output_dir=NEW_FOLDER; "
                                  f"remove {lock} if no run uses the folder") from None
            lock.unlink(missing_ok=True)            # stale: take it over
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        _held_lock = lock
        return
    raise ConfigError(f"could not take the lock {lock}; remove it if no run uses {folder}")


def release_run_lock() -> None:
    """Removes the run.lock this process holds (if any); also runs at exit."""
    global _held_lock
    if _held_lock is not None:
        _held_lock.unlink(missing_ok=True)
        _held_lock = None


atexit.register(release_run_lock)


def releases_run_lock(train: Callable[..., T]) -> Callable[..., T]:
    """Decorates a task's ``train``: the run lock is released when it returns or raises."""
    @functools.wraps(train)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return train(*args, **kwargs)
        finally:
            release_run_lock()
    return wrapper


def _clear_for_fresh_run(folder: Path, overwrite: bool) -> None:
    """Refuses a folder holding a run unless ``overwrite``; removes the old run's records."""
    records = run_records(folder)
    if records and not overwrite:
        names = ", ".join(p.name for p in records[:5]) + (", ..." if len(records) > 5 else "")
        raise ConfigError(f"{folder} already holds a run ({names}); continue it with --resume, "
                          f"start a new one with train.output_dir=NEW_FOLDER, or replace it "
                          f"with train.overwrite=true")
    extra = [folder / EVAL_ONLY] if records else []
    for path in [*records, *extra, *(folder / name for name in SETUP_RECORDS)]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _new_eval_folder(output_dir: Path) -> Path:
    """A new ``output_dir/eval_only/<YYYYmmdd-HHMMSS>[-N]``: mkdir is atomic, so concurrent
    evaluations get different folders."""
    root = output_dir / EVAL_ONLY
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def _prepare_folder(cfg: Any, mode: Mode) -> Path:
    """The folder the run writes its records into (main rank only)."""
    output_dir = Path(cfg.train.output_dir)
    if mode == "eval":
        return _new_eval_folder(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    acquire_run_lock(output_dir)
    if mode == "train":
        try:
            _clear_for_fresh_run(output_dir, cfg.train.overwrite)
        except BaseException:
            release_run_lock()
            raise
    return output_dir


def _on_main(dist: du.DistInfo, fn: Callable[[], T]) -> T:
    """``fn()`` on the main rank; its result, or its ConfigError, on every rank."""
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except ConfigError as e:
            error = str(e)
    if dist.world_size > 1:
        box = [(result, error)]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise ConfigError(error)
    return result


def setup_run(cfg: Any, mode: Mode
              ) -> tuple[torch.device, du.DistInfo, Path, logging.Logger]:
    """Device, distributed state, the run's folder and logger from ``cfg.train``; the main rank
    writes config.yaml and env.json into that folder, which is returned.

    ``mode``: "train", a fresh run into ``train.output_dir`` (a ConfigError naming the folder
    when it holds a run, unless ``train.overwrite``); "resume", continuing the run there (both
    hold its run.lock: release with ``releases_run_lock``); "eval", an evaluation-only run
    whose folder is a new ``train.output_dir/eval_only/<YYYYmmdd-HHMMSS>[-N]/``.
    """
    if mode not in ("train", "resume", "eval"):
        raise ValueError(f"mode must be train, resume or eval, not {mode!r}")
    device = du.resolve_device(cfg.train.device)
    dist = du.init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    run_dir = _on_main(dist, functools.partial(_prepare_folder, cfg, mode))
    logger = setup_logger(run_dir, dist.rank)
    if dist.is_main:
        dump(cfg, run_dir / "config.yaml")
        env = write_env(run_dir)
        logger.info(f"git {env['git_revision']}, torch {env['torch']}, {env['cpu_count']} CPUs, "
                    f"GPUs {env['gpus'] or 'none'}, device {device}, world size {dist.world_size}")
        logger.info(f"{'evaluation-only run' if mode == 'eval' else mode}: records in {run_dir}")
    seed_all(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.use_deterministic_algorithms(cfg.train.deterministic)
    return device, dist, run_dir, logger
