"""Byte-budget arithmetic of a collection: pure functions of per-table costs and dims.

A table's cost is the bytes of one logical dim (rows x bytes per value); a budget is
``DimGrowConfig.budget`` resolved to bytes against the ``d_max`` model. The search's use of
the budget (admitting a growth only while it fits) is in :mod:`torchrec_dimgrow.policy`.
"""

from __future__ import annotations

from collections.abc import Sequence

from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.errors import BudgetError


def resolve_budget(budget: float | None, full_bytes: int) -> int | None:
    """Budget in bytes given the ``d_max`` model's bytes (``None`` stays ``None``)."""
    if budget is None:
        return None
    return int(budget * full_bytes) if budget <= 1 else int(budget)


def start_dims(
    d_max: Sequence[int], costs: Sequence[int], budget: int | None, config: DimGrowConfig
) -> list[int]:
    """Starting logical dims (see ``DimGrowConfig.initial_dim``; ``None`` = the block).

    Without ``initial_dim``, the largest ``k <= capacity_block`` whose dims ``min(k, d_max)``
    fit the budget; every table at 1 when none does (:func:`check_budget` then refuses it).
    """
    if config.initial_dim is not None:
        return [min(config.initial_dim, m) for m in d_max]
    for k in range(min(config.capacity_block, max(d_max)), 0, -1):
        dims = [min(k, m) for m in d_max]
        if budget is None or sum(c * d for c, d in zip(costs, dims)) <= budget:
            return dims
    return [1] * len(d_max)


def check_budget(
    budget: int | None, costs: Sequence[int], dims: Sequence[int], initial_dim: int | None
) -> None:
    """Refuse (:class:`BudgetError`) a budget that cannot hold every field at dim 1, or ``dims``."""
    if budget is None:
        return
    floor = sum(costs)
    if budget < floor:
        raise BudgetError(
            f"DimGrowConfig: budget {budget:,} bytes is below the {floor:,} bytes every "
            f"field needs at dim 1 ({len(costs)} tables); raise budget or drop tables"
        )
    start = sum(c * d for c, d in zip(costs, dims))
    if budget < start:
        raise BudgetError(
            f"DimGrowConfig: budget {budget:,} bytes is below the {start:,} bytes of the "
            f"starting dims (initial_dim={initial_dim}); lower initial_dim"
        )
