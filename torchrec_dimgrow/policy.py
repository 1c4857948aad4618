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
    is removed (shrink: the lowest-gate slot, or the last one under the "paper" preset).
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
    costs: Sequence[int] | None = None,
    budget: int | None = None,
) -> tuple[PolicyState, list[DimChange]]:
    """Apply the DimGrow rule once to every table.

    Args:
        gates: importance per table and slot (at least ``dims[t]`` values per table).
        state: current dims and counters (not modified).
        config: thresholds, and the preset's ``max_total_dim`` and shrink-slot choice.
        d_max: per-table cap (defaults to ``config.d_max`` for all).
        costs: bytes one logical dim of each table costs (rows x bytes per value); needed
            with ``budget``, and what the preset's ``grow_price_exponent`` prices (without them every
            table gets ``grow_threshold``).
        budget: most bytes the logical dims may take (``None``: no byte cap). Growths are
            then admitted by :func:`admit_growth`.

    Returns:
        The new state and the list of changes (shrinks first, then growths; table order
        within each kind unless the budget reorders growths). A table changes by at most
        one slot per check; it never shrinks below 1 (dropping a field is decided at
        export, from the final gates, as the reference does).
    """
    if len(gates) != len(state.dims):
        raise ValueError(f"decide: {len(gates)} gate rows for {len(state.dims)} tables")
    caps = list(d_max) if d_max is not None else [config.d_max] * len(state.dims)
    rule = config.rule
    bars = grow_bars(state.dims, costs, config)
    new = state.copy()
    shrinks: list[DimChange] = []
    candidates: list[int] = []
    rows: list[list[float]] = []
    for t, row in enumerate(gates):
        d = new.dims[t]
        active = [float(v) for v in row[:d]]
        if len(active) != d:
            raise ValueError(f"decide: table {t} has dim {d} but only {len(active)} gate values")
        rows.append(active)
        new.up[t] = new.up[t] + 1 if all(v > bars[t] for v in active) else 0
        new.down[t] = new.down[t] + 1 if min(active) < config.shrink_threshold else 0
        if new.up[t] >= 1 and d < caps[t]:
            candidates.append(t)
        elif new.down[t] >= 1 and d > 1:
            if rule.shrink_slot == "lowest":
                slot = min(range(d), key=lambda k: (active[k], -k))
            else:
                slot = d - 1
            shrinks.append(DimChange(t, "shrink", slot, d, d - 1))
    for ch in shrinks:
        _set_dim(new, ch.table, ch.new_dim)
    if budget is None:
        grown = []
        total = sum(new.dims)
        for t in candidates:
            if total < rule.max_total_dim:
                grown.append(t)
                total += 1
        released: list[DimChange] = []
    else:
        if costs is None or len(costs) != len(new.dims):
            raise ValueError("decide: a budget needs one byte cost per table")
        grown, released = admit_growth(
            rows,
            new.dims,
            candidates,
            costs,
            budget,
            config.final_threshold,
            rule.max_total_dim,
            frozen=[ch.table for ch in shrinks],
        )
    for ch in released:
        _set_dim(new, ch.table, ch.new_dim)
    growths = []
    for t in grown:
        growths.append(DimChange(t, "grow", new.dims[t], new.dims[t], new.dims[t] + 1))
        _set_dim(new, t, new.dims[t] + 1)
    return new, [*shrinks, *released, *growths]


def grow_bars(dims: Sequence[int], costs: Sequence[int] | None, config: DimGrowConfig) -> list[float]:
    """Each table's growth bar (see ``SearchRule.grow_price_exponent``).

    The bar's height above the export threshold scales with the table's price relative to
    the mean active slot (the normalisation of the bytes penalty), and never exceeds
    ``grow_threshold``: a table cheaper than the mean slot needs less evidence to grow, a
    dearer one keeps the paper's bar. With exponent 0, or without ``costs`` (a caller that
    prices nothing, e.g. a unit test of the rule), every table gets ``grow_threshold``.
    """
    gamma = config.rule.grow_price_exponent
    if gamma == 0 or costs is None:
        return [config.grow_threshold] * len(dims)
    if len(costs) != len(dims):
        raise ValueError(f"decide: {len(costs)} byte costs for {len(dims)} tables")
    mean = sum(c * d for c, d in zip(costs, dims)) / max(1, sum(dims))
    base, rise = config.final_threshold, config.grow_threshold - config.final_threshold
    return [base + rise * min(1.0, c / mean) ** gamma for c in costs]


def _set_dim(state: PolicyState, table: int, dim: int) -> None:
    state.dims[table] = dim
    state.up[table] = 0
    state.down[table] = 0


def admit_growth(
    gates: Sequence[Sequence[float]],
    dims: Sequence[int],
    candidates: Sequence[int],
    costs: Sequence[int],
    budget: int,
    release_below: float,
    max_total_dim: int | None = None,
    frozen: Sequence[int] = (),
) -> tuple[list[int], list[DimChange]]:
    """Which growth candidates a byte budget admits, and which slots make room for them.

    Candidates are served in order of importance per byte: the weakest active gate of the
    field (the evidence that its slots all matter, so one more may too) divided by the
    bytes its next dim costs; ties go to the lower table index. A candidate that does not
    fit may take the place of one slot elsewhere whose gate is below ``release_below``
    (the export threshold: a slot the export would drop anyway, so releasing it costs no
    exported quality and cannot ping-pong with a useful slot). The weakest such slot that
    frees enough bytes is released, from a table of dim >= 2 that has no other change in
    this check. Pure and deterministic: every rank derives the same answer from the same
    gathered gates.

    Args:
        gates: active gate values per table (``len(gates[t]) == dims[t]``).
        dims: logical dims after this check's shrinks.
        candidates: tables whose growth the rule would grant without a budget.
        costs: bytes per logical dim of each table.
        budget: most bytes ``sum(costs[t] * dims[t])`` may reach.
        release_below: gate below which a slot may be released for another field.
        max_total_dim: optional cap on the sum of dims, as without a budget.
        frozen: tables that already changed in this check (never released).

    Returns:
        (tables that grow, in the order admitted; shrinks that release room).
    """
    dims = list(dims)
    used = sum(c * d for c, d in zip(costs, dims))
    order = sorted(candidates, key=lambda t: (-min(gates[t]) / costs[t], t))
    busy = {*candidates, *frozen}
    grown: list[int] = []
    released: list[DimChange] = []
    for t in order:
        if max_total_dim is not None and sum(dims) >= max_total_dim:
            break
        if used + costs[t] > budget:
            options = [
                (gates[u][k], -costs[u], u, k)
                for u in range(len(dims))
                if u not in busy and dims[u] >= 2 and used - costs[u] + costs[t] <= budget
                for k in range(dims[u])
                if gates[u][k] < release_below
            ]
            if not options:
                continue
            _, _, u, k = min(options)
            released.append(DimChange(u, "shrink", k, dims[u], dims[u] - 1))
            busy.add(u)
            dims[u] -= 1
            used -= costs[u]
        grown.append(t)
        dims[t] += 1
        used += costs[t]
    return grown, released


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


def final_dims(
    gates: Sequence[Sequence[float]], config: DimGrowConfig, threshold: float | None = None
) -> list[int]:
    """Exported dim per table: the number of slots whose gate exceeds ``final_threshold``.

    ``gates`` holds each table's *active* slots only: a slot that was never active has
    never been trained and says nothing. A table with 0 is dropped (DimGrow doubles as
    feature selection). ``threshold`` overrides ``config.final_threshold``. The one
    found-dims rule: the search recipe, the collection and the handle all count here.
    """
    thr = config.final_threshold if threshold is None else threshold
    return [sum(1 for v in row if float(v) > thr) for row in gates]


def vote_dims(votes: Sequence[Sequence[int]], costs: Sequence[int], budget: int | None = None) -> list[int]:
    """One allocation from several searches' found dims: the per-field median, within budget.

    Why a vote: a search's found dims depend on its seed (which field grows first shapes the
    rest), and the seed-to-seed spread of one field's dim is larger than what the data can
    tell apart. The per-field median of independent searches keeps what they agree on. With
    an even count the lower median is taken (never more bytes than needed to agree). If the
    median exceeds ``budget``, dims are taken back one at a time from the field whose dim
    costs most among those still above their smallest vote (ties: the lower index); the
    per-field minimum is dominated by every vote, so it always fits and the repair ends.
    Pure and deterministic: every rank derives the same dims from the same votes.
    """
    if not votes:
        raise ValueError("vote_dims: no votes")
    n = len(costs)
    if any(len(v) != n for v in votes):
        raise ValueError(f"vote_dims: every vote needs {n} dims, got {[len(v) for v in votes]}")
    columns = [sorted(int(v[t]) for v in votes) for t in range(n)]
    dims = [col[(len(col) - 1) // 2] for col in columns]
    if budget is None:
        return dims
    used = sum(c * d for c, d in zip(costs, dims))
    while used > budget:
        t = max((u for u in range(n) if dims[u] > columns[u][0]), key=lambda u: (costs[u], -u))
        dims[t] -= 1
        used -= costs[t]
    return dims
