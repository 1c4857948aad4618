"""What a stream carries from step to step and into its checkpoints: the resumable counters
(:class:`StreamState`), the training noise drawn over the global batch (:class:`GlobalShuffle`)
and the progressive-validation window (:class:`Window`)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from torchrec_dimgrow.modules.shuffle_gate import column_shuffle
from torchrec_dimgrow.training import auc_logloss, gather_1d


@dataclass
class StreamState:
    """What a resumed stream needs besides tensors (saved in each checkpoint's run state)."""

    rows_consumed: int = 0
    versions: int = 0  # number of the last version published
    published_steps: list[int] = field(default_factory=list)
    last_change_step: int = -(10**9)
    pending: bool = False
    scored_rows: int = 0
    scored_logloss_sum: float = 0.0  # progressive log loss over the whole stream so far
    publish_seconds: float = 0.0  # wall time spent publishing (all versions, this rank)


class GlobalShuffle:
    """Training noise of the summed path: one column shuffle of the *global* batch.

    Every rank all-gathers the active columns of its rows (detached; B x C, small), shuffles
    the global batch with a generator that is identical on every rank and takes its own
    rows' share. A 1-rank run with the global batch size draws the very same noise, so
    the gate gradients (hence the decisions) do not depend on the world size.
    """

    def __init__(self, seed: int, rank: int, world: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.rank, self.world = rank, world

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().contiguous()
        if self.world > 1:
            parts = [torch.empty_like(xs) for _ in range(self.world)]
            dist.all_gather(parts, xs)
            full = torch.cat(parts)
        else:
            full = xs
        noise = column_shuffle(full.cpu(), self.gen).to(xs.device)
        rows = xs.shape[0]
        return noise[self.rank * rows : (self.rank + 1) * rows].clone()

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["rng"])


class Window:
    """This rank's last scored (logits, labels) batches; the rows of ``steps`` global batches."""

    def __init__(self, steps: int) -> None:
        self.items: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=max(1, steps))

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.items.append((logits.detach().float().cpu(), labels.detach().float().cpu()))

    def metrics(self) -> dict[str, float]:
        """AUC / log loss / rows over every rank's window (collective)."""
        if self.items:
            s = torch.cat([a for a, _ in self.items])
            y = torch.cat([b for _, b in self.items])
        else:
            s = y = torch.zeros(0)
        s, y = gather_1d(s), gather_1d(y)
        if s.numel() == 0:
            return {"auc": float("nan"), "logloss": float("nan"), "rows": 0}
        m = auc_logloss(s, y)
        return {"auc": m["auc"], "logloss": m["logloss"], "rows": int(s.numel())}

    def state_dict(self) -> dict[str, Any]:
        return {"items": list(self.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items.clear()
        self.items.extend(state["items"])
