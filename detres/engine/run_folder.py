"""What a run may write into and remove from ``train.output_dir`` (docs/architecture.md, Run
folder).

A run's ``env.json`` is written first and says that detres made the folder; its ``"run"`` entry
names the stage sub-folders the run makes and the files its task writes besides the records
every run has (``{"mode": "train", "stages": ["classifier", "rpn", "rcnn"], "records":
["rcnn/proposals.pth", "rcnn/proposals.rank[0-9]*.npy"]}``; the task passes both to
``engine/launch.py::setup_run``). A fresh run removes only the records of such a run: the
exact names below, in the folder, in the recorded stages, in ``eval/``, ``tensorboard/`` and
the evaluation-only runs of ``eval_only/``, and the task's recorded names (with the names the
new run writes itself). Nothing else is removed: no file of another name, no folder that still
holds one, no symbolic link, and nothing a link points to (a link among the records refuses
the run). A folder that no detres run wrote, and that holds anything, is refused whole.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import NamedTuple

from detres.config import ConfigError

ENV_FILE = "env.json"
LOCK_FILE = "run.lock"
EVAL_ONLY = "eval_only"
SETUP_RECORDS = ("config.yaml", ENV_FILE, "log.txt")
_CHECKPOINTS = ("metrics.jsonl", "last_checkpoint", "model_final.pth", "model_best.pth",
                "model_best.json", "model_" + "[0-9]" * 7 + ".pth")
_EVAL = ("eval/metrics.json", "eval/coco_results.json", "eval/predictions.json",
         "eval/results/VOC*/Main/comp4_det_*.txt")
_TENSORBOARD = ("tensorboard/events.out.tfevents.*",)
RUN_RECORDS = (*SETUP_RECORDS, *_CHECKPOINTS, *_EVAL, *_TENSORBOARD)
STAGE_RECORDS = (*_CHECKPOINTS, *_EVAL, *_TENSORBOARD)
EVAL_RUN_RECORDS = (*SETUP_RECORDS, *_EVAL)
# names that make a folder look like a run's when no env.json says whose it is: such a folder
# is refused, never emptied, so the net is wide (any model_*.pth)
_LOOKALIKES = frozenset({"metrics.jsonl", "last_checkpoint", "model_final.pth", "model_best.pth",
                         "model_best.json", "eval", "tensorboard"})
_LEGACY_ENV_KEYS = {"git_revision", "torch", "argv"}   # env.json before it named the stages
_MAX_ENV_BYTES = 1 << 20
_MAX_TASK_RECORDS = 64


class RecordedRun(NamedTuple):
    """What the env.json of a detres run says it makes: stage folders and task records."""

    stages: tuple[str, ...] = ()
    records: tuple[str, ...] = ()


def record_patterns(stages: Sequence[str], records: Sequence[str] = ()) -> tuple[str, ...]:
    """Relative paths (``/``-separated, fnmatch per part) of every record of a run with
    ``stages`` and its task's ``records`` (an evaluation-only run's time-stamped folder is
    ``[0-9]*``)."""
    return (*RUN_RECORDS, *records, *(f"{s}/{p}" for s in stages for p in STAGE_RECORDS),
            *(f"{EVAL_ONLY}/[0-9]*/{p}" for p in EVAL_RUN_RECORDS))


def _plain_name(part: str) -> bool:
    return part not in ("", ".", "..") and "/" not in part and "\\" not in part


def _valid_record(pattern: object) -> bool:
    """A task record: a relative path inside the run's folder whose every part starts with a
    plain character (``proposals.rank[0-9]*.npy``, never ``*`` or ``..``)."""
    return (isinstance(pattern, str) and 0 < len(pattern) <= 200
            and all(_plain_name(p) and p[0] not in "*?[" for p in pattern.split("/")))


def _matches(parts: tuple[str, ...], pattern: str) -> bool:
    """``parts`` is the file ``pattern`` names, or a temporary an atomic write left beside it."""
    *folders, name = pattern.split("/")
    return (len(parts) == len(folders) + 1
            and all(fnmatchcase(p, f) for p, f in zip(parts, folders))
            and (fnmatchcase(parts[-1], name) or fnmatchcase(parts[-1], f".{name}.*.tmp")))


def _leads_to(parts: tuple[str, ...], pattern: str) -> bool:
    """``parts`` is a folder on the way to the files ``pattern`` names."""
    folders = pattern.split("/")[:-1]
    return len(parts) <= len(folders) and all(fnmatchcase(p, f) for p, f in zip(parts, folders))


def find_records(folder: Path, patterns: Sequence[str]
                 ) -> tuple[list[Path], list[Path], list[Path]]:
    """(files, folders, links): the files under ``folder`` that ``patterns`` name, the folders
    on the way to them (deepest first), and the symbolic links standing where one of either
    would be. Links are listed, never followed; other folders are never entered."""
    files, folders, links = [], [], []
    for dirpath, dirnames, filenames in os.walk(folder):   # a link to a folder is not entered
        base = Path(dirpath)
        rel = base.relative_to(folder).parts
        entered = []
        for name in dirnames:
            if any(_leads_to((*rel, name), p) for p in patterns):
                if (base / name).is_symlink():
                    links.append(base / name)
                else:
                    entered.append(name)
                    folders.append(base / name)
        dirnames[:] = entered
        for name in filenames:
            if any(_matches((*rel, name), p) for p in patterns):
                (links if (base / name).is_symlink() else files).append(base / name)
    return files, sorted(folders, key=lambda p: len(p.parts), reverse=True), links


def recorded_run(folder: Path) -> RecordedRun | None:
    """The stage folders and task records that the detres run of ``folder`` records in its
    env.json (none for a run written before env.json named them), or None when no detres run
    wrote one there."""
    path = folder / ENV_FILE
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MAX_ENV_BYTES:
            return None
        env = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(env, dict):
        return None
    run = env.get("run")
    if run is None:
        return RecordedRun() if _LEGACY_ENV_KEYS <= env.keys() else None
    stages = run.get("stages") if isinstance(run, dict) else None
    records = run.get("records", []) if isinstance(run, dict) else None
    if (isinstance(stages, list) and all(isinstance(s, str) and _plain_name(s) for s in stages)
            and isinstance(records, list) and len(records) <= _MAX_TASK_RECORDS
            and all(_valid_record(r) for r in records)):
        return RecordedRun(tuple(stages), tuple(records))
    return None


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _names(folder: Path) -> list[str]:
    try:
        return sorted(p.name for p in folder.iterdir())
    except OSError:
        return []


def _looks_like_record(name: str) -> bool:
    return name in _LOOKALIKES or fnmatchcase(name, "model_*.pth")


def run_records(folder: Path) -> list[Path]:
    """The entries of ``folder`` that look like a training run's: record names, and sub-folders
    holding such names or an env.json (a localization run's stages, other runs); not
    ``eval_only/``. Links are not followed."""
    if not _real_dir(folder):
        return []
    return [folder / n for n in _names(folder)
            if _looks_like_record(n) or (n != EVAL_ONLY and _real_dir(folder / n) and any(
                _looks_like_record(m) or m == ENV_FILE for m in _names(folder / n)))]


def _is_setup_record(path: Path, folder: Path) -> bool:
    return path.parent == folder and any(_matches((path.name,), s) for s in SETUP_RECORDS)


def _listed(paths: Sequence[Path]) -> str:
    return ", ".join(p.name for p in paths[:5]) + (", ..." if len(paths) > 5 else "")


def _unrecorded(folder: Path) -> list[Path]:
    """The entries of a folder that weigh against it being free: all but its run.lock (the
    lock this run holds, or a stale one it took over) and the folder ``eval_only/``."""
    return [folder / n for n in _names(folder) if n != LOCK_FILE
            and not (n == EVAL_ONLY and _real_dir(folder / n))]


def _refusal(folder: Path, entries: list[Path], resume: bool) -> str:
    """Why a folder that no detres run wrote, but that holds ``entries``, is refused."""
    runs = [p for p in entries if _real_dir(p) and recorded_run(p) is not None]
    if runs:
        return (f"{folder} holds runs in its sub-folders ({_listed(runs)}); give this run a "
                f"folder of its own with train.output_dir=NEW_FOLDER")
    setup = [p for p in entries if p.name in SETUP_RECORDS]
    looks = run_records(folder)
    if looks and not (resume and setup):
        return (f"{folder} already holds a run ({_listed(looks)}) but no env.json of a detres "
                f"run, so nothing in it is removed; continue it with --resume or train "
                f"elsewhere with train.output_dir=NEW_FOLDER")
    if resume and setup:
        return (f"{folder} holds {_listed(setup)} that no detres run wrote (no env.json of a "
                f"run), which --resume would replace; train elsewhere with "
                f"train.output_dir=NEW_FOLDER")
    return (f"{folder} is not empty ({_listed(entries)}) and holds no detres run"
            f"{' to continue' if resume else ''}; train into a new or empty folder with "
            f"train.output_dir=NEW_FOLDER")


def check_resume_folder(folder: Path) -> None:
    """A resumed run rewrites config.yaml and env.json and appends to log.txt: refuses a
    folder that no detres run wrote when it holds those, other runs, or no run at all."""
    entries = _unrecorded(folder)
    if recorded_run(folder) is not None or not entries:
        return
    runs = [p for p in entries if _real_dir(p) and recorded_run(p) is not None]
    setup = [p for p in entries if p.name in SETUP_RECORDS]
    if runs or setup or not run_records(folder):   # else e.g. stage folders copied from a run
        raise ConfigError(_refusal(folder, entries, resume=True))


def clear_for_fresh_run(folder: Path, overwrite: bool, stages: Sequence[str],
                        records: Sequence[str] = ()) -> None:
    """Makes ``folder`` ready for a fresh run with ``stages`` and task ``records``, or raises
    ConfigError (one line naming it) before anything is removed. A run's records refuse it
    unless ``overwrite``; a run stopped before its first step (only config.yaml, env.json,
    log.txt) is replaced."""
    recorded = recorded_run(folder)
    entries = _unrecorded(folder)
    if recorded is None and entries:
        raise ConfigError(_refusal(folder, entries, resume=False))
    recorded = recorded or RecordedRun()
    files, folders, links = find_records(
        folder, record_patterns(recorded.stages, (*recorded.records, *records)))
    if links:
        raise ConfigError(f"{links[0]} is a symbolic link among the run's records in {folder}; "
                          f"detres neither follows nor removes links: remove it yourself or "
                          f"train elsewhere with train.output_dir=NEW_FOLDER")
    started = sorted({p.relative_to(folder).parts[0] for p in files
                      if not _is_setup_record(p, folder)} - {EVAL_ONLY})
    if started and not overwrite:
        raise ConfigError(f"{folder} already holds a run ({', '.join(started[:5])}); continue "
                          f"it with --resume, start a new one with train.output_dir=NEW_FOLDER, "
                          f"or replace it with train.overwrite=true")
    for stage in stages:        # this run writes there: never beside another run's files
        path = folder / stage
        taken = path.is_symlink() or (path.exists() and (not path.is_dir() or _names(path)))
        if taken and stage not in recorded.stages:
            raise ConfigError(f"{path} was not made by the run recorded in {folder}, and this "
                              f"run writes its {stage!r} stage there; move it or train "
                              f"elsewhere with train.output_dir=NEW_FOLDER")
    if not overwrite:           # a run stopped before its first step; eval_only/ stays
        files, folders = [p for p in files if p.parent == folder], []
    remove(files, folders)


def remove(files: Sequence[Path], folders: Sequence[Path]) -> None:
    """Unlinks ``files``, then removes each of ``folders`` (deepest first) that is empty now."""
    for path in files:
        path.unlink(missing_ok=True)
    for path in folders:
        try:
            path.rmdir()                # fails on a folder that holds anything else: it stays
        except OSError:
            pass


def check_location(path: Path) -> None:
    """Refuses (ConfigError naming ``train.output_dir``) the filesystem root, the home folder,
    and a path that is a file or runs through one."""
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise ConfigError(f"train.output_dir: {path} is the filesystem root; give the run a "
                          f"folder of its own, e.g. train.output_dir=output/run")
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):    # no home folder known
        home = None
    if resolved == home:
        raise ConfigError(f"train.output_dir: {path} is the home folder; give the run a folder "
                          f"of its own, e.g. train.output_dir={path}/runs/NAME")
    for ancestor in (resolved, *resolved.parents):
        try:
            if not ancestor.exists():
                continue
        except OSError:
            return                      # unreadable: make_folder names the cause
        if not ancestor.is_dir():
            inside = "" if ancestor == resolved else f", and {path} would lie inside it"
            raise ConfigError(f"train.output_dir: {ancestor} is a file, not a folder{inside}")
        return


def make_folder(path: Path) -> None:
    """``mkdir -p``; a failure is a ConfigError naming ``train.output_dir``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.output_dir: cannot create {path} "
                          f"({e.strerror or type(e).__name__})") from None
