"""LR schedule: warmup + multi-step as a pure function of the iteration; batch scaling."""
import pytest
import torch

from detres.engine.schedule import WarmupMultiStepSchedule, lr_factor_at


def test_multistep_without_warmup_divides_at_each_step():
    # CIFAR recipe (Sec 4.2): 0.1, /10 at 32k and 48k.
    f = [lr_factor_at(i, steps=(32000, 48000)) for i in (0, 31999, 32000, 47999, 48000, 63999)]
    assert f == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_linear_warmup_rises_from_factor_to_one():
    kw = dict(warmup_iters=10, warmup_factor=0.1, warmup_method="linear")
    assert lr_factor_at(0, **kw) == pytest.approx(0.1)
    assert lr_factor_at(5, **kw) == pytest.approx(0.1 * 0.5 + 0.5)
    assert lr_factor_at(10, **kw) == pytest.approx(1.0)


def test_constant_warmup_is_resnet110_recipe():
    # "use 0.01 to warm up ... about 400 iterations, and then go back to 0.1" (Sec 4.2)
    kw = dict(steps=(32000, 48000), warmup_iters=400, warmup_factor=0.1, warmup_method="constant")
    assert 0.1 * lr_factor_at(0, **kw) == pytest.approx(0.01)
    assert 0.1 * lr_factor_at(399, **kw) == pytest.approx(0.01)
    assert 0.1 * lr_factor_at(400, **kw) == pytest.approx(0.1)


def test_warmup_and_step_combine():
    assert lr_factor_at(3, steps=(2,), gamma=0.5, warmup_iters=5, warmup_factor=0.0) == \
        pytest.approx(0.5 * 3 / 5)


def test_unknown_warmup_method_is_rejected():
    with pytest.raises(ValueError, match="warmup_method"):
        WarmupMultiStepSchedule(warmup_method="cosine")


def test_apply_sets_each_group_from_its_initial_lr():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.1)
    schedule = WarmupMultiStepSchedule(steps=(2,), gamma=0.1)
    schedule.attach(opt)
    assert schedule.apply(opt, 5) == pytest.approx(0.01)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.001])
    schedule.apply(opt, 0)                                  # a pure function: no memory
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1, 0.01])
    assert schedule.state_dict()["steps"] == [2]
