"""The one inference loop (evaluation/inference.py): eval mode and no autograd inside, every
submodule's own mode given back afterwards, also when the loop raises."""
import pytest
import torch
from torch import nn

from detres.evaluation.inference import inference_context, run_inference


def mixed_mode_model() -> nn.Sequential:
    """In train mode except its frozen BatchNorm, which training keeps in eval mode."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    model[1].eval()
    return model


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_inference_context_restores_each_module_mode_on_exception():
    model = mixed_mode_model()
    with pytest.raises(KeyError):
        with inference_context(model):
            assert modes(model) == [False, False, False]
            raise KeyError("boom")
    assert modes(model) == [True, True, False]


def test_run_inference_concatenates_steps_without_autograd_and_restores_modes():
    model = mixed_mode_model()
    seen = []

    def step(batch):
        seen.append((model.training, torch.is_grad_enabled()))
        return [b * 10 for b in batch]

    assert run_inference(model, [[1, 2], [], [3]], step, progress=False) == [10, 20, 30]
    assert seen == [(False, False)] * 3 and modes(model) == [True, True, False]
    def failing(batch):
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        run_inference(model, [[1]], failing, progress=False)
    assert modes(model) == [True, True, False]
