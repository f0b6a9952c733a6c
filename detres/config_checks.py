"""The value checks a schema declares beside its fields: ``checked(default, Range(...))``.

``detres.config`` reads them when it builds a config (``load_config``, ``from_dict``,
``replace``) and refuses a value outside them, naming the key; it re-exports these names.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (value, the section holding it) -> None when valid, else "must be ..." (what is valid)
Check = Callable[[Any, Any], "str | None"]


@dataclass(frozen=True)
class Range:
    """A number, or each number of a list, within ``lo``..``hi`` (either may be open or
    absent); NaN and infinities lie in no range. ``non_empty`` lists need a value,
    ``ascending`` ones values that never decrease. ``None`` (an optional field unset) passes."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    non_empty: bool = False
    ascending: bool = False

    def __call__(self, value: Any, section: Any = None) -> str | None:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            noun = ("an integer" if isinstance(value, int) else
                    "a number" if self.hi is not None else "a finite number")
            return None if self._holds(value) else f"must be {noun} {self.bounds()}"
        if (all(map(self._holds, value)) and (value or not self.non_empty)
                and (not self.ascending or list(value) == sorted(value))):
            return None
        kind = "non-empty list" if self.non_empty else "list"
        order = ", in increasing order" if self.ascending else ""
        noun = "integers" if value and isinstance(value[0], int) else "numbers"
        return f"must be a {kind} of {noun} {self.bounds()}{order}"

    def _holds(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def bounds(self) -> str:
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.lo_open else '['}{self.lo}, "
                    f"{self.hi}{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return f"{'<' if self.hi_open else '<='} {self.hi}"


# the ranges most fields take
AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
POSITIVE = Range(0, lo_open=True)                 # learning rates, scales, standard deviations
FRACTION = Range(0, 1)                            # probabilities, IoU thresholds, fractions
SEED = Range(0, 2**32 - 1)                        # what numpy's seeding accepts
PIXEL = Range(0, 255)


def checked(default: Any, check: Check) -> Any:
    """A dataclass field whose values ``check`` accepts; ``load_config``, ``from_dict`` and
    ``replace`` refuse others, naming the key (``Range`` or a function of the same form)."""
    return dataclasses.field(default=default, metadata={"check": check})
