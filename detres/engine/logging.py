"""Run records: a readable console log (and ``log.txt``), ``metrics.jsonl``, TensorBoard when
installed, the environment (git revision, versions, hardware) of every run, and the JSON files
of results (``write_json``: every ``eval/*.json`` is written by it).

Only rank 0 writes files; other ranks log warnings and errors to the console.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from detres.atomic import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
LOGGER_NAME = "detres"


def setup_logger(output_dir: str | Path | None = None, rank: int = 0) -> logging.Logger:
    """The "detres" logger: console on every rank (INFO on rank 0), ``log.txt`` on rank 0."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    prefix = "" if rank == 0 else f"rank {rank} "
    fmt = logging.Formatter(f"[%(asctime)s {prefix}%(module)s] %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir is not None and rank == 0:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(output_dir) / "log.txt", encoding="utf-8")
        file.setFormatter(fmt)
        logger.addHandler(file)
    return logger


class MetricsWriter:
    """Appends one JSON object per line to ``metrics.jsonl`` (and scalars to TensorBoard).

    On resume from iteration ``start_iter`` the records of later iterations (written by the
    interrupted run after its last checkpoint) are dropped, so the file reads as one run.
    """

    def __init__(self, output_dir: str | Path | None, enabled: bool = True,
                 start_iter: int = 0, tensorboard: bool = True) -> None:
        self.enabled = enabled and output_dir is not None
        self.path = Path(output_dir) / METRICS_FILE if output_dir is not None else None
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_iter)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                # purge_step drops the interrupted run's events after the resume point, as
                # _truncate_after does for metrics.jsonl (no duplicate steps in TensorBoard)
                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"),
                                         purge_step=start_iter + 1 if start_iter else None)
            except ImportError:
                self._tb = None

    def _truncate_after(self, start_iter: int) -> None:
        """Keeps the records up to ``start_iter``; drops later ones and any line a kill left
        half-written (it does not parse), so appending continues a well-formed file."""
        if not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if (it := _iteration_of(ln)) is not None and it <= start_iter]
        if len(kept) != len(lines):
            text = "".join(ln + "\n" for ln in kept)
            atomic_write_bytes(self.path, lambda f: f.write(text.encode()))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            phase = record.get("phase", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration":
                    self._tb.add_scalar(f"{phase}/{key}", value, record["iteration"])

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _iteration_of(line: str) -> int | None:
    """The record's iteration (0 without one), or None for a line that is not a JSON object."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return int(record.get("iteration", 0)) if isinstance(record, dict) else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (or of the one inside a run folder).

    A last line that does not parse is what a kill during a write leaves: it is skipped. A bad
    line before the last is a damaged file: ValueError naming the file and the line.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    lines = [(n, ln) for n, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if ln.strip()]
    records = []
    for k, (n, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if k == len(lines) - 1:
                break
            raise ValueError(f"{path}:{n}: not a JSON record: {line[:80]!r}") from None
    return records


def format_record(record: dict[str, Any], max_iter: int | None = None,
                  brief: bool = False) -> str:
    """``iter 200/1000  loss 0.512  loss_cls 0.3  lr 0.1  0.045 s/it  eta 0:01:23``; ``brief``
    keeps the losses, the LR and the speed (the console's line: ``metrics.jsonl`` keeps all)."""
    parts = [f"iter {record['iteration']}" + (f"/{max_iter}" if max_iter else "")]
    keys = [k for k in record if k not in ("iteration", "phase", "eta_seconds", "time")]
    if brief:
        keys = [k for k in keys if k.startswith("loss")] + (["lr"] if "lr" in record else [])
    for key in keys:
        value = record[key]
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    if "time" in record:
        parts.append(f"{record['time']:.3g} s/it")
    if "eta_seconds" in record:
        parts.append(f"eta {datetime.timedelta(seconds=int(record['eta_seconds']))}")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- environment
def git_revision(path: str | Path | None = None) -> str:
    """``git describe``-like revision of the checkout holding ``path``; "unknown" outside git."""
    cwd = Path(path or Path(__file__).resolve().parent)
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode != 0:
            return "unknown (no commit)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def collect_env() -> dict[str, Any]:
    """Versions and hardware, recorded with every run (STYLE: evidence in every run)."""
    import numpy

    env: dict[str, Any] = {
        "git_revision": git_revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "argv": sys.argv,
    }
    try:
        import albumentations
        env["albumentations"] = albumentations.__version__
    except ImportError:
        pass
    return env


def write_env(output_dir: str | Path) -> dict[str, Any]:
    env = collect_env()
    write_json(Path(output_dir) / "env.json", env)
    return env


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays become numbers and lists, NaN becomes None
    (``null``: e.g. the AP of a class without ground truth)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):              # numpy arrays and scalars, 0-dim tensors
        return json_safe(value.tolist())
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Writes ``obj`` (made JSON-safe) to ``path`` atomically: a reader never sees half a file."""
    text = json.dumps(json_safe(obj), indent=indent)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
