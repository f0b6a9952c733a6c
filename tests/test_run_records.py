"""Run records survive faults: a half-written metrics.jsonl line (a kill during a write),
config.yaml written atomically; and what the user reads when memory runs out or a DataLoader
worker fails (one line, the same with workers as without)."""
import json
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from detres import cli
from detres.config import dump
from detres.data.images import ImageDecodeError
from detres.engine.logging import MetricsWriter, read_metrics
from detres.tasks.detection.config import DetectionConfig


def test_resume_drops_a_half_written_line_and_later_records(tmp_path):
    lines = [json.dumps({"phase": "train", "iteration": i, "loss": 1.0 / i}) for i in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"phase": "train", "itera')
    writer = MetricsWriter(tmp_path, start_iter=2, tensorboard=False)
    writer.write({"phase": "train", "iteration": 3, "loss": 0.25})
    writer.close()
    assert [(r["iteration"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0), (2, 0.5), (3, 0.25)]


def test_read_metrics_skips_a_cut_last_line_and_names_a_damaged_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\n{"iteration": 2}\n{"itera')
    assert read_metrics(path) == [{"iteration": 1}, {"iteration": 2}]
    path.write_text('{"iteration": 1}\n{"itera\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON record"):
        read_metrics(path)


def test_config_yaml_is_replaced_whole(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old: true\n")

    def fail(*args, **kwargs):       # the write dies half-way: the old file must survive
        raise OSError("disk full")
    monkeypatch.setattr("detres.atomic.os.replace", fail)
    with pytest.raises(OSError):
        dump(DetectionConfig(), path)
    assert path.read_text() == "old: true\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]   # no temporary left
    monkeypatch.undo()
    dump(DetectionConfig(), path)
    assert "model:" in path.read_text()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried ..."),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: "
                                                "you tried to allocate 1 bytes"),
                                   MemoryError()])
def test_out_of_memory_is_one_line_naming_what_to_lower(error, capsys):
    def main():
        raise error
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of ")
    assert "solver.ims_per_batch" in err[0] and "intact" in err[0]


def test_other_runtime_errors_are_not_taken_for_out_of_memory():
    def main():
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.run_main(main)


class BadImages(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i):
        raise ImageDecodeError(f"/data/img_{i}.jpg: cannot decode image: truncated")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_worker_error_reads_as_the_same_line_as_without_workers(num_workers, capsys):
    def main():
        for _ in DataLoader(BadImages(), num_workers=num_workers):
            pass
    with pytest.raises(SystemExit):
        cli.run_main(main)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: /data/img_0.jpg: cannot decode image: truncated"]


@pytest.mark.parametrize("start_iter,purge_step", [(0, None), (20, 21)])
def test_tensorboard_purges_the_steps_after_the_resume_point(start_iter, purge_step, tmp_path,
                                                              monkeypatch):
    """TensorBoard is an optional extra: a stand-in SummaryWriter records how it is opened."""
    opened = {}

    class SummaryWriter:
        def __init__(self, log_dir, purge_step=None):
            opened.update(log_dir=log_dir, purge_step=purge_step)

        def close(self):
            pass

    fake = type(sys)("torch.utils.tensorboard")
    fake.SummaryWriter = SummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    MetricsWriter(tmp_path, start_iter=start_iter).close()
    assert opened["purge_step"] == purge_step
