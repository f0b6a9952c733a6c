"""Checkpoints: atomic writes, full resume state, safe loading, classifier -> backbone transfer.

A checkpoint is a dict of tensors and plain Python values, readable by
``torch.load(weights_only=True)`` (no pickled code runs):

    model, optimizer, scheduler, scaler   state dicts
    iteration                             number of finished iterations (the next one to run)
    rng                                   python / numpy / torch (/ cuda) generator states
    sampler                               data position, e.g. {"next_batch": 1000}
    task, arch                            e.g. "classification", "ResNet(depth=20, ...)"
    config, class_names                   the resolved config (plain dict) and the label names

Files are written to a temporary name in the same folder and renamed, so a crash (or a NaN
stop) never leaves a half-written ``model_*.pth`` or ``last_checkpoint``. ``read_checkpoint``
reads one; ``load_checkpoint_weights`` puts its weights into a model of its task.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from detres.atomic import atomic_write_bytes
from detres.weights_io import WeightsMismatchError, check_state_dict, read_torch_file

LAST_CHECKPOINT = "last_checkpoint"  # a text file naming the newest checkpoint in the folder


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or written for another task or model."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``."""
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------- RNG states
def get_rng_state() -> dict[str, Any]:
    """Generator states of python, numpy and torch as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),                       # (version, tuple of ints, gauss)
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`get_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files
class Checkpointer:
    """Writes ``model_XXXXXXX.pth`` / ``model_final.pth`` and ``last_checkpoint`` in a folder.

    ``model_0000999.pth`` holds the state after 1000 iterations (detectron2's naming). Only
    the process with ``enabled=True`` (rank 0) writes.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.enabled = enabled

    def save(self, state: dict[str, Any], name: str) -> Path:
        path = self.output_dir / f"{name}.pth"
        if self.enabled:
            atomic_save(state, path)
            atomic_write_bytes(self.output_dir / LAST_CHECKPOINT,
                               lambda f: f.write(path.name.encode()))
        return path

    def last_checkpoint(self) -> Path | None:
        """The checkpoint that ``last_checkpoint`` names, or None when there is none."""
        pointer = self.output_dir / LAST_CHECKPOINT
        if not pointer.is_file():
            return None
        path = self.output_dir / pointer.read_text(encoding="utf-8").strip()
        if not path.is_file():
            raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
        return path


def periodic_name(iteration: int) -> str:
    """Name of the checkpoint taken after ``iteration`` finished iterations."""
    return f"model_{iteration - 1:07d}"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict in ``path`` (``weights_io.read_torch_file``: no pickled code runs);
    errors name the file and the cause."""
    obj = read_torch_file(path, "checkpoint", CheckpointError)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(obj).__name__}")
    return obj


def describe(ckpt: dict[str, Any]) -> str:
    return f"task={ckpt.get('task', '?')!r}, arch={ckpt.get('arch', '?')}"


def check_task(ckpt: dict[str, Any], path: str | Path, task: str) -> None:
    """Raises CheckpointError when ``ckpt`` was written by a run of another task."""
    found = ckpt.get("task")
    if found is not None and found != task:
        raise CheckpointError(f"{path} is a {found!r} checkpoint ({describe(ckpt)}); this run "
                              f"trains {task!r}. Pass a checkpoint written by a {task} run.")
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: not a detres checkpoint (no 'model' entry; keys: "
                              f"{', '.join(sorted(map(str, ckpt))[:6])})")


def check_resume(ckpt: dict[str, Any], path: str | Path, model: nn.Module, task: str,
                 class_names: Sequence[str] | None = None,
                 config: dict[str, Any] | None = None) -> None:
    """Refuses (one line) to continue ``ckpt`` with another task, another class list (the
    first differences of both lists) or another network (the differing keys of the stored
    config and ``config``), before the resumed run writes anything."""
    check_task(ckpt, path, task)
    stored = ckpt.get("class_names")
    if class_names is not None and stored is not None and (
            not isinstance(stored, (list, tuple)) or list(stored) != list(class_names)):
        stored = list(stored) if isinstance(stored, (list, tuple)) else [str(stored)]
        raise CheckpointError(
            f"{path} was trained on other classes than this run's data: "
            f"{class_difference(stored, list(class_names))}; resume with the data it was "
            f"trained on, or train on this data with train.output_dir=NEW_FOLDER")
    try:
        check_state_dict(model, ckpt["model"], str(path))
    except WeightsMismatchError as e:
        changed = _changed_keys(ckpt.get("config"), config)
        what = "; ".join(changed) if changed else str(e).splitlines()[0]
        raise CheckpointError(f"{path} holds another network than this config builds ({what}); "
                              f"resume with the config it was trained with, or start a new run "
                              f"with train.output_dir=NEW_FOLDER") from None


def class_difference(stored: list[Any], current: list[Any], where: str = "in the checkpoint",
                     here: str = "here") -> str:
    """``from class 1 on, ['circle', ...] (3 classes) in the checkpoint, ['person', ...] (3
    classes) here``: the first differences of two class lists, each shown with ``where`` and
    ``here``."""
    first = next((i for i, (a, b) in enumerate(zip(stored, current)) if a != b),
                 min(len(stored), len(current)))

    def shown(names: list[Any]) -> str:
        part = [repr(str(n)[:40]) for n in names[first:first + 3]]
        more = ["..."] if len(names) > first + 3 else []
        return "[" + ", ".join(["..."] * (first > 0) + part + more) + f"] ({len(names)} classes)"
    return f"from class {first} on, {shown(stored)} {where}, {shown(current)} {here}"


# config sections and keys that do not shape the network
_NOT_STRUCTURE = {"train", "data", "test", "solver", "precise_bn", "max_iter", "weights"}


def _changed_keys(stored: Any, current: Any) -> list[str]:
    """Up to 3 ``key: A in the checkpoint, B here`` for the network's config keys that differ."""
    if not isinstance(stored, dict) or not isinstance(current, dict):
        return []
    old, new = dict(_flat(stored)), dict(_flat(current))
    keys = [k for k in sorted(old.keys() | new.keys(), key=str)
            if old.get(k) != new.get(k) and not _NOT_STRUCTURE & set(k.split("."))]
    return [f"{k}: {repr(old.get(k))[:60]} in the checkpoint, {repr(new.get(k))[:60]} here"
            for k in keys[:3]]


def _flat(tree: dict[Any, Any], prefix: str = "", depth: int = 0
          ) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of a nested config dict; a stored config is read only 8 levels
    deep (a checkpoint is a file from anywhere)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth < 8:
            yield from _flat(value, f"{name}.", depth + 1)
        else:
            yield name, value


def load_checkpoint_weights(model: nn.Module, path: str | Path, task: str, *,
                            ckpt: dict[str, Any] | None = None,
                            class_layers: tuple[str, ...] = (),
                            reinit_class_layers: bool = False) -> dict[str, Any]:
    """Loads the weights of a detres checkpoint written by a ``task`` run into ``model``;
    returns the checkpoint (its metadata: ``class_names``, ``config``, ...). ``ckpt``: the
    checkpoint at ``path``, when the caller has read it already (it is then not read again).

    The state dict must fit the model exactly: a mismatch names the checkpoint's ``arch`` and
    summarises the differing keys. Parameters under ``class_layers`` (e.g. the box predictor)
    of another shape mean another class set: an error, unless ``reinit_class_layers``, when
    they keep the model's fresh initialisation.
    """
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    check_task(ckpt, path, task)
    state, own = dict(ckpt["model"]), model.state_dict()
    class_keys = [k for k in state if class_layers and k.startswith(class_layers)]
    if any(k in own and state[k].shape != own[k].shape for k in class_keys):
        if not reinit_class_layers:
            names = ckpt.get("class_names")
            found = len(names) if names is not None else "another number of"
            raise CheckpointError(
                f"{path} detects {found} classes but this model has "
                f"{getattr(model, 'num_classes', 'another number')}; set "
                f"model.reinit_class_layers=true to start its class layers afresh")
        state.update({k: v for k, v in own.items() if k.startswith(class_layers)})
    try:
        check_state_dict(model, state, str(path))
    except WeightsMismatchError as e:
        raise CheckpointError(f"{path} was written for another model ({describe(ckpt)}).\n{e}") \
            from None
    model.load_state_dict(state, strict=True)
    return ckpt


def extract_backbone(model_state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The ResNet part of a classifier's state dict, renamed to torchvision names minus ``fc``.

    ``extract_backbone(classifier.state_dict(), "net.")`` gives what
    ``weights_io.load_backbone_weights(ResNet(..., num_classes=None), file)`` accepts (the
    detector's initial weights, Appendix A).
    """
    out = {k[len(prefix):]: v for k, v in model_state.items()
           if k.startswith(prefix) and not k[len(prefix):].startswith("fc.")}
    if not out:
        raise CheckpointError(f"no parameters under '{prefix}' in this state dict")
    return out
