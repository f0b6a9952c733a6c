"""Detection training resumes exactly: an interrupted and resumed run gives bit-for-bit the
losses of an uninterrupted one, with and without DataLoader workers (each sample's
augmentation, flip and multi-scale draw included, comes from its position in the stream)."""
import pytest
import torch
from helpers import builtin_shapes_cache, load_tool

from detres.engine.logging import read_metrics

train_det = load_tool("train_det")
TINY = ["data.builtin.num_train=12", "data.builtin.num_val=4", "data.builtin.image_size=64",
        "data.min_size_train=[48,64]", "data.max_size_train=64", "data.min_size_test=64",
        "data.max_size_test=64", "data.flip_prob=0.5", "model.backbone.width=8",
        "solver.ims_per_batch=2", "solver.steps=[]", "solver.warmup_iters=0",
        "train.device=cpu", "train.log_period=1", "train.num_threads=1",
        "train.checkpoint_period=3", "test.ims_per_batch=4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return builtin_shapes_cache(tmp_path_factory, num_train=12, num_val=4)


def train_losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if r["phase"] == "train"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(num_workers, cache, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setenv("DETRES_CACHE", str(cache))
    common = [*TINY, f"train.num_workers={num_workers}"]
    train_det.main([*common, "train.max_iter=6", f"train.output_dir={tmp_path / 'whole'}"])
    parts = tmp_path / "parts"
    train_det.main([*common, "train.max_iter=3", f"train.output_dir={parts}"])
    train_det.main([*common, "train.max_iter=6", f"train.output_dir={parts}", "--resume"])
    whole = train_losses(tmp_path / "whole")
    assert len(whole) == 6 and train_losses(parts) == whole     # bitwise, not approx
    final = [torch.load(p / "model_final.pth", weights_only=True)["model"]
             for p in (tmp_path / "whole", parts)]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
