"""Gate importance combined across ranks, and the agreement check on decisions.

Each rank accumulates importance statistics from its own batches (the gate values it
trained with over the last check window). :func:`gather_importance` all-gathers the
per-rank tables and returns their mean on every rank, so every rank feeds the same table
to the (pure) policy and derives the same decision. With DDP-synchronised gates the
per-rank tables coincide; the all-gather keeps that true by construction for setups where
they may not (e.g. gates trained on rank-local validation data without DDP).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist

from torchrec_dimgrow.errors import RankDivergenceError


class ImportanceAccumulator:
    """Running mean of the gate table over the current check window (rank-local)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.total = torch.zeros(shape, dtype=torch.float64)
        self.count = 0

    def add(self, gates: torch.Tensor) -> None:
        self.total += gates.detach().to("cpu", torch.float64)
        self.count += 1

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("ImportanceAccumulator: no gate values recorded in this window")
        return (self.total / self.count).to(torch.float32)

    def reset(self) -> None:
        self.total.zero_()
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.clone(), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total.copy_(state["total"])
        self.count = int(state["count"])


def gather_importance(local: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """All-gather each rank's (tables x slots) importance table; return the global mean.

    Every rank passes a table of the same shape (gloo's all_gather rejects uneven
    sizes); the result is identical on all ranks because each reduces the same gathered
    list in the same order.
    """
    if not dist.is_available() or not dist.is_initialized():
        return local.clone()
    world = dist.get_world_size(group)
    flat = local.detach().to(torch.float32).contiguous()
    backend = dist.get_backend(group)
    if backend == "nccl":
        flat = flat.cuda()
    out = torch.empty(world * flat.numel(), dtype=flat.dtype, device=flat.device)
    dist.all_gather_into_tensor(out, flat.view(-1), group=group)
    return out.view(world, *flat.shape).mean(dim=0).cpu()


def dims_digest(dims: list[int]) -> int:
    """Stable 63-bit digest of a dims vector (Python's hash() is salted per process)."""
    raw = hashlib.sha256(",".join(map(str, dims)).encode()).digest()
    return int.from_bytes(raw[:8], "little") >> 1


def check_agreement(dims: list[int], group: dist.ProcessGroup | None = None, what: str = "dims") -> None:
    """All-gather a digest of ``dims``; raise on every rank if any rank disagrees."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    mine = torch.tensor([dims_digest(dims)], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        mine = mine.cuda()
    out = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=mine.device)
    dist.all_gather_into_tensor(out, mine, group=group)
    digests = out.tolist()
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RankDivergenceError(
            f"{what} diverged across ranks: rank {dist.get_rank(group)} has {dims}; "
            f"ranks {bad} disagree with rank 0 (digests {digests})"
        )
