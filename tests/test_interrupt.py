"""Ctrl-C during training: the step in progress finishes, a checkpoint of that iteration is
written (and named in last_checkpoint), one line says how to continue, the exit code is
non-zero; a second Ctrl-C ends at once; under torchrun every rank stops after the same step.

The in-process tests send SIGINT from inside the model's forward at a chosen iteration, so
the point of interruption is exact; the tool test sends it from outside, as a terminal does.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TinyData, run_two_gloo_ranks, tiny_model
from torch import nn

from detres.data.builtin import ensure_builtin_shapes
from detres.data.classification import collate
from detres.data.loader import make_loader
from detres.data.samplers import TrainingSampler
from detres.engine import Trainer, WarmupMultiStepSchedule
from detres.engine.checkpoint import Checkpointer, periodic_name
from detres.engine.interrupt import TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")
INTERRUPT_AT = 3        # the 0-based iteration during whose forward Ctrl-C is pressed


class CtrlCAt(nn.Module):
    """The tiny classifier; presses Ctrl-C (SIGINT to its own process) ``times`` times during
    the forward of iteration ``at`` (``rank``: only there)."""

    def __init__(self, at: int = INTERRUPT_AT, times: int = 1, rank: int = 0,
                 on_rank: int = 0) -> None:
        super().__init__()
        self.inner, self.at, self.times, self.calls = tiny_model(norm="gn"), at, times, 0
        self.press = rank == on_rank

    def forward(self, images, labels):
        if self.press and self.calls == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
        self.calls += 1
        return self.inner(images, labels)


def make_trainer(model_fn, output_dir, rank=0, world_size=1, max_iter=10) -> Trainer:
    torch.manual_seed(0)
    model = model_fn()
    data = TinyData()
    sampler = TrainingSampler(len(data), 8, seed=0, rank=rank, world_size=world_size)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                   WarmupMultiStepSchedule(),
                   make_loader(data, collate_fn=collate, batch_sampler=sampler),
                   max_iter=max_iter, output_dir=output_dir, sampler=sampler,
                   task="classification", log_period=1, checkpoint_period=0, progress=False)


def test_ctrl_c_finishes_the_step_and_saves_it(tmp_path):
    trainer = make_trainer(CtrlCAt, tmp_path)
    saved = tmp_path / f"{periodic_name(INTERRUPT_AT + 1)}.pth"
    with pytest.raises(TrainingInterrupted, match=f"interrupted at iteration {INTERRUPT_AT + 1}; "
                       f"saved {saved}; continue with --resume"):
        trainer.run()
    ckpt = torch.load(saved, weights_only=True)
    assert ckpt["iteration"] == INTERRUPT_AT + 1        # the step in progress was finished
    assert Checkpointer(tmp_path).last_checkpoint() == saved
    assert not (tmp_path / "model_final.pth").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handler restored
    # --resume continues from it to the end, as an uninterrupted run does
    resumed = make_trainer(lambda: CtrlCAt(at=-1), tmp_path)
    assert resumed.resume() and resumed.iteration == INTERRUPT_AT + 1
    resumed.run()
    straight = make_trainer(lambda: CtrlCAt(at=-1), tmp_path / "straight")
    straight.run()
    for a, b in zip(resumed.module.parameters(), straight.module.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_second_ctrl_c_ends_at_once(tmp_path):
    trainer = make_trainer(lambda: CtrlCAt(times=2), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert not list(tmp_path.glob("model_*.pth"))       # nothing half-finished was saved


# ------------------------------------------------------------------- torchrun: two ranks
def _rank(rank: int, world_size: int, output_dir: str) -> None:
    trainer = make_trainer(lambda: CtrlCAt(rank=rank, on_rank=1), output_dir, rank, world_size)
    try:
        trainer.run()
        stopped = None
    except TrainingInterrupted as e:
        stopped = e.iteration
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"stopped": stopped, "iteration": trainer.iteration}, f)


@pytest.mark.timeout(180)
def test_ctrl_c_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    run_two_gloo_ranks(_rank, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] == {"stopped": INTERRUPT_AT + 1, "iteration": INTERRUPT_AT + 1}
    ckpt = torch.load(tmp_path / f"{periodic_name(INTERRUPT_AT + 1)}.pth", weights_only=True)
    assert ckpt["iteration"] == INTERRUPT_AT + 1


# ------------------------------------------------------------------- as a user presses it
TINY = ["data.builtin.num_train=12", "data.builtin.num_val=6", "data.builtin.image_size=64",
        "data.min_size_train=[64]", "data.max_size_train=64", "data.min_size_test=64",
        "data.max_size_test=64", "model.backbone.width=8", "solver.ims_per_batch=2",
        "solver.steps=[]", "solver.warmup_iters=0", "train.device=cpu", "train.num_workers=1",
        "train.log_period=1", "train.num_threads=1", "train.max_iter=100000"]


@pytest.mark.timeout(240)
def test_train_det_on_ctrl_c_saves_says_one_line_and_exits_non_zero(tmp_path):
    ensure_builtin_shapes(tmp_path / "cache", num_train=12, num_val=6, image_size=64)
    env = {**os.environ, "DETRES_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "train_det.py"), *TINY,
                             f"train.output_dir={out}"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    # to the whole process group, as a terminal does: the data-loader worker gets it too
    os.killpg(os.getpgid(proc.pid), signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted at iteration ") and last.endswith(
        "; continue with --resume"), last
    n = int(last.split()[3].rstrip(";"))
    saved = Path(last.split("saved ")[1].split(";")[0])
    assert saved == out / f"{periodic_name(n)}.pth" and saved.is_file()
    assert torch.load(saved, weights_only=True)["iteration"] == n
    assert (out / "last_checkpoint").read_text().strip() == saved.name


def test_ctrl_c_before_the_first_step_saves_nothing(tmp_path):
    trainer = make_trainer(lambda: CtrlCAt(at=-1), tmp_path)
    trainer._interrupt.requested = True          # pressed before the first batch arrived
    with pytest.raises(TrainingInterrupted, match="^interrupted at iteration 0; continue with"):
        trainer.run()
    assert not list(tmp_path.glob("model_*.pth"))
