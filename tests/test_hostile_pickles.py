"""Hostile pickles through every reader a user reaches.

Forged numpy dtypes are the fake-object primitive: an object dtype with its flags cleared, a
float dtype flagged as holding objects, a structured dtype with an object field or a field far
past its item size, an inflated item size. numpy's own rebuild functions read the file's bytes
as pointers for them (a crash at 0x4141414141414141). With a byte count that does not fit the
shape and a pickled ``os.system``, each must be refused with one line naming the file: by the
array reader, ``tools/convert_weights.py`` (both formats) and the CIFAR reader. A ``.pth`` that
names ``os.system`` must be refused the same way by ``eval_det.py --weights``, ``train_det.py
model.weights=`` / ``model.backbone.weights=`` and ``Predictor.from_checkpoint``, without
torch's advice to retry with ``weights_only=False``. Every hostile read runs in a subprocess,
so that a crash is a failed test (a negative return code), not a dead suite.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from collections import OrderedDict

import numpy as np
import pytest
import torch
from helpers import ROOT

from detres.convert import read_arrays
from detres.data.builtin import ensure_builtin_shapes
from detres.data.classification import Cifar10
from detres.safe_pickle import load_arrays

# ----------------------------------------------------------------------------- pickle opcodes
NONE, FALSE, TRUE = b"N", b"\x89", b"\x88"
MULTIARRAY = "numpy.core.multiarray"   # the model zoos' (numpy 1) module name


def op_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_py2_str(data):
    """Python 2 ``str`` (BINSTRING): bytes, read as str with latin1, as bytes with "bytes"."""
    return b"T" + struct.pack("<i", len(data)) + data


def op_bytes(data):
    return b"B" + struct.pack("<I", len(data)) + data


def op_int(value):
    if -2**31 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    return b"\x8a\x08" + struct.pack("<q", value)          # LONG1, 8 bytes


def op_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def op_dict(*pairs):
    return b"}(" + b"".join(key + value for key, value in pairs) + b"u"


def op_call(fn, *args):
    return fn + op_tuple(*args) + b"R"


def op_dtype(code, order="<", names=NONE, fields=NONE, elsize=-1, alignment=-1, flags=0,
             text=op_str):
    """``numpy.dtype(code, False, True)`` then BUILD with the state numpy's ``__setstate__``
    reads: (3, byte order, subarray, names, fields, elsize, alignment, flags)."""
    state = op_tuple(op_int(3), text(order.encode() if text is op_py2_str else order), NONE,
                     names, fields, op_int(elsize), op_int(alignment), op_int(flags))
    code = code.encode() if text is op_py2_str else code
    return op_call(op_global("numpy", "dtype"), text(code), FALSE, TRUE) + state + b"b"


def op_array(shape, dtype, data, data_op=op_bytes):
    """numpy's protocol-2 layout: ``_reconstruct(ndarray, (0,), b"b")`` then BUILD with
    (1, shape, dtype, is_fortran, raw bytes)."""
    empty = op_call(op_global(MULTIARRAY, "_reconstruct"), op_global("numpy", "ndarray"),
                    op_tuple(op_int(0)), op_bytes(b"b"))
    return empty + op_tuple(op_int(1), op_tuple(*map(op_int, shape)), dtype, FALSE,
                            data_op(data)) + b"b"


def op_structured(field_dtype, offset, flags):
    """A 'V8' dtype whose one field 'a' is ``field_dtype`` at ``offset``."""
    fields = op_dict((op_str("a"), op_tuple(field_dtype, op_int(offset))))
    return op_dtype("V8", "|", names=op_tuple(op_str("a")), fields=fields, elsize=8,
                    alignment=1, flags=flags)


def forged_values(marker):
    """name -> the opcodes of one hostile value; 'A' * 8 is the pointer a crash would show."""
    pointer = b"A" * 16
    return {
        "object_scalar": op_call(op_global(MULTIARRAY, "scalar"),
                                 op_dtype("O8", "|", flags=0), op_bytes(pointer[:8])),
        "object_array": op_array((2,), op_dtype("O8", "|", flags=0), pointer),
        "object_flags": op_array((2,), op_dtype("f8", flags=63), pointer),
        "structured_object_field": op_array((2,), op_structured(op_dtype("O8", "|"), 0, 0),
                                            pointer),
        "field_offset_out_of_range": op_array((2,), op_structured(op_dtype("f8"), 1 << 40, 16),
                                              pointer),
        "inflated_itemsize_void": op_array((2,), op_dtype("V8", "|", elsize=1 << 30,
                                                          alignment=1, flags=16), pointer),
        "inflated_itemsize_float": op_array((2,), op_dtype("f4", elsize=1 << 20), pointer[:8]),
        "byte_count_not_the_shape": op_array((1000, 1000), op_dtype("f4"), pointer),
        "os_system": op_call(op_global("os", "system"), op_str(f"touch {marker}")),
    }


CASES = list(forged_values("x"))


def weights_pickle(value):
    """detectron2's model-zoo layout: {"model": {name: array}, "__author__": ...}."""
    return (b"\x80\x02" + op_dict((op_str("model"), op_dict((op_str("conv1.weight"), value))),
                                  (op_str("__author__"), op_str("x"))) + b".")


def cifar_pickle(value, num_labels=0):
    labels = b"](" + b"K\x00" * num_labels + b"e"          # [0] * num_labels
    return b"\x80\x02" + op_dict((op_bytes(b"data"), value), (op_bytes(b"labels"), labels)) + b"."


# ----------------------------------------------------------------------------- subprocesses
# Runs readers in one fresh process and prints [exit code, what went to stderr] per run, so a
# crash (SIGSEGV) of any of them shows as the process's negative return code.
DRIVER = textwrap.dedent("""
    import contextlib, io, json, runpy, sys
    from detres.cli import USER_ERRORS
    for kind, *args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                if kind == "tool":
                    sys.argv = [args[0], *args[1:]]
                    runpy.run_path(f"tools/{args[0]}.py", run_name="__main__")
                elif kind == "cifar":
                    from detres.data.classification import Cifar10
                    Cifar10(args[0], "test")
                else:
                    from detres import Predictor
                    Predictor.from_checkpoint(args[0])
                code = 0
            except SystemExit as e:
                code = e.code
            except USER_ERRORS as e:
                print(f"error: {e}", file=sys.stderr)
                code = 1
        print("RESULT", json.dumps([code, err.getvalue()]), flush=True)
""")


def drive(runs, env=None, timeout=300):
    """[(exit code, stderr lines)] of ``runs`` in one subprocess (it must not crash)."""
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])   # < 0: a signal
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert len(results) == len(runs), proc.stdout[-3000:]
    return [(code, err.strip().splitlines()) for code, err in results]


def assert_refused(code, lines, path, one_line=True):
    """Exit 1 and a last line ``error: <path>: ...``; no traceback, no weights_only advice."""
    text = "\n".join(lines)
    assert code == 1 and lines, (code, text)
    assert lines[-1].startswith("error: ") and str(path) in lines[-1], text
    assert "Traceback" not in text and "weights_only" not in text, text
    assert len(lines) == 1 or not one_line, text


READ = textwrap.dedent("""
    import sys
    from detres.safe_pickle import RefusedPickleError, load_arrays
    for encoding in ("latin1", "bytes"):
        with open(sys.argv[1], "rb") as f:
            try:
                load_arrays(f, encoding=encoding)
                print("loaded")
            except RefusedPickleError as e:
                print(f"refused: {e}")
""")


@pytest.mark.parametrize("case", CASES)
def test_forged_pickle_is_refused_and_never_crashes(case, tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / f"{case}.pkl"
    path.write_bytes(weights_pickle(forged_values(marker)[case]))
    proc = subprocess.run([sys.executable, "-c", READ, str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])   # < 0: a signal
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused: ") for line in lines), proc.stdout
    assert not marker.exists()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


TINY_DET = ["data.builtin.num_train=12", "data.builtin.num_val=6", "data.builtin.image_size=64",
            "data.min_size_train=[64]", "data.max_size_train=64", "data.min_size_test=64",
            "data.max_size_test=64", "model.backbone.width=8", "solver.ims_per_batch=2",
            "solver.steps=[]", "solver.warmup_iters=0", "train.device=cpu",
            "train.num_workers=0", "train.max_iter=1", "test.ims_per_batch=4"]


@pytest.fixture(scope="module")
def hostile_runs(tmp_path_factory):
    """Every hostile file through every reader below, in one subprocess (one import of torch
    and detres): {(reader, file): (exit code, stderr lines)}, the files, and the marker file
    that ``os.system`` would create."""
    tmp = tmp_path_factory.mktemp("hostile")
    marker = tmp / "code_ran"
    pth = tmp / "hostile.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "task": "detection", "payload": Payload(marker),
                "config": {}, "class_names": ["a"]}, pth)
    runs, out = {}, tmp / "out.pth"
    for case, value in forged_values(marker).items():
        (tmp / f"{case}.pkl").write_bytes(weights_pickle(value))
        (tmp / case).mkdir()
        (tmp / case / "test_batch").write_bytes(cifar_pickle(value))
        runs[("cifar", case)] = ["cifar", str(tmp / case)]
    for fmt in ("detectron2", "msra"):
        for source in [*(tmp / f"{case}.pkl" for case in CASES), pth]:
            runs[(fmt, source.stem)] = ["tool", "convert_weights", fmt, str(source),
                                        "--out", str(out)]
    # the tool a user runs on CIFAR, with one hostile batch among good ones
    good = cifar_pickle(op_array((1, 3072), op_dtype("u1", "|"), bytes(3072)), num_labels=1)
    cifar = tmp / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(good)
    (cifar / "data_batch_3").write_bytes(cifar_pickle(forged_values(marker)["object_array"]))
    runs[("pretrain_cls", "cifar")] = [
        "tool", "pretrain_cls", "configs/cls_resnet20_cifar10.yaml", f"data.train.root={cifar}",
        f"data.val.root={cifar}", "train.device=cpu", "train.num_workers=0",
        f"train.output_dir={tmp / 'cls'}"]
    det = ["configs/frcnn_r18_shapes.yaml", *TINY_DET]
    runs[("eval_det --weights", "pth")] = ["tool", "eval_det", *det,
                                           f"train.output_dir={tmp / 'e'}", "--weights", str(pth)]
    for key in ("model.weights", "model.backbone.weights"):
        runs[(key, "pth")] = ["tool", "train_det", *det, f"train.output_dir={tmp / key}",
                              f"{key}={pth}"]
    runs[("Predictor", "pth")] = ["predictor", str(pth)]
    cache = tmp / "cache"
    ensure_builtin_shapes(cache, num_train=12, num_val=6, image_size=64)
    results = drive(list(runs.values()), env={"DETRES_CACHE": str(cache)})
    assert not out.exists() and not out.with_suffix(".yaml").exists()
    return dict(zip(runs, results)), tmp, marker


def test_convert_tool_refuses_forged_files_with_one_line(hostile_runs):
    results, tmp, marker = hostile_runs
    for fmt in ("detectron2", "msra"):
        for case in CASES:
            assert_refused(*results[(fmt, case)], tmp / f"{case}.pkl")
            assert "refused" in results[(fmt, case)][1][0]
        assert_refused(*results[(fmt, "hostile")], tmp / "hostile.pth")
    assert not marker.exists()


def test_cifar_reader_refuses_forged_batches(hostile_runs):
    results, tmp, marker = hostile_runs
    for case in CASES:
        assert_refused(*results[("cifar", case)], tmp / case / "test_batch")
        assert "refusing this CIFAR batch" in results[("cifar", case)][1][0]
    code, lines = results[("pretrain_cls", "cifar")]
    assert_refused(code, lines, tmp / "cifar-10-batches-py" / "data_batch_3", one_line=False)
    assert not marker.exists()


def test_hostile_pth_is_refused_by_every_weights_option(hostile_runs):
    results, tmp, marker = hostile_runs
    for reader in ("eval_det --weights", "model.weights", "model.backbone.weights", "Predictor"):
        code, lines = results[(reader, "pth")]
        assert_refused(code, lines, tmp / "hostile.pth", one_line=reader == "Predictor")
        assert "refused to unpickle posix.system" in lines[-1], (reader, lines[-1])
    assert not marker.exists()


def test_convert_tool_as_a_user_runs_it(tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(weights_pickle(forged_values(tmp_path / "m")["object_scalar"]))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_weights.py"),
                           "detectron2", str(path), "--out", str(tmp_path / "out.pth")],
                          capture_output=True, text=True, timeout=300)
    assert_refused(proc.returncode, proc.stderr.strip().splitlines(), path)
    assert "refused dtype O8" in proc.stderr


# ----------------------------------------------------------------------------- real files
def real_arrays():
    rng = np.random.default_rng(0)
    return {"conv1_w": rng.standard_normal((4, 3, 7, 7)).astype(np.float32),
            "fortran": np.asfortranarray(rng.standard_normal((3, 5)).astype(np.float32)),
            "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
            "count": np.arange(5, dtype=np.int64), "mask": np.array([True, False]),
            "empty": np.zeros((0, 3), np.float32), "half": np.arange(4, dtype=np.float16)}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_load_with_identical_values(protocol, tmp_path):
    arrays = real_arrays()
    obj = {"model": OrderedDict(arrays), "lr": np.float32(0.1), "iter": np.int64(7),
           "names": ["a", ("b", b"c")]}
    data = pickle.dumps(obj, protocol=protocol)
    ours, numpys = load_arrays(io.BytesIO(data)), pickle.loads(data)   # numpy's own rebuild
    for name, value in numpys["model"].items():
        assert ours["model"][name].dtype == value.dtype.newbyteorder("=")
        assert np.array_equal(ours["model"][name], value) and ours["model"][name].flags.writeable
    assert ours["model"]["fortran"].flags.f_contiguous
    assert type(ours["lr"]) is np.float32 and ours["lr"] == numpys["lr"]
    assert type(ours["iter"]) is np.int64 and ours["iter"] == 7
    assert ours["names"] == ["a", ("b", b"c")]
    (tmp_path / "w.pkl").write_bytes(data)
    read = read_arrays(tmp_path / "w.pkl")
    assert list(read) == list(arrays)
    for name, value in arrays.items():
        expected = torch.from_numpy(value.astype(value.dtype.newbyteorder("=")))
        expected = expected.float() if expected.is_floating_point() else expected
        assert torch.equal(read[name], expected)


def test_python2_cifar_batch_reads_as_numpy_reads_it(tmp_path):
    """CIFAR's batches were written by Python 2: str keys and array bytes (BINSTRING),
    numpy.core names, read with encoding="bytes"."""
    images = np.random.default_rng(1).integers(0, 256, (2, 3072), dtype=np.uint8)
    data = (b"\x80\x02" + op_dict(
        (op_py2_str(b"data"), op_array((2, 3072), op_dtype("u1", "|", text=op_py2_str),
                                       images.tobytes(), data_op=op_py2_str)),
        (op_py2_str(b"labels"), b"](K\x03K\x01e")) + b".")
    numpys = pickle.loads(data.replace(b"numpy.core.", b"numpy._core."), encoding="bytes")
    assert np.array_equal(load_arrays(io.BytesIO(data), encoding="bytes")[b"data"],
                          numpys[b"data"])
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "test_batch").write_bytes(data)
    cifar = Cifar10(root, "test")
    assert np.array_equal(cifar.images, images.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))
    assert cifar.labels.tolist() == [3, 1]
