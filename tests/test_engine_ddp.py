"""DistributedDataParallel on CPU (gloo): 2 processes with 4 images each give the losses of one
process with the same 8-image global batch.

The model uses GroupNorm: BatchNorm normalises with per-rank batch statistics, so a BN model
legitimately differs between 1 x 8 and 2 x 4 images. Without BN, DDP's gradient average over
ranks equals the gradient of the mean loss over the global batch, and the sampler gives every
rank its slice of the same global batches.
"""
import json
import os

import pytest
import torch
from helpers import TinyData, bad_gradient, run_two_gloo_ranks, tiny_model
from torch import nn

from detres.data.classification import collate
from detres.data.loader import make_loader
from detres.data.samplers import TrainingSampler
from detres.engine import Trainer, WarmupMultiStepSchedule
from detres.engine.logging import read_metrics
from detres.engine.loop import NonFiniteLossError

MAX_ITER, GLOBAL_BATCH = 6, 8
pytestmark = pytest.mark.usefixtures("one_thread")


def _train(output_dir, rank: int = 0, world_size: int = 1) -> list[float]:
    torch.manual_seed(0)
    model = tiny_model(norm="gn")
    data = TinyData()
    sampler = TrainingSampler(len(data), GLOBAL_BATCH, seed=0, rank=rank,
                              world_size=world_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    trainer = Trainer(model, optimizer, WarmupMultiStepSchedule(), make_loader(
        data, collate_fn=collate, batch_sampler=sampler), max_iter=MAX_ITER,
        output_dir=output_dir, sampler=sampler, log_period=1, checkpoint_period=3,
        progress=False, task="classification")
    losses = trainer.run().losses
    trainer.close()
    return losses


def _rank(rank: int, world_size: int, output_dir: str) -> None:
    losses = _train(output_dir, rank, world_size)
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(losses, f)


@pytest.mark.timeout(180)
def test_two_process_gloo_ddp_matches_one_process(tmp_path):
    single = _train(tmp_path / "single")
    run_two_gloo_ranks(_rank, str(tmp_path / "ddp"))
    per_rank = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert per_rank[0] == per_rank[1]                     # losses are averaged over ranks
    torch.testing.assert_close(torch.tensor(per_rank[0]), torch.tensor(single),
                               rtol=1e-5, atol=1e-6)
    assert single[-1] < single[0]
    # Only rank 0 wrote: one record per iteration, one set of checkpoints.
    assert len(read_metrics(tmp_path / "ddp")) == MAX_ITER
    ckpt = torch.load(tmp_path / "ddp" / "model_final.pth", weights_only=True)
    assert ckpt["iteration"] == MAX_ITER


# ------------------------------------------------------------- a NaN on one of two ranks only
NAN_AT = 4          # the 0-based iteration; the checkpoint after 3 iterations is the last good


class NanOnRank1(nn.Module):
    """The tiny GN classifier; on rank 1 only, iteration NAN_AT has a NaN loss ("loss") or a
    finite loss with a NaN fc-bias gradient ("grad")."""

    def __init__(self, kind: str, rank: int):
        super().__init__()
        self.inner, self.kind, self.rank, self.calls = tiny_model(norm="gn"), kind, rank, 0

    def forward(self, images, labels):
        out = self.inner(images, labels)
        if self.rank == 1 and self.calls == NAN_AT:
            loss = out.losses["loss_cls"]
            out.losses["loss_cls"] = (loss * float("nan") if self.kind == "loss"
                                      else loss + bad_gradient(self.inner.net.fc.bias,
                                                               float("nan")))
        self.calls += 1
        return out


def _nan_rank(rank: int, world_size: int, output_dir: str, kind: str) -> None:
    torch.manual_seed(0)
    model, data = NanOnRank1(kind, rank), TinyData()
    sampler = TrainingSampler(len(data), GLOBAL_BATCH, seed=0, rank=rank, world_size=world_size)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      WarmupMultiStepSchedule(),
                      make_loader(data, collate_fn=collate, batch_sampler=sampler),
                      max_iter=MAX_ITER, output_dir=output_dir, sampler=sampler,
                      checkpoint_period=3, progress=False, task="classification")
    try:
        trainer.run()
        outcome = "finished"
    except NonFiniteLossError as e:
        outcome = f"{type(e).__name__}: {e}"
    trainer.close()
    with open(os.path.join(output_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind, error", [("loss", "NonFiniteLossError: non-finite loss"),
                                         ("grad", "NonFiniteGradientError: non-finite gradient")])
def test_nan_on_one_rank_stops_both_and_keeps_the_last_checkpoint(tmp_path, kind, error):
    # a rank left waiting in a collective fails after 60 s instead of hanging the test
    run_two_gloo_ranks(_nan_rank, str(tmp_path), kind)
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    for outcome in outcomes:
        assert outcome.startswith(f"{error} at iteration {NAN_AT} "), outcome
        assert "model_0000002.pth is intact" in outcome
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not (tmp_path / "model_final.pth").exists()
    ckpt = torch.load(tmp_path / "model_0000002.pth", weights_only=True)
    assert ckpt["iteration"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
