"""The mean gate of every active slot over a selection window, for the exported dims.

Rank-local bookkeeping on the host (every rank sees the same gates), kept beside the policy
whose :class:`~torchrec_dimgrow.policy.DimChange`s it follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from torchrec_dimgrow.policy import DimChange


class SlotGateMean:
    """Mean gate of every active slot over a selection window (e.g. the current epoch).

    The exported dims threshold the gates once. Read at a single step, a gate near the
    threshold flips with the noise of its last few validation batches, so two searches
    that learned the same thing can export different dims. Averaging each slot over the
    window removes that noise without changing what the slot learned. Slots are averaged
    only over the steps in which they were active, and :meth:`apply` mirrors the
    collection's slot moves (a shrink of a middle slot moves the last slot into its place),
    so every average always belongs to the slot that now holds that index.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.count = torch.zeros(shape, dtype=torch.int64)

    def add(self, gates: torch.Tensor, dims: Sequence[int]) -> None:
        """Add one step's gate table; only the first ``dims[t]`` slots of table t count."""
        if gates.shape != self.total.shape or len(dims) != gates.shape[0]:
            raise ValueError(
                f"SlotGateMean: expected gates {tuple(self.total.shape)} and {gates.shape[0]} dims, "
                f"got gates {tuple(gates.shape)} and {len(dims)} dims"
            )
        slots = torch.arange(gates.shape[1])
        active = slots[None, :] < torch.as_tensor(list(dims), dtype=torch.int64)[:, None]
        self.total += torch.where(active, gates.detach().to("cpu", torch.float64), 0.0)
        self.count += active.to(torch.int64)

    def apply(self, changes: Sequence[DimChange]) -> None:
        """Follow grow/shrink changes: a removed slot's average goes, a moved slot's travels."""
        for ch in changes:
            if ch.kind != "shrink":
                continue  # a grown slot starts with no steps: it is averaged from now on
            last = ch.old_dim - 1
            if ch.slot != last:
                self.total[ch.table, ch.slot] = self.total[ch.table, last]
                self.count[ch.table, ch.slot] = self.count[ch.table, last]
            self.total[ch.table, last] = 0.0
            self.count[ch.table, last] = 0

    def mean(self, current: torch.Tensor) -> torch.Tensor:
        """Per-slot window mean; ``current`` fills slots with no recorded step."""
        seen = self.count > 0
        avg = self.total / self.count.clamp(min=1)
        return torch.where(seen, avg, current.detach().to("cpu", torch.float64)).to(torch.float32)

    def reset(self) -> None:
        self.total.zero_()
        self.count.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total.copy_(state["total"])
        self.count.copy_(state["count"])
