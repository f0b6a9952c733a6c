"""Collectives put their tensors where the backend takes them, checked without a GPU.

NCCL rejects CPU tensors ("No backend type associated with device type cpu"): a CPU tensor
all-reduced in a CUDA run kills it, which gloo-only DDP tests never show. Here a fake NCCL
all-reduce raises on any tensor not moved to CUDA; the move itself is recorded instead of
allocating (``distributed._to``), so the check runs on a CPU-only machine.
"""
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import TinyData, tiny_model

import detres
from detres.data.classification import collate
from detres.data.loader import make_loader
from detres.data.samplers import TrainingSampler
from detres.engine import Trainer, WarmupMultiStepSchedule
from detres.engine import distributed as du
from detres.engine.precise_bn import recompute_bn_stats
from detres.evaluation.classification import ClassificationEvaluator

WORLD_SIZE = 2


def test_backend_device():
    assert du.backend_device("nccl") == torch.device("cuda")    # the current CUDA device
    assert du.backend_device("gloo") == torch.device("cpu")


def install_fake_nccl(monkeypatch) -> list[torch.device]:
    """Two identical ranks behind an NCCL-like group; returns the devices of reduced tensors."""
    reduced: list[torch.device] = []

    def move(tensor, device):            # a CPU copy that remembers where it was sent
        out = tensor.clone()
        out.fake_device = torch.device(device)
        return out

    def all_reduce(tensor, op=None, **kwargs):
        device = getattr(tensor, "fake_device", tensor.device)
        reduced.append(device)
        if device.type != "cuda":
            raise RuntimeError(f"No backend type associated with device type {device.type}")
        tensor.mul_(WORLD_SIZE)           # the sum over two ranks holding the same values

    monkeypatch.setattr(du, "_to", move)
    monkeypatch.setattr(du, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: WORLD_SIZE)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return reduced


@pytest.fixture
def fake_nccl(monkeypatch):
    return install_fake_nccl(monkeypatch)


def test_all_reduce_tensor_runs_on_the_backend_device(fake_nccl):
    values = torch.tensor([1.0, 3.0])
    total = du.all_reduce_tensor(values, average=False)
    assert fake_nccl == [torch.device("cuda")]
    assert torch.equal(total, values * WORLD_SIZE) and total.fake_device == values.device
    assert torch.equal(du.all_reduce_tensor(values), values)     # the average


def test_classification_evaluator_sums_counts_under_nccl(fake_nccl):
    evaluator = ClassificationEvaluator()
    evaluator.process((None, torch.tensor([0, 1, 0])), torch.eye(3))   # the third is wrong
    result = evaluator.evaluate()
    assert fake_nccl == [torch.device("cuda")]
    assert result["num_images"] == 3 * WORLD_SIZE
    assert result["top1_err"] == pytest.approx(100.0 / 3)


def test_precise_bn_averages_over_ranks_under_nccl(fake_nccl):
    bn = nn.BatchNorm2d(1)
    batches = [(torch.arange(8.0).view(2, 1, 2, 2),)]
    assert recompute_bn_stats(nn.Sequential(bn), batches, num_batches=1) == 1
    assert fake_nccl == [torch.device("cuda")] * 2              # running mean and var
    assert bn.running_mean.item() == pytest.approx(3.5)


def test_training_step_reduces_its_losses_under_nccl(monkeypatch):
    model = tiny_model()
    loader = make_loader(TinyData(), collate_fn=collate, batch_sampler=TrainingSampler(48, 8))
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      WarmupMultiStepSchedule(), loader, max_iter=1, progress=False,
                      task="classification")
    reduced = install_fake_nccl(monkeypatch)     # after the Trainer: no DDP wrapper wanted
    losses, _, _ = trainer.step(next(iter(loader)))
    assert reduced == [torch.device("cuda")] and losses["loss"] > 0


def test_init_distributed_binds_nccl_to_the_local_gpu(monkeypatch):
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.setdefault("init", kw))
    info = du.init_distributed(torch.device("cuda", 1))
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    # all_gather_object and barrier use torch.cuda.current_device() under NCCL
    assert calls == {"set_device": 1,
                     "init": {"backend": "nccl", "device_id": torch.device("cuda", 1)}}


# a collective called on torch.distributed, by its full name or the usual alias
COLLECTIVE_CALL = re.compile(r"\b(?:torch\.distributed|dist)\s*\.\s*"
                             r"(?:all_reduce|all_gather|all_to_all|broadcast|reduce|gather|scatter)"
                             r"\w*\s*\(")


@pytest.mark.parametrize("line,is_call", [
    ("torch.distributed.broadcast_object_list(box, src=0)", True),
    ("dist.all_reduce(buffer, op=dist.ReduceOp.SUM)", True),
    ("dist.all_gather_object(out, obj)", True),
    ("torch.distributed.reduce_scatter(out, chunks)", True),
    ("du.all_reduce_tensor(values)", False),
    ("du.broadcast_object((result, error))", False),
    ("dist.get_world_size()", False),
])
def test_the_collective_pattern_sees_both_spellings(line, is_call):
    assert bool(COLLECTIVE_CALL.search(line)) == is_call


def test_collectives_are_called_only_through_engine_distributed():
    """Every collective goes through ``all_reduce_tensor``/``all_gather_objects``/
    ``gather_objects``/``broadcast_object``, the functions that follow the backend's device."""
    root = Path(detres.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "distributed.py" and COLLECTIVE_CALL.search(p.read_text())]
    assert offenders == []


def test_broadcast_object_returns_rank_0s_object(monkeypatch):
    assert du.broadcast_object("mine") == "mine"                 # one process: itself
    sent = []

    def broadcast_object_list(box, src=0):
        sent.append((list(box), src))
        box[0] = "rank 0's"
    monkeypatch.setattr(du, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    assert du.broadcast_object("mine") == "rank 0's" and sent == [(["mine"], 0)]
