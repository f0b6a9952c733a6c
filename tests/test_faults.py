"""The fault matrix: what a user gets when a run is killed, and when a checkpoint is hostile.

- ``kill -9`` at a random step (a real SIGKILL in a subprocess), then ``--resume``: the final
  weights and the training records equal an uninterrupted run's;
- ``kill -9`` in the middle of a checkpoint write: the previous checkpoint still loads and
  ``last_checkpoint`` names it;
- a checkpoint crafted to run code when unpickled (a ``__reduce__`` payload) is refused by every
  loader a user can point at a file, and the code never runs.
"""
import json
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import ROOT, load_tool, narrow_detector, tiny_cls_args

from detres.cli import run_main
from detres.engine.checkpoint import CheckpointError, read_checkpoint
from detres.engine.logging import read_metrics
from detres.tasks.common import BackboneConfig, build_backbone
from detres.tasks.detection.load import load_detector
from detres.tasks.detection.predictor import Predictor
from detres.weights_io import UnreadableWeightsError

pretrain_cls = load_tool("pretrain_cls")
pytestmark = pytest.mark.usefixtures("one_thread")
MAX_ITER = 8

# Runs tools/pretrain_cls.py with a SIGKILL planted at iteration K: before the step ("step") or
# half-way through writing the checkpoint taken after K iterations ("save").
KILLER = textwrap.dedent("""
    import os, runpy, signal, sys
    import torch
    from detres.engine import loop
    k, where = int(sys.argv[1]), sys.argv[2]
    if where == "step":
        step = loop.Trainer.step
        def killing_step(self, batch):
            if self.iteration == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, batch)
        loop.Trainer.step = killing_step
    else:
        save = torch.save
        def killing_save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("iteration") == k:
                f.write(b"half a checkpoint")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return save(obj, f, *args, **kwargs)
        torch.save = killing_save
    sys.argv = [TOOL, *sys.argv[3:]]
    runpy.run_path(TOOL, run_name="__main__")
""").replace("TOOL", repr(str(ROOT / "tools" / "pretrain_cls.py")))


def run_killed(tiny_cls_set: Path, out: Path, k: int, where: str) -> None:
    args = tiny_cls_args(tiny_cls_set, out, f"train.max_iter={MAX_ITER}")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(k), where, *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def train_records(out: Path) -> list[tuple[int, float]]:
    return [(r["iteration"], r["loss"]) for r in read_metrics(out) if r["phase"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_cls_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    pretrain_cls.main(tiny_cls_args(tiny_cls_set, out, f"train.max_iter={MAX_ITER}"))
    return out


@pytest.mark.parametrize("where", ["step", "save"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(where, tiny_cls_set, uninterrupted,
                                                        tmp_path):
    k = random.Random(where).choice([3, 5]) if where == "step" else 4   # checkpoints: 2, 4, 6
    out = tmp_path / "killed"
    run_killed(tiny_cls_set, out, k, where)
    last = 2 if where == "save" or k < 4 else 4        # the newest complete checkpoint
    pointer = (out / "last_checkpoint").read_text().strip()
    assert pointer == f"model_{last - 1:07d}.pth"
    assert read_checkpoint(out / pointer)["iteration"] == last
    assert not any(p.name.endswith(".tmp") and p.stat().st_size == 0 for p in out.iterdir())
    pretrain_cls.main(tiny_cls_args(tiny_cls_set, out, f"train.max_iter={MAX_ITER}", "--resume"))
    assert train_records(out) == train_records(uninterrupted)      # bitwise equal losses
    final, expected = (torch.load(p / "model_final.pth", weights_only=True)["model"]
                       for p in (out, uninterrupted))
    assert all(torch.equal(final[key], expected[key]) for key in expected)


class Payload:
    """Unpickling this object would create ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "hostile.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "task": "detection", "payload": Payload(marker),
                "config": {}, "class_names": ["a"]}, path)
    return path, marker


def test_a_pickled_payload_is_refused_by_every_loader(hostile, tiny_cls_set, tmp_path, capsys):
    path, marker = hostile
    with pytest.raises(CheckpointError, match="weights-only"):        # --weights
        load_detector(path)
    with pytest.raises(CheckpointError, match="weights-only"):        # model.weights
        narrow_detector(f"weights={path}")
    with pytest.raises(CheckpointError, match="weights-only"):        # Predictor, infer.py
        Predictor.from_checkpoint(path)
    with pytest.raises(UnreadableWeightsError, match="weights-only"):  # model.backbone.weights
        build_backbone(BackboneConfig(depth=18, width=8, weights=str(path)))
    with pytest.raises(SystemExit):                                   # a tool, end to end
        run_main(lambda: pretrain_cls.main(tiny_cls_args(
            tiny_cls_set, tmp_path / "eval", "--eval-only", "--weights", str(path))))
    assert "weights-only" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not marker.exists()


def test_dotdot_and_symlinks_in_annotations_write_nothing_outside_the_run(tmp_path, monkeypatch):
    """COCO file names with ``..`` (allowed by allow_outside_paths) and a symlinked image are
    read, but every file the run writes lies inside train.output_dir."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    paths = [images / "a.png", tmp_path / "data" / "outside.png", tmp_path / "elsewhere.png"]
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
    (images / "link.png").symlink_to(tmp_path / "elsewhere.png")
    names = ["a.png", "../outside.png", "link.png", "../images/../outside.png"]
    coco = {"images": [{"id": i + 1, "file_name": n, "width": 64, "height": 64}
                       for i, n in enumerate(names)],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                             "bbox": [8.0, 8.0, 30.0, 30.0], "area": 900.0}
                            for i in range(len(names))],
            "categories": [{"id": 1, "name": "thing"}]}
    annotations = tmp_path / "data" / "instances.json"
    annotations.write_text(json.dumps(coco))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    out = tmp_path / "run"
    split = [f"annotations={annotations}", f"images={images}", "type=coco",
             "allow_outside_paths=true"]
    load_tool("train_det").main([
        *[f"data.{s}.{kv}" for s in ("train", "val") for kv in split],
        "data.min_size_train=[64]", "data.max_size_train=64", "data.min_size_test=64",
        "data.max_size_test=64", "model.backbone.width=8", "solver.ims_per_batch=2",
        "solver.steps=[]", "solver.warmup_iters=0", "train.device=cpu", "train.num_workers=0",
        "train.max_iter=1", "test.ims_per_batch=4", f"train.output_dir={out}"])
    changed = {p for p in tmp_path.rglob("*")
               if p not in before or p.stat().st_mtime_ns != before[p]}
    assert changed and all(p == out or out in p.parents for p in changed), sorted(changed)


def test_two_runs_started_into_one_folder_at_once_one_refuses(tiny_cls_set, tmp_path):
    out = tmp_path / "shared"
    args = tiny_cls_args(tiny_cls_set, out, "train.max_iter=30", "train.checkpoint_period=0")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tools" / "pretrain_cls.py"), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    refusal = next(err for code, err in results if code == 1).strip().splitlines()[-1]
    assert refusal.startswith("error: ") and str(out) in refusal
    assert [r["iteration"] for r in read_metrics(out) if r["phase"] == "train"] == list(
        range(1, 31))                                  # one run's records, nothing mixed
