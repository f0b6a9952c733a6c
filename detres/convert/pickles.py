"""Reading other toolkits' weight files: ``.pkl`` pickles of numpy arrays (Caffe2, Detectron and
detectron2 model zoos) and ``.pth`` torch files, as name -> float32 tensor dicts.

A pickle names the functions that rebuild its objects, and plain ``pickle.load`` calls them:
a downloaded ``.pkl`` could run any code. :class:`ArrayUnpickler` admits only what numpy
arrays are rebuilt from, besides the dicts, lists, strings and numbers that need no function;
any other name stops the load before anything is called. ``.pth`` files are read with
``torch.load(weights_only=True)``, which has the same guarantee.
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

# (module, name) pairs a weights pickle may name. numpy 2 moved numpy.core to numpy._core;
# files written before (all of the model zoos) name the old module.
ALLOWED_GLOBALS = frozenset({
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),                  # bytes in protocol-2 pickles written by Python 3
    ("collections", "OrderedDict"),
})


class ConversionError(ValueError):
    """A source file that cannot be converted; the message names the file and the reason."""


class UnsafePickleError(ConversionError):
    """A pickle names a function outside :data:`ALLOWED_GLOBALS`; nothing of it was run."""


class ArrayUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that rebuilds only numpy arrays and plain containers.

    ``encoding="latin1"`` reads Python 2 pickles (MSRA's and Detectron's files), whose array
    bytes were written as ``str``.
    """

    def __init__(self, file: Any, path: str | Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.path}: refused to unpickle {module}.{name}: a weights pickle holds only "
                f"numpy arrays, dicts, lists, strings and numbers, and this one names a "
                f"function that loading would call (nothing was run)")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]
        return getattr(importlib.import_module(module), name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.path}: refused persistent id {pid!r} (not a plain "
                                f"pickle of numpy arrays)")


def load_pickle(path: str | Path) -> Any:
    """Unpickles ``path`` with :class:`ArrayUnpickler`; errors name the file."""
    try:
        with open(path, "rb") as f:
            return ArrayUnpickler(f, path).load()
    except UnsafePickleError:
        raise
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as e:  # truncated, not a pickle, a pickle of something else
        raise ConversionError(f"{path}: not a readable pickle of numpy arrays "
                              f"({type(e).__name__}: {str(e)[:200]})") from None


def _torch_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as e:  # truncated, another format, or pickled code that must not run
        raise ConversionError(f"{path}: cannot read as a weights-only torch file "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def read_arrays(path: str | Path) -> dict[str, Tensor]:
    """The named arrays of a weights file as tensors (floating point as float32).

    Accepts ``.pkl`` (a dict of arrays; detectron2's model zoo ``{"model": ...,
    "__author__": ...}``; Detectron's ``{"blobs": ...}``) and torch files (a state dict, or a
    checkpoint with one under ``"model"``, as detectron2 writes). Caffe2's solver state
    (``*_momentum``) and entries that are not arrays (e.g. a name or an iteration count) are
    left out.
    """
    path = Path(path)
    obj = load_pickle(path) if path.suffix == ".pkl" else _torch_file(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("blobs"), dict):
        obj = obj["blobs"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict of named arrays, got "
                              f"{type(obj).__name__}")
    arrays: dict[str, Tensor] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or name.endswith("_momentum"):
            continue
        if isinstance(value, np.ndarray) and value.dtype != object:
            value = torch.from_numpy(np.array(value))   # a writable copy
        if isinstance(value, Tensor):
            arrays[name] = value.float() if value.is_floating_point() else value
    if not arrays:
        raise ConversionError(f"{path}: holds no named arrays")
    return arrays
