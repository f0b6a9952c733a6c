"""What training says: a short console line per log period (losses, LR, speed) with the stage
it belongs to, every value in metrics.jsonl, a precision notice once per process; and which
precision a training step computes in on a CPU (train.amp)."""
import logging

import pytest
import torch
from helpers import TinyData, tiny_model
from torch import nn

from detres.data.classification import collate
from detres.data.loader import make_loader
from detres.data.samplers import TrainingSampler
from detres.engine import Trainer, WarmupMultiStepSchedule, precision
from detres.engine.logging import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def log_lines():
    """What the "detres" logger says (a tool run earlier in this process may have stopped it
    from propagating to pytest's capture)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("detres")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


class Recorder(nn.Module):
    """The tiny classifier; records the CPU autocast dtype of each forward and adds a stat."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.dtypes = tiny_model(norm="gn"), []

    def forward(self, images, labels):
        self.dtypes.append(torch.get_autocast_dtype("cpu")
                           if torch.is_autocast_enabled("cpu") else torch.float32)
        out = self.inner(images, labels)
        out.stats["num_fg_rois"] = torch.tensor(7.0)
        return out


def train(output_dir, resume: bool = False, **kwargs) -> Recorder:
    torch.manual_seed(0)
    model, data = Recorder(), TinyData()
    sampler = TrainingSampler(len(data), 8, seed=0)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      WarmupMultiStepSchedule(),
                      make_loader(data, collate_fn=collate, batch_sampler=sampler),
                      max_iter=2, output_dir=output_dir, sampler=sampler,
                      task="classification", log_period=1, progress=False, **kwargs)
    if resume:
        trainer.resume()
    trainer.run()
    trainer.close()
    return model


def test_console_line_is_short_and_names_the_stage_while_the_jsonl_keeps_all(tmp_path,
                                                                             log_lines):
    train(tmp_path, name="rpn")
    lines = [line for line in log_lines if "iter " in line]
    assert len(lines) == 2 and lines[0].startswith("rpn: iter 1/2  loss ")
    for line in lines:
        assert "loss_cls" in line and "lr " in line and " s/it" in line and "eta " in line
        assert "data_time" not in line and "num_fg_rois" not in line and len(line) < 120
    record = read_metrics(tmp_path)[0]
    assert {"loss", "loss_cls", "lr", "data_time", "num_fg_rois", "time",
            "eta_seconds"} <= set(record)
    (done,) = [line for line in log_lines if "trained iterations" in line]
    assert done.startswith("rpn: trained iterations 1-2 in 0:00:") and done.endswith(" s/it)")


def test_a_run_that_has_nothing_left_to_train_says_no_training_time(tmp_path, log_lines):
    train(tmp_path)
    log_lines.clear()
    train(tmp_path, resume=True)
    assert not [line for line in log_lines if "trained iterations" in line]


def test_amp_on_a_cpu_without_bf16_arithmetic_trains_fp32_and_says_so_once(
        tmp_path, log_lines, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision, "_notices", set())
    first = train(tmp_path / "a", amp="bf16")
    train(tmp_path / "b", amp="bf16")            # a second stage of the same process
    assert first.dtypes == [torch.float32, torch.float32]
    notices = [line for line in log_lines if "train.amp=bf16" in line]
    assert len(notices) == 1 and "float32" in notices[0]


def test_amp_bf16_autocasts_training_on_a_cpu_with_bf16_arithmetic(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    model = train(tmp_path, amp="bf16")
    assert model.dtypes == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())   # master weights fp32
    assert train(tmp_path / "fp32", amp="none").dtypes == [torch.float32, torch.float32]
    # auto, the default: bf16 on CUDA only (CPU bf16 training's accuracy is not yet measured)
    assert train(tmp_path / "auto", amp="auto").dtypes == [torch.float32, torch.float32]
    assert precision.cuda_amp_dtype("auto") is torch.bfloat16
