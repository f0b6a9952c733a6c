"""The training loop: tiny runs, exact resume, NaN guard, outputs, clipping, precise BN.

Models are a depth-8 CIFAR ResNet of width 4 on 8x8 random images: milliseconds per step.
"""
import json
import math

import pytest
import torch
from torch import nn

from helpers import TinyData, bad_gradient, tiny_model

from detres.data.classification import collate
from detres.data.loader import make_loader
from detres.data.samplers import TrainingSampler
from detres.engine import NonFiniteLossError, Trainer, WarmupMultiStepSchedule
from detres.engine.logging import read_metrics
from detres.engine.loop import losses_of
from detres.engine.precise_bn import recompute_bn_stats


pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(output_dir, max_iter, data_wrapper=None, model=None, **kwargs) -> Trainer:
    torch.manual_seed(0)
    model = model or tiny_model()
    data = TinyData()
    sampler = TrainingSampler(len(data), 8, seed=0)
    loader = make_loader(data, collate_fn=collate, batch_sampler=sampler)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    schedule = WarmupMultiStepSchedule(steps=(6,), warmup_iters=3, warmup_factor=0.1)
    defaults = dict(log_period=1, checkpoint_period=4, progress=False, meta={"arch": "tiny"})
    return Trainer(model, optimizer, schedule,
                   data_wrapper(loader) if data_wrapper else loader, max_iter=max_iter,
                   output_dir=output_dir, sampler=sampler, task="classification",
                   **{**defaults, **kwargs})


def train_losses(run_dir) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in read_metrics(run_dir) if r["phase"] == "train"}


def test_tiny_run_learns_and_writes_outputs(tmp_path):
    trainer = make_trainer(tmp_path, 40, eval_fn=lambda m: {"top1_err": 1.0}, eval_period=20)
    result = trainer.run()
    trainer.close()
    assert result.iteration == 40 and len(result.losses) == 40
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    records = read_metrics(tmp_path)
    train = [r for r in records if r["phase"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, 41))
    assert {"loss", "loss_cls", "top1_err", "lr", "time", "data_time"} <= set(train[0])
    assert [r["iteration"] for r in records if r["phase"] == "eval"] == [20, 40]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert {p.name for p in tmp_path.glob("*.pth")} == {
        "model_0000003.pth", "model_0000007.pth", "model_0000011.pth", "model_0000015.pth",
        "model_0000019.pth", "model_0000023.pth", "model_0000027.pth", "model_0000031.pth",
        "model_0000035.pth", "model_final.pth"}
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_is_complete_and_weights_only(tmp_path):
    trainer = make_trainer(tmp_path, 4)
    trainer.run()
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "iteration", "rng", "sampler",
            "task", "arch"} <= set(ckpt)
    assert ckpt["iteration"] == 4 and ckpt["sampler"] == {"next_batch": 4}
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}


class CrashAt:
    """Wraps a loader; raises while fetching batch ``at`` (a kill in the middle of a run)."""

    def __init__(self, loader, at):
        self.loader, self.at = loader, at

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.at:
                raise KeyboardInterrupt("simulated crash")
            yield batch


def test_resume_after_crash_repeats_the_uninterrupted_losses_exactly(tmp_path):
    full = make_trainer(tmp_path / "full", 10)
    full.run()
    full.close()
    expected = train_losses(tmp_path / "full")

    crashed = make_trainer(tmp_path / "resumed", 10, data_wrapper=lambda loader: CrashAt(loader, 6))
    with pytest.raises(KeyboardInterrupt):
        crashed.run()                 # checkpoint after 4 iterations, crash fetching batch 6
    crashed.close()
    assert max(train_losses(tmp_path / "resumed")) == 6
    resumed = make_trainer(tmp_path / "resumed", 10)
    assert resumed.resume() and resumed.iteration == 4
    resumed.run()
    resumed.close()
    got = train_losses(tmp_path / "resumed")  # records 5 and 6 of the crashed run were dropped
    assert list(got) == list(range(1, 11))
    assert got == expected                    # bitwise equal on CPU


class NanAt(nn.Module):
    """A tiny classifier whose loss turns NaN on forward call ``at`` (0-based)."""

    def __init__(self, at: int):
        super().__init__()
        self.inner, self.at, self.calls = tiny_model(), at, 0

    def forward(self, images, labels):
        out = self.inner(images, labels)
        if self.calls == self.at:
            out.losses["loss_cls"] = out.losses["loss_cls"] * float("nan")
        self.calls += 1
        return out


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, 10, model=NanAt(5))
    with pytest.raises(NonFiniteLossError, match=r"iteration 5 .*loss=nan, loss_cls=nan") as e:
        trainer.run()
    assert "model_0000003.pth" in str(e.value) and "intact" in str(e.value)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_final.pth").exists()
    ckpt = torch.load(tmp_path / "model_0000003.pth", weights_only=True)
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_losses_of_accepts_dict_object_and_tensor():
    t = torch.tensor(1.0)
    assert losses_of({"a": t}) == {"a": t}
    assert losses_of(t) == {"loss": t}
    assert losses_of(type("Out", (), {"losses": {"b": t}})()) == {"b": t}
    with pytest.raises(TypeError, match="losses"):
        losses_of([t])


def test_gradient_clipping_bounds_the_first_update(tmp_path):
    torch.manual_seed(0)
    model = tiny_model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = make_loader(TinyData(), collate_fn=collate, batch_sampler=TrainingSampler(48, 8))
    trainer = Trainer(model, optimizer, WarmupMultiStepSchedule(), loader, max_iter=1,
                      clip_grad_norm=1e-3, progress=False, task="classification")
    trainer.run()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_precise_bn_averages_batch_statistics():
    bn = nn.BatchNorm2d(1)
    model = nn.Sequential(bn).train()
    batches = [(torch.full((2, 1, 2, 2), float(v)) + torch.tensor([0.0, 1.0]).view(2, 1, 1, 1),)
               for v in (1, 3, 5)]
    assert recompute_bn_stats(model, batches, num_batches=3) == 3
    assert bn.running_mean.item() == pytest.approx((1.5 + 3.5 + 5.5) / 3)
    assert bn.momentum == 0.1                 # restored
    var = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).var().item()  # unbiased
    assert bn.running_var.item() == pytest.approx(var)


def test_metrics_file_is_json_lines(tmp_path):
    trainer = make_trainer(tmp_path, 2)
    trainer.run()
    trainer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(math.isfinite(json.loads(ln)["loss"]) for ln in lines)


# ----------------------------------------------------------------------------- fp16 grad scaler
def cpu_grad_scaler(init_scale: float) -> "torch.amp.GradScaler":
    """Trainer enables its scaler on CUDA only (amp=fp16); the same branch runs on a CPU when the
    trainer is given an enabled CPU scaler (torch >= 2.3)."""
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    except (AttributeError, RuntimeError, TypeError, ValueError) as e:
        pytest.skip(f"this torch ({torch.__version__}) has no CPU GradScaler: {e}")
    if not scaler.is_enabled():
        pytest.skip(f"this torch ({torch.__version__}) disables GradScaler on the CPU")
    return scaler


class InfGradAt(nn.Module):
    """A tiny classifier whose fc bias gets an infinite gradient while the loss stays finite
    (an fp16 overflow in the backward pass)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, images, labels):
        out = self.inner(images, labels)
        bias = self.inner.net.fc.bias
        out.losses["loss_cls"] = out.losses["loss_cls"] + bad_gradient(bias, float("inf"))
        return out


def scaler_trainer(model, clip_grad_norm):
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = make_loader(TinyData(), collate_fn=collate, batch_sampler=TrainingSampler(48, 8))
    trainer = Trainer(model, optimizer, WarmupMultiStepSchedule(), loader, max_iter=1,
                      clip_grad_norm=clip_grad_norm, progress=False, task="classification")
    assert not trainer.scaler.is_enabled()      # amp="none" on a CPU: float32, no scaling
    return trainer, next(iter(loader))


def test_grad_scaler_unscales_before_clipping():
    scaler = cpu_grad_scaler(init_scale=2.0**16)
    torch.manual_seed(0)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer, batch = scaler_trainer(model, clip_grad_norm=1e-3)
    trainer.scaler = scaler
    trainer.step(batch)
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    # clipped in true units: had the scaled gradients been clipped, the step would divide them
    # by 2**16 again and move the weights by ~1.5e-8 instead of the bound
    assert grads.norm().item() <= 1e-3 * (1 + 1e-4)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(1e-3, rel=1e-3)
    assert scaler.get_scale() == 2.0**16        # finite gradients: no backoff
    assert trainer.state_dict()["scaler"]["scale"] == 2.0**16


@pytest.mark.parametrize("clip_grad_norm", [None, 1.0])
def test_grad_scaler_skips_the_update_on_an_inf_gradient(clip_grad_norm):
    scaler = cpu_grad_scaler(init_scale=1024.0)
    torch.manual_seed(0)
    model = InfGradAt()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer, batch = scaler_trainer(model, clip_grad_norm=clip_grad_norm)
    trainer.scaler = scaler
    losses, _, _ = trainer.step(batch)
    assert math.isfinite(losses["loss"])          # the loss is finite, only a gradient is not
    assert math.isinf(model.inner.net.fc.bias.grad[0].item()) or clip_grad_norm is not None
    for name, value in model.named_parameters():   # (BN running stats move in any forward)
        assert torch.equal(value, before[name]), name
    assert not trainer.optimizer.state or all(    # no step: no momentum buffers either
        s.get("momentum_buffer") is None for s in trainer.optimizer.state.values())
    assert scaler.get_scale() == 512.0             # backoff factor 0.5
    assert trainer.iteration == 1                  # the iteration counts; the update was skipped


# ----------------------------------------------------------------------------- NaN gradients
class NanGradAt(nn.Module):
    """A tiny classifier whose fc bias gets a NaN gradient on forward call ``at`` (0-based)
    while every loss stays finite (e.g. a 0 * inf inside a backward)."""

    def __init__(self, at: int, norm: str = "bn"):
        super().__init__()
        self.inner, self.at, self.calls = tiny_model(norm), at, 0

    def forward(self, images, labels):
        out = self.inner(images, labels)
        if self.calls == self.at:
            bias = self.inner.net.fc.bias
            out.losses["loss_cls"] = out.losses["loss_cls"] + bad_gradient(bias, float("nan"))
        self.calls += 1
        return out


@pytest.mark.parametrize("clip_grad_norm", [None, 1.0])   # clipping passes a NaN on
def test_nan_gradient_with_finite_loss_stops_before_the_update(tmp_path, clip_grad_norm):
    from detres.engine.loop import NonFiniteGradientError

    trainer = make_trainer(tmp_path, 10, model=NanGradAt(4), clip_grad_norm=clip_grad_norm)
    with pytest.raises(NonFiniteGradientError, match=r"gradient at iteration 4 .*loss=") as e:
        trainer.run()                 # checkpoint after 4 iterations, NaN gradient in the 5th
    assert isinstance(e.value, NonFiniteLossError)            # the CLI's user error
    assert "model_0000003.pth" in str(e.value) and "intact" in str(e.value)
    assert trainer.iteration == 4
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_final.pth").exists()
    ckpt = torch.load(tmp_path / "model_0000003.pth", weights_only=True)
    assert ckpt["iteration"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    # no update: the weights are still those of the checkpoint
    for name, value in trainer.module.inner.named_parameters():
        assert torch.equal(value.detach(), ckpt["model"]["inner." + name]), name
