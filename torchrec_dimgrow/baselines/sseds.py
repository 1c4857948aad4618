"""SSEDS (Qu et al., SIGIR'22): single-shot dimension pruning by mask saliency.

Train the full ``d_max`` model with an all-ones mask multiplied into every (field, dim)
column; the mask is never trained. Then, over validation batches, the saliency of column
(f, k) is the mean of ``|dL/dmask[f, k]|`` (how much the loss would move if that column were
removed, to first order). Columns are ranked globally and the top ones are kept under a
budget; a field's found dim is the number of its kept columns (0 drops the field).

Budget: ``keep_ratio`` of all F x d_max columns (the DimGrow authors' re-implementation keeps
10%, prune ratio 0.9), or, when ``param_budget`` is set, the most salient columns whose
``Σ vocab_f`` stays within that many embedding parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_dimgrow.baselines.base import (
    BaselineConfig,
    BaselineSearch,
    Trained,
)
from torchrec_dimgrow.baselines.supernet import (
    SparseSuperNet,
    all_reduce_mean,
    field_blocks,
    keyed,
)
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.training import bce


@dataclass
class SSEDSConfig(BaselineConfig):
    """``keep_ratio``: fraction of (field, dim) columns kept. ``param_budget``: if set, keep
    columns in saliency order while Σ vocab stays within it (overrides ``keep_ratio``).
    ``saliency_batch_size``: validation batch size of the saliency pass (reference: 4096).
    ``max_saliency_batches``: cap on the number of validation batches (``None``: all)."""

    keep_ratio: float = 0.1
    param_budget: int | None = None
    saliency_batch_size: int = 4096
    max_saliency_batches: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"SSEDSConfig: keep_ratio must be in (0, 1], got {self.keep_ratio}")


class MaskPost(nn.Module):
    """Multiplies a (F, d_max) mask into the lookups; output ``d_max`` columns per field."""

    def __init__(self, fields: Sequence[str], d_max: int, stored: int | None = None) -> None:
        super().__init__()
        self.fields = list(fields)
        self.d_max = d_max
        self.stored = stored or d_max
        self.mask = nn.Parameter(torch.ones(len(self.fields), d_max), requires_grad=False)

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        x = field_blocks(pooled, self.fields, self.d_max, self.stored)
        return keyed(self.fields, self.d_max, x * self.mask)


def mask_saliency(
    model: nn.Module,
    mask: nn.Parameter,
    batches: Iterable[Batch],
    limit: int | None = None,
    device: torch.device | None = None,
    world_size: int = 1,
) -> torch.Tensor:
    """Mean over batches of ``|dL/dmask|`` (model in eval mode: no dropout noise).

    On N ranks each rank sums over its batches and the sums and counts are all-reduced.
    """
    was_training = model.training
    model.eval()
    mask.requires_grad_(True)
    total = torch.zeros_like(mask)
    count = torch.zeros(())
    try:
        for batch in batches:
            if device is not None:
                batch = batch.to(device)
            (grad,) = torch.autograd.grad(bce(model(batch.sparse_features), batch.labels), [mask])
            total += grad.abs()
            count += 1
            if limit is not None and count >= limit:
                break
    finally:
        mask.requires_grad_(False)
        model.train(was_training)
    total = all_reduce_mean(total, world_size) * world_size
    count = all_reduce_mean(count, world_size) * world_size
    if float(count) == 0:
        raise ValueError("mask_saliency: no validation batches")
    return total / count


def keep_top(
    saliency: torch.Tensor, fields: Sequence[str], vocab: dict[str, int], cfg: SSEDSConfig
) -> dict[str, int]:
    """Globally top-ranked columns under the budget -> kept-column count per field."""
    n_fields, width = saliency.shape
    order = saliency.reshape(-1).argsort(descending=True).tolist()
    kept = torch.zeros(n_fields, dtype=torch.int64)
    if cfg.param_budget is None:
        for idx in order[: max(1, math.ceil(cfg.keep_ratio * n_fields * width))]:
            kept[idx // width] += 1
    else:
        used = 0
        for idx in order:
            cost = vocab[fields[idx // width]]
            if used + cost <= cfg.param_budget:
                kept[idx // width] += 1
                used += cost
    return {f: int(k) for f, k in zip(fields, kept)}


class SSEDSSearch(BaselineSearch):
    name = "sseds"
    config_cls = SSEDSConfig
    config: SSEDSConfig

    def __init__(self, config: SSEDSConfig | None = None) -> None:
        super().__init__(config)
        self._saliency: torch.Tensor | None = None

    def build_post(self, fields: Sequence[str], vocab: dict[str, int]) -> nn.Module:
        return MaskPost(fields, self.config.d_max, self.config.stored(self.config.d_max))

    def frozen_parameters(self, sparse: SparseSuperNet) -> list[nn.Parameter]:
        return [sparse.post.mask]

    def saliency(self, trained: Trained, data: PreparedData) -> torch.Tensor:
        """Saliency of every (field, dim) column; the forward bypasses DDP (no full backward)."""
        cfg, p = self.config, trained.placement
        batches = data.val.batches(cfg.saliency_batch_size, rank=p.rank, world_size=p.world_size)
        mask = trained.sparse.post.mask
        return mask_saliency(trained.model, mask, batches, cfg.max_saliency_batches, p.device, p.world_size)

    def export_dims(self, trained: Trained, data: PreparedData, train_cfg: TrainConfig) -> dict[str, int]:
        self._saliency = self.saliency(trained, data)
        return keep_top(self._saliency, list(data.fields), data.vocab(), self.config)

    def extra_info(self, trained: Trained) -> dict[str, Any]:
        if self._saliency is None:
            return {}
        fields = trained.sparse.post.fields
        return {"saliency": {f: [float(v) for v in row] for f, row in zip(fields, self._saliency)}}
