"""Reading pickles that may be hostile: model-zoo ``.pkl`` files (Caffe2, Detectron,
detectron2) and CIFAR's python batches, which hold numpy arrays in dicts and lists.

``pickle.load`` calls whatever the file names, and even numpy's own rebuild functions are
unsafe on forged input: a dtype rebuilt from a pickled state can claim to hold objects (its
flags cleared or set), fields past its item size or an inflated item size, and the array or
scalar rebuilt with it then reads the file's bytes as pointers (a crash at an address the
file chose) or past its buffer. So no numpy code sees the file's data: the pickle gets
stand-ins for numpy's names that only record what the file says, and :func:`load_arrays`
builds each array afterwards from an allow-list of plain numeric dtypes with
``np.frombuffer(...).reshape(...)``, after checking the byte count against the shape.

The stand-ins are unhashable objects with slots whose ``__setstate__`` records or refuses, so
the pickle's BUILD opcode can neither set attributes on them nor reach numpy's C code.
"""
from __future__ import annotations

import collections
import math
import pickle
import re
from typing import Any, BinaryIO

import numpy as np

# numpy's codes for plain numbers. numpy pickles them with the state (3, byte order, None,
# None, None, -1, -1, 0); any other state for them is forged.
NUMERIC_CODES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8",
                           "f2", "f4", "f8"})


class RefusedPickleError(pickle.UnpicklingError):
    """The pickle names something outside the allow-list or describes an array that is not
    plain numbers whose bytes match its shape; nothing it names was run or built."""


def _show(value: Any) -> str:
    """A value of the file for a one-line message: no control characters, bounded, and no
    walk through a container the file may have nested deep."""
    if isinstance(value, str) and value.isprintable() and len(value) <= 80:
        return value
    if isinstance(value, (str, bytes)):
        return ascii(value[:80])
    if isinstance(value, (bool, float, type(None))) or (
            isinstance(value, int) and abs(value) < 2**64) or (
            isinstance(value, tuple) and len(value) <= 8
            and all(type(v) is int and abs(v) < 2**64 for v in value)):
        return ascii(value)
    return f"<{type(value).__name__}>"


def _text(value: Any, what: str) -> str:
    # Python 2 ``str`` arrives as bytes with encoding="bytes", as str with "latin1"
    if isinstance(value, bytes):
        value = value.decode("latin1")
    if not isinstance(value, str):
        raise RefusedPickleError(f"refused {what} {_show(value)} (not a string)")
    return value


def _raw_bytes(value: Any) -> bytes | bytearray:
    if isinstance(value, str):          # Python 2 bytes read with encoding="latin1"
        return value.encode("latin1")
    if isinstance(value, (bytes, bytearray)):
        return value
    raise RefusedPickleError(f"refused array data of type {type(value).__name__} (an array of "
                             f"numbers stores raw bytes)")


class _Stub:
    """Base of the stand-ins: no ``__dict__``, unhashable (never a dict key or set member)."""

    __slots__ = ()
    __hash__ = None  # type: ignore[assignment]

    def __setstate__(self, state: Any) -> None:
        raise RefusedPickleError(f"refused a state for {type(self).__name__.strip('_')}")


class _Global(_Stub):
    """What the pickle gets for an allowed name: calling it records, never runs numpy."""

    __slots__ = ("name", "make")

    def __init__(self, name: str, make: Any) -> None:
        self.name, self.make = name, make

    def __call__(self, *args: Any) -> Any:
        return self.make(*args)

    def __setstate__(self, state: Any) -> None:
        raise RefusedPickleError(f"refused a state for {self.name}")


class _Dtype(_Stub):
    """``numpy.dtype(code, align, copy)`` and its ``__setstate__``, recorded."""

    __slots__ = ("code", "state")

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        self.code, self.state = code, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def build(self) -> np.dtype:
        code = _text(self.code, "dtype")
        if code not in NUMERIC_CODES:
            raise RefusedPickleError(f"refused dtype {_show(code)} (only arrays and numbers of "
                                     f"bool, integer and float dtypes are read)")
        dtype = np.dtype(code)
        if self.state is None:
            return dtype
        state = self.state
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
            raise RefusedPickleError(f"refused a {code} dtype with an unknown state layout")
        order = _text(state[1], "byte order")
        orders = ("|", "<", ">", "=") if dtype.itemsize == 1 else ("<", ">", "=")
        plain = (order in orders and state[2] is None and state[3] is None
                 and state[4] is None and state[5] in (-1, dtype.itemsize)
                 and state[6] in (-1, dtype.alignment) and state[7] == 0
                 and (len(state) == 8 or state[8] is None))
        if not plain:
            raise RefusedPickleError(
                f"refused a forged {code} dtype (its byte order, subarray, fields, item size, "
                f"alignment or flags are not those of plain numbers)")
        return dtype.newbyteorder(order if order in ("<", ">") else "=")


class _Array(_Stub):
    """An ndarray as ``_reconstruct`` + ``__setstate__`` or ``_frombuffer`` describe it."""

    __slots__ = ("shape", "dtype", "fortran", "data")

    def __init__(self, shape: Any = None, dtype: Any = None, fortran: Any = False,
                 data: Any = None) -> None:
        self.shape, self.dtype, self.fortran, self.data = shape, dtype, fortran, data

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, rawdata); numpy also reads it without version
        if not (isinstance(state, tuple) and len(state) in (4, 5)
                and (len(state) == 4 or state[0] == 1)):
            raise RefusedPickleError("refused an array with an unknown state layout")
        self.shape, self.dtype, self.fortran, self.data = state[-4:]

    def build(self) -> np.ndarray:
        if not isinstance(self.dtype, _Dtype):
            raise RefusedPickleError("refused an array without a numpy dtype")
        dtype = self.dtype.build()
        shape = self.shape
        if not (isinstance(shape, tuple) and len(shape) <= 32
                and all(type(n) is int and n >= 0 for n in shape)):
            raise RefusedPickleError(f"refused an array of shape {_show(shape)}")
        if self.fortran not in (False, True):
            raise RefusedPickleError(f"refused an array with order flag {_show(self.fortran)}")
        data = _raw_bytes(self.data)
        if math.prod(shape) * dtype.itemsize != len(data):
            raise RefusedPickleError(
                f"refused an array of shape {shape} and dtype {dtype.str}: it needs "
                f"{math.prod(shape) * dtype.itemsize} bytes, the file holds {len(data)}")
        array = np.frombuffer(data, dtype).reshape(shape, order="F" if self.fortran else "C")
        return array.astype(dtype.newbyteorder("="))   # a writable copy, native byte order


class _Scalar(_Stub):
    """``numpy.core.multiarray.scalar(dtype, raw bytes)``: a numpy number."""

    __slots__ = ("dtype", "data")

    def __init__(self, dtype: Any, data: Any) -> None:
        self.dtype, self.data = dtype, data

    def build(self) -> np.generic:
        if not isinstance(self.dtype, _Dtype):
            raise RefusedPickleError("refused a scalar without a numpy dtype")
        dtype = self.dtype.build()
        data = _raw_bytes(self.data)
        if len(data) != dtype.itemsize:
            raise RefusedPickleError(f"refused a {dtype.str} scalar of {len(data)} bytes")
        return np.frombuffer(data, dtype)[0]


def _refuse_call(*args: Any) -> Any:
    raise RefusedPickleError("refused a call of numpy.ndarray (arrays are rebuilt by "
                             "numpy's _reconstruct or _frombuffer)")


_NDARRAY = _Global("numpy.ndarray", _refuse_call)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    if cls is not _NDARRAY:    # a subclass (matrix, masked array) would name its own class
        raise RefusedPickleError("refused _reconstruct of something else than numpy.ndarray")
    return _Array()


def _from_buffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _Array:
    order = _text(order, "array order")
    if order not in ("C", "F"):
        raise RefusedPickleError(f"refused array order {_show(order)}")
    return _Array(shape, dtype, order == "F", buffer)


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    # how Python 3 writes bytes in protocol 2: _codecs.encode(str, "latin1")
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise RefusedPickleError(f"refused _codecs.encode with encoding {_show(encoding)}")
    return text.encode("latin1")


def _empty_bytes() -> bytes:
    return b""   # how Python 3 writes b"" in protocol 2: bytes()


# numpy 2 moved numpy.core to numpy._core; files written before (all of the model zoos) name
# the old module. __builtin__ is Python 2's name of builtins, which protocol 2 keeps.
_NAMES = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _Global("numpy.dtype", _Dtype),
          ("_codecs", "encode"): _Global("_codecs.encode", _latin1_bytes),
          ("__builtin__", "bytes"): _Global("bytes", _empty_bytes),
          ("builtins", "bytes"): _Global("bytes", _empty_bytes),
          ("collections", "OrderedDict"): collections.OrderedDict}
for _core in ("numpy.core", "numpy._core"):
    _NAMES[(_core + ".multiarray", "_reconstruct")] = _Global("_reconstruct", _reconstruct)
    _NAMES[(_core + ".multiarray", "scalar")] = _Global("scalar", _Scalar)
    _NAMES[(_core + ".numeric", "_frombuffer")] = _Global("_frombuffer", _from_buffer)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NAMES:
            raise RefusedPickleError(
                f"refused to unpickle {_show(module)}.{_show(name)} (only numpy arrays of "
                f"numbers, dicts, lists, strings and numbers are read; nothing was run)")
        return _NAMES[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickleError(f"refused persistent id {_show(pid)} (not a plain pickle)")


def _resolve(obj: Any, done: dict[int, Any]) -> Any:
    """``obj`` with every stand-in replaced by the array, dtype or number it describes;
    containers are changed in place (tuples rebuilt), shared or cyclic ones visited once."""
    if id(obj) in done:
        return done[id(obj)]
    if isinstance(obj, (_Array, _Scalar, _Dtype)):
        done[id(obj)] = obj.build()
    elif isinstance(obj, _Global):
        raise RefusedPickleError(f"refused a bare {obj.name} (not data)")
    elif isinstance(obj, dict):
        done[id(obj)] = obj
        for key, value in list(obj.items()):
            obj[key] = _resolve(value, done)
    elif isinstance(obj, list):
        done[id(obj)] = obj
        obj[:] = [_resolve(value, done) for value in obj]
    elif isinstance(obj, tuple):
        done[id(obj)] = tuple(_resolve(value, done) for value in obj)
    else:
        return obj
    return done[id(obj)]


def load_arrays(file: BinaryIO, encoding: str = "latin1") -> Any:
    """Unpickles ``file``: dicts, lists, tuples, strings, numbers and numpy arrays (and numpy
    numbers) of bool, integer and float dtypes; anything else raises
    :class:`RefusedPickleError` before it is called or built.

    Args:
        file: a binary file.
        encoding: how Python 2 ``str`` is read: "latin1" (as str; MSRA's and Detectron's
            files) or "bytes" (CIFAR's keys are ``b"data"``, ``b"labels"``).
    """
    return _resolve(_Unpickler(file, encoding=encoding).load(), {})


def torch_load_reason(error: Exception) -> str:
    """``torch.load``'s error as a short line for a message that names the file, without its
    advice to retry with ``weights_only=False`` or to allow-list the refused name: for a
    hostile file both would run its code."""
    text = str(error)
    refused = re.search(r"GLOBAL (\S+)", text)
    if text.startswith("Weights only load failed") and refused:
        return f"refused to unpickle {_show(refused[1])}; nothing was run"
    lines = (line.strip() for line in text.replace("Weights only load failed.", "").splitlines())
    lines = [line for line in lines if line and "weights_only" not in line]
    reason = re.sub(r"\x1b\[[0-9;]*m", "", lines[0]) if lines else "unreadable"
    return f"{type(error).__name__}: {''.join(c for c in reason if c.isprintable())[:200]}"
