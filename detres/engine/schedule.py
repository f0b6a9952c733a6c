"""Learning-rate schedule: warmup, then multi-step decay, as a pure function of the iteration.

Paper recipes (He et al. 2015): ImageNet starts at 0.1 and divides by 10 when the error
plateaus (Sec 3.4); CIFAR divides by 10 at 32k and 48k iterations and stops at 64k, and
ResNet-110 first trains at 0.01 for about 400 iterations (Sec 4.2), a *constant* warmup.
Because the LR depends on the iteration alone, resuming needs nothing but the iteration.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass
from typing import Any

from torch.optim import Optimizer

WARMUP_METHODS = ("linear", "constant")


def lr_factor_at(iteration: int, steps: tuple[int, ...] = (), gamma: float = 0.1,
                 warmup_iters: int = 0, warmup_factor: float = 0.001,
                 warmup_method: str = "linear") -> float:
    """Multiplier of the base LR at ``iteration`` (0-based: the iteration about to run).

    Multi-step: ``gamma ** (number of steps <= iteration)``. During the first ``warmup_iters``
    iterations it is further multiplied by the warmup factor: ``warmup_factor`` throughout
    ("constant") or rising linearly from ``warmup_factor`` to 1 ("linear").
    """
    factor = gamma ** bisect_right(sorted(steps), iteration)
    if iteration < warmup_iters:
        if warmup_method == "constant":
            factor *= warmup_factor
        elif warmup_method == "linear":
            alpha = iteration / warmup_iters
            factor *= warmup_factor * (1 - alpha) + alpha
        else:
            raise ValueError(f"unknown warmup_method {warmup_method!r}; "
                             f"valid: {', '.join(WARMUP_METHODS)}")
    return factor


@dataclass(frozen=True)
class WarmupMultiStepSchedule:
    """Sets every param group's LR to ``group["initial_lr"] * lr_factor_at(iteration)``.

    ``initial_lr`` is stored in each group by :meth:`attach` (once, before training), so
    groups may have different base LRs. The schedule holds no mutable state; its
    ``state_dict`` records the parameters so a checkpoint says which schedule wrote it.
    """

    steps: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    warmup_method: str = "linear"

    def __post_init__(self) -> None:
        if self.warmup_method not in WARMUP_METHODS:
            raise ValueError(f"unknown warmup_method {self.warmup_method!r}; "
                             f"valid: {', '.join(WARMUP_METHODS)}")

    def factor(self, iteration: int) -> float:
        return lr_factor_at(iteration, self.steps, self.gamma, self.warmup_iters,
                            self.warmup_factor, self.warmup_method)

    def attach(self, optimizer: Optimizer) -> None:
        """Records each group's current ``lr`` as its ``initial_lr`` (kept if already set)."""
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def apply(self, optimizer: Optimizer, iteration: int) -> float:
        """Sets the LRs for ``iteration``; returns the first group's LR (for logging)."""
        factor = self.factor(iteration)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["steps"] = list(self.steps)
        return state
