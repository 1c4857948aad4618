"""Allowed ranges of numeric settings, declared next to each configuration dataclass.

A dataclass lists its ranges in a ``{field: Bound}`` table and checks them in its
``check()`` method (:func:`check_bounds`); the message names the setting as a config key
(``dimgrow.d_max must be in [1, 256], got 0``), so it reads the same whether the value came
from a flag, ``--set`` or a config file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torchrec_dimgrow.errors import UsageError


@dataclass(frozen=True)
class Bound:
    """Allowed interval of a numeric setting; ``*_open`` excludes the end point itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        assert self.high is not None
        return f"{'<' if self.high_open else '<='} {_num(self.high)}"

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


def _num(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else str(x)


POSITIVE = Bound(0, low_open=True)
AT_LEAST_1 = Bound(1)
NON_NEGATIVE = Bound(0)
MAX_DIM = 256
"""Upper bound of ``d_max``/``uniform_dim`` in a run: DimGrow searches small per-field dims
(the paper stops at 16-64); a larger value is almost always a typo that would allocate
``vocab x d`` floats per table before failing."""


def check_bounds(
    values: Mapping[str, Any],
    bounds: Mapping[str, Bound],
    section: str = "",
    below: Sequence[tuple[str, str]] = (),
) -> None:
    """Every setting of ``values`` named in ``bounds`` (and not None) lies in its interval,
    and each ``(a, b)`` of ``below`` has ``a < b``; else one :class:`UsageError` naming it.

    Takes a mapping, so a configuration can be checked before its dataclass is built (whose
    own ``__post_init__`` rules would otherwise answer first, with a less precise message).
    """

    def key(name: str) -> str:
        return f"{section}.{name}" if section else name

    for name, bound in bounds.items():
        value = values.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not bound.holds(value):
            raise UsageError(f"{key(name)} must be {bound.describe()}, got {_num(value)}")
    for low, high in below:
        a, b = values.get(low), values.get(high)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not a < b:
            raise UsageError(f"{key(low)} ({a}) must be below {key(high)} ({b})")
