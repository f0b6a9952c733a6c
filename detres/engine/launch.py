"""Starting a run: device, torchrun process group, logger, seeds, the run folder and the records
every run writes first (``env.json``, which marks the folder as a detres run's, then the
resolved ``config.yaml``).

The run folder (docs/architecture.md, Run folder; what may be removed: ``engine/run_folder.py``):
a fresh training run refuses a ``train.output_dir`` that holds a run (unless
``train.overwrite``, which removes that run's records first) or anything that no detres run
wrote; a training run holds ``run.lock`` there so that a second process refuses the folder; a
resumed run writes nothing there until the task has checked that the checkpoints fit
(``begin_resumed_run``); an evaluation-only run writes into a new sub-folder
``eval_only/<YYYYmmdd-HHMMSS>[-N]/`` and never touches the training run's records.
"""
from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
import logging
import logging.handlers
import os
import random
import socket
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from detres.config import ConfigError, dump
from detres.engine import distributed as du
from detres.engine.logging import LOGGER_NAME, collect_env, setup_logger, write_json
from detres.engine.run_folder import (ENV_FILE, EVAL_ONLY, LOCK_FILE, check_location,
                                      check_resume_folder, clear_for_fresh_run, make_folder,
                                      run_records)

__all__ = ["EVAL_ONLY", "LOCK_FILE", "acquire_run_lock", "begin_resumed_run", "beside_weights",
           "release_run_lock", "releases_run_lock", "run_records", "seed_all", "setup_run"]

Mode = Literal["train", "resume", "eval"]
_held_lock: Path | None = None    # the run.lock this process holds (main rank, training)
T = TypeVar("T")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _new_eval_folder(output_dir: Path) -> Path:
    """A new ``output_dir/eval_only/<YYYYmmdd-HHMMSS>[-N]``: mkdir is atomic, so concurrent
    evaluations get different folders."""
    root = output_dir / EVAL_ONLY
    make_folder(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        path = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def beside_weights(cfg: T, weights: str | os.PathLike, typed: Collection[str]) -> T:
    """``cfg`` with ``train.output_dir`` set to the folder of checkpoint ``weights``, unless the
    user gave ``train.output_dir`` (``typed``: the keys set on the command line): an
    evaluation-only run's records (``eval_only/<time>/``) go beside the checkpoint it scores,
    not into a config's training folder under the working directory."""
    if "train.output_dir" in typed:
        return cfg
    folder = str(Path(weights).parent)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=folder))


def _prepare_folder(cfg: Any, mode: Mode, stages: tuple[str, ...], records: tuple[str, ...]
                    ) -> tuple[Path, dict[str, Any] | None]:
    """The folder the run writes its records into, and its env.json (main rank only): written
    at once but for a resumed run, whose records wait for ``begin_resumed_run``."""
    output_dir = Path(cfg.train.output_dir)
    check_location(output_dir)
    if mode == "eval":
        run_dir = _new_eval_folder(output_dir)
        return run_dir, _write_env(run_dir, mode)
    make_folder(output_dir)
    acquire_run_lock(output_dir)
    try:
        if mode == "train":
            clear_for_fresh_run(output_dir, cfg.train.overwrite, stages, records)
            return output_dir, _write_env(output_dir, mode, stages, records)
        check_resume_folder(output_dir)
        return output_dir, None
    except BaseException:
        release_run_lock()
        raise


def _write_env(run_dir: Path, mode: Mode, stages: Sequence[str] = (),
               records: Sequence[str] = ()) -> dict[str, Any]:
    """env.json: the environment, and what marks the folder as a detres run's (with the stage
    folders it makes and its task's records: what a later train.overwrite may remove,
    engine/run_folder.py)."""
    env = {**collect_env(), "run": {"mode": mode, "stages": list(stages),
                                    "records": list(records)}}
    write_json(run_dir / ENV_FILE, env)
    return env


def _start_records(cfg: Any, run_dir: Path, device: torch.device, dist: du.DistInfo, mode: Mode,
                   env: dict[str, Any] | None,
                   earlier: Sequence[logging.LogRecord] = ()) -> logging.Logger:
    """The logger writing log.txt (``earlier`` records first) and config.yaml (main rank)."""
    logger = setup_logger(run_dir, dist.rank)
    if not dist.is_main:
        return logger
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            for record in earlier:
                handler.handle(record)
    dump(cfg, run_dir / "config.yaml")
    logger.info(f"git {env['git_revision']}, torch {env['torch']}, {env['cpu_count']} CPUs, "
                f"GPUs {env['gpus'] or 'none'}, device {device}, world size {dist.world_size}")
    logger.info(f"{'evaluation-only run' if mode == 'eval' else mode}: records in {run_dir}")
    return logger


def _on_main(dist: du.DistInfo, fn: Callable[[], T]) -> T:
    """``fn()`` on the main rank; its result, or its ConfigError, on every rank."""
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except ConfigError as e:
            error = str(e)
    if dist.world_size > 1:
        result, error = du.broadcast_object((result, error), src=0)
    if error is not None:
        raise ConfigError(error)
    return result


def setup_run(cfg: Any, mode: Mode, stages: Sequence[str] = (), records: Sequence[str] = ()
              ) -> tuple[torch.device, du.DistInfo, Path, logging.Logger]:
    """Device, distributed state, the run's folder and logger from ``cfg.train``; the main rank
    writes env.json, config.yaml and log.txt into that folder, which is returned.

    ``mode``: "train", a fresh run into ``train.output_dir`` (a ConfigError naming the folder
    when it holds a run, unless ``train.overwrite``, or anything no detres run wrote);
    "resume", continuing the run there, which writes nothing until the task calls
    ``begin_resumed_run`` (both hold its run.lock: release with ``releases_run_lock``); "eval",
    an evaluation-only run whose folder is a new
    ``train.output_dir/eval_only/<YYYYmmdd-HHMMSS>[-N]/``. ``stages``: the sub-folders the run
    makes (a localization run's networks); ``records``: the files its task writes besides every
    run's checkpoints, metrics and evaluation (``/``-separated, fnmatch patterns, e.g.
    ``backbone.pth``), which a later ``train.overwrite`` may remove. A training run records
    both in env.json (engine/run_folder.py).
    """
    if mode not in ("train", "resume", "eval"):
        raise ValueError(f"mode must be train, resume or eval, not {mode!r}")
    device = du.resolve_device(cfg.train.device)
    dist = du.init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    run_dir, env = _on_main(dist, functools.partial(_prepare_folder, cfg, mode, tuple(stages),
                                                    tuple(records)))
    if mode == "resume":            # log.txt waits for begin_resumed_run: keep the lines
        logger = setup_logger(None, dist.rank)
        if dist.is_main:
            logger.addHandler(logging.handlers.BufferingHandler(capacity=1 << 20))
    else:
        logger = _start_records(cfg, run_dir, device, dist, mode, env)
    seed_all(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.use_deterministic_algorithms(cfg.train.deterministic)
    return device, dist, run_dir, logger


def begin_resumed_run(cfg: Any, run_dir: Path, device: torch.device, dist: du.DistInfo,
                      stages: Sequence[str] = (), records: Sequence[str] = ()
                      ) -> logging.Logger:
    """Writes a resumed run's env.json and config.yaml and opens its log.txt, with the lines
    logged since ``setup_run``. A task calls it once it has checked that the run's checkpoints
    fit this config and data (``checkpoint.check_resume``), so that a refused resume leaves
    the folder as it was. ``stages``, ``records``: as given to ``setup_run``."""
    earlier = [record for handler in logging.getLogger(LOGGER_NAME).handlers
               if isinstance(handler, logging.handlers.BufferingHandler)
               for record in handler.buffer]
    env = _write_env(run_dir, "resume", stages, records) if dist.is_main else None
    return _start_records(cfg, run_dir, device, dist, "resume", env, earlier)
