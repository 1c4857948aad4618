"""Grow / shrink decisions: a pure function of gate values and counters.

Nothing here touches tensors that train; the search loop feeds in the (globally agreed)
importance table and applies the returned changes. That keeps the rule easy to test and
guarantees every rank derives the same decision from the same table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from torchrec_dimgrow.config import DimGrowConfig


@dataclass(frozen=True)
class DimChange:
    """One logical-dim change of one table.

    ``slot`` is the 0-based slot that appears (grow: always the new last slot) or that
    is removed (shrink: the lowest-gate slot, or the last one with ``shrink_slot="last"``).
    """

    table: int
    kind: Literal["grow", "shrink"]
    slot: int
    old_dim: int
    new_dim: int


@dataclass
class PolicyState:
    """Logical dims plus the consecutive-check counters of each table."""

    dims: list[int]
    up: list[int] = field(default_factory=list)
    down: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.dims)
        if not self.up:
            self.up = [0] * n
        if not self.down:
            self.down = [0] * n
        if len(self.up) != n or len(self.down) != n:
            raise ValueError("PolicyState: dims, up and down must have one entry per table")

    def copy(self) -> PolicyState:
        return PolicyState(list(self.dims), list(self.up), list(self.down))


def decide(
    gates: Sequence[Sequence[float]],
    state: PolicyState,
    config: DimGrowConfig,
    d_max: Sequence[int] | None = None,
) -> tuple[PolicyState, list[DimChange]]:
    """Apply the DimGrow rule once to every table.

    Args:
        gates: importance per table and slot (at least ``dims[t]`` values per table).
        state: current dims and counters (not modified).
        config: thresholds, patience, budget and shrink-slot choice.
        d_max: per-table cap (defaults to ``config.d_max`` for all).

    Returns:
        The new state and the list of changes, in table order. A table grows by at most
        one slot per check; it never shrinks below 1 (dropping a field is decided at
        export, from the final gates, as the reference does).
    """
    if len(gates) != len(state.dims):
        raise ValueError(f"decide: {len(gates)} gate rows for {len(state.dims)} tables")
    caps = list(d_max) if d_max is not None else [config.d_max] * len(state.dims)
    new = state.copy()
    changes: list[DimChange] = []
    total = sum(new.dims)
    for t, row in enumerate(gates):
        d = new.dims[t]
        active = [float(v) for v in row[:d]]
        if len(active) != d:
            raise ValueError(f"decide: table {t} has dim {d} but only {len(active)} gate values")
        new.up[t] = new.up[t] + 1 if all(v > config.grow_threshold for v in active) else 0
        new.down[t] = new.down[t] + 1 if min(active) < config.shrink_threshold else 0
        if new.up[t] >= config.grow_patience and d < caps[t] and total < config.max_total_dim:
            new.dims[t] = d + 1
            new.up[t] = 0
            new.down[t] = 0
            total += 1
            changes.append(DimChange(t, "grow", d, d, d + 1))
        elif new.down[t] >= config.shrink_patience and d > 1:
            if config.shrink_slot == "lowest":
                slot = min(range(d), key=lambda k: (active[k], -k))
            else:
                slot = d - 1
            new.dims[t] = d - 1
            new.down[t] = 0
            new.up[t] = 0
            total -= 1
            changes.append(DimChange(t, "shrink", slot, d, d - 1))
    return new, changes


def capacity_for(dim: int, current: int, config: DimGrowConfig) -> int:
    """Physical width a table should have for logical ``dim``, given its ``current`` width.

    Grows in whole blocks as soon as ``dim`` exceeds ``current``; gives storage back only
    when more than ``capacity_slack_blocks`` spare blocks sit unused (hysteresis).
    """
    block = config.capacity_block
    needed = max(block, -(-dim // block) * block)
    if needed > current:
        return needed
    if current - needed > config.capacity_slack_blocks * block:
        return needed
    return current


def final_dims(gates: Sequence[Sequence[float]], config: DimGrowConfig) -> list[int]:
    """Exported dim per table: the number of slots whose gate exceeds ``final_threshold``.

    Counted over all active slots only: a slot that was never active has never been
    trained and says nothing. A table with 0 is dropped (DimGrow doubles as feature
    selection).
    """
    return [sum(1 for v in row if float(v) > config.final_threshold) for row in gates]
