"""Reading other toolkits' weight files: ``.pkl`` pickles of numpy arrays (Caffe2, Detectron and
detectron2 model zoos) and ``.pth`` torch files, as name -> float32 tensor dicts.

A pickle names the functions that rebuild its objects, and plain ``pickle.load`` calls them:
a downloaded ``.pkl`` could run any code, and even numpy's own rebuild functions crash on a
forged dtype. ``.pkl`` files are read with :func:`detres.safe_pickle.load_arrays`, which
builds plain numeric arrays itself and refuses anything else before it is called or built.
``.pth`` files are read with ``weights_io.read_torch_file`` (``torch.load(weights_only=True)``),
which refuses pickled code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from detres.safe_pickle import RefusedPickleError, load_arrays
from detres.weights_io import read_torch_file


class ConversionError(ValueError):
    """A source file that cannot be converted; the message names the file and the reason."""


class UnsafePickleError(ConversionError):
    """A pickle names a function outside the allow-list or an array that is not plain numbers
    (:mod:`detres.safe_pickle`); nothing of it was run."""


def load_pickle(path: str | Path) -> Any:
    """Unpickles ``path`` with :func:`detres.safe_pickle.load_arrays`; errors name the file."""
    try:
        with open(path, "rb") as f:
            return load_arrays(f)
    except RefusedPickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except Exception as e:  # truncated, not a pickle, nested too deep, a pickle of something else
        reason = (str(e).splitlines() or [""])[0][:200]
        raise ConversionError(f"{path}: not a readable pickle of numpy arrays "
                              f"({type(e).__name__}: {reason})") from None


def read_arrays(path: str | Path) -> dict[str, Tensor]:
    """The named arrays of a weights file as tensors (floating point as float32).

    Accepts ``.pkl`` (a dict of arrays; detectron2's model zoo ``{"model": ...,
    "__author__": ...}``; Detectron's ``{"blobs": ...}``) and torch files (a state dict, or a
    checkpoint with one under ``"model"``, as detectron2 writes). Caffe2's solver state
    (``*_momentum``) and entries that are not arrays (e.g. a name or an iteration count) are
    left out.
    """
    path = Path(path)
    obj = load_pickle(path) if path.suffix == ".pkl" else read_torch_file(path, "file",
                                                                          ConversionError)
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
        if isinstance(value, np.ndarray):   # numbers only, a writable copy (load_arrays)
            value = torch.from_numpy(value)
        if isinstance(value, Tensor):
            arrays[name] = value.float() if value.is_floating_point() else value
    if not arrays:
        raise ConversionError(f"{path}: holds no named arrays")
    return arrays
