"""Where the table weights and their optimizer state live, behind one small interface.

The collection decides *what* changes (a slot moves, a table widens); a ``TableStore``
does it to the storage. :class:`LocalTableStore` works on an unsharded EBC and any torch
optimizer; the sharded store (:mod:`torchrec_dimgrow.distributed.table_store`) does the same to
a ``DistributedModelParallel`` and its fused optimizer.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


@dataclass
class ResizeResult:
    seconds: float
    bytes_moved: int


class TableStore(Protocol):
    def move_column(self, table: str, src: int, dst: int) -> None:
        """Copy column ``src`` of ``table`` (weights and optimizer state) onto ``dst``."""

    def reset_column(self, table: str, col: int, std: float) -> None:
        """Re-draw column ``col`` from N(0, std) and zero its optimizer state."""

    def resize(self, capacities: dict[str, int], std: float) -> ResizeResult:
        """Give the named tables new widths, keeping the overlapping columns bit-exactly."""


def _column_states(state: dict, weight: torch.Tensor) -> list[torch.Tensor]:
    """Optimizer state tensors laid out like the weight (Adam moments, Adagrad sums)."""
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == weight.shape]


class LocalTableStore:
    """Store for an unsharded :class:`torchrec.EmbeddingBagCollection`.

    ``optimizers`` are the torch optimizers that hold the table weights (any mix of
    Adam, Adagrad, SGD...): their per-element state follows every column move, and on a
    resize the new parameter replaces the old one in the param group with its state
    sliced or zero-padded, so training resumes with the moments of the kept columns.
    """

    def __init__(self, ebc: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.ebc = ebc
        self.optimizers = list(optimizers)

    def _bag(self, table: str) -> nn.EmbeddingBag:
        try:
            return self.ebc.embedding_bags[table]  # type: ignore[index,return-value]
        except KeyError as exc:
            raise KeyError(f"LocalTableStore: no table named {table!r}") from exc

    def _states(self, weight: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for opt in self.optimizers:
            out += _column_states(opt.state.get(weight, {}), weight)
        return out

    @torch.no_grad()
    def move_column(self, table: str, src: int, dst: int) -> None:
        w = self._bag(table).weight
        for t in [w, *self._states(w)]:
            t[:, dst] = t[:, src]

    @torch.no_grad()
    def reset_column(self, table: str, col: int, std: float) -> None:
        w = self._bag(table).weight
        w[:, col].normal_(0.0, std)
        for s in self._states(w):
            s[:, col] = 0

    @torch.no_grad()
    def resize(self, capacities: dict[str, int], std: float) -> ResizeResult:
        start = time.perf_counter()
        moved = 0
        for table, width in capacities.items():
            bag = self._bag(table)
            old = bag.weight
            keep = min(old.shape[1], width)
            new = torch.empty(old.shape[0], width, dtype=old.dtype, device=old.device)
            new.normal_(0.0, std)
            new[:, :keep] = old[:, :keep]
            moved += old[:, :keep].numel() * old.element_size()
            param = nn.Parameter(new, requires_grad=old.requires_grad)
            for opt in self.optimizers:
                _swap_param(opt, old, param, keep)
            bag.weight = param
            bag.embedding_dim = width
        return ResizeResult(time.perf_counter() - start, moved)


def _swap_param(opt: torch.optim.Optimizer, old: torch.Tensor, new: nn.Parameter, keep: int) -> None:
    """Replace ``old`` by ``new`` in ``opt``, slicing/padding its column-shaped state."""
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    if old in opt.state:
        state = opt.state.pop(old)
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor) and value.shape == old.shape:
                grown = torch.zeros_like(new)
                grown[:, :keep] = value[:, :keep]
                state[key] = grown
        opt.state[new] = state
