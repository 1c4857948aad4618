"""Full / uniform dims: every field at ``d_max``, no search.

This is the model every SuperNet at least pays for (OptEmbed and SSEDS train exactly this
table set). With ``dims`` given it is the *physical floor* of the memory benchmark: the cost
of training the final-dims model directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_dimgrow.baselines.base import (
    BaselineConfig,
    BaselineSearch,
    SparseSuperNet,
    Trained,
    table_config,
)
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.modules.backbone import CTRModel


@dataclass
class UniformConfig(BaselineConfig):
    """``dims``: per-field widths (fields at 0 are dropped); ``None`` means ``d_max`` everywhere.
    ``train``: train the model during :meth:`search` (the memory benchmark needs the cost of
    training it; the quality benchmark does not, the shared retrain trains it)."""

    dims: dict[str, int] | None = None
    train: bool = False


class SlicePost(nn.Module):
    """Keeps the first ``dims[f]`` of each field's stored columns (identity when none is padded)."""

    def __init__(self, fields: Sequence[str], dims: Sequence[int], stored: Sequence[int]) -> None:
        super().__init__()
        self.fields = list(fields)
        self.dims = list(dims)
        self.stored = list(stored)
        self.identity = self.dims == self.stored

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        if self.identity:
            return pooled
        by_name = pooled.to_dict()
        parts = [by_name[f][:, :d] for f, d in zip(self.fields, self.dims)]
        return KeyedTensor(keys=self.fields, length_per_key=self.dims, values=torch.cat(parts, dim=1))


class UniformSearch(BaselineSearch):
    name = "uniform"
    config_cls = UniformConfig
    config: UniformConfig

    def dims_for(self, fields: Sequence[str]) -> dict[str, int]:
        if self.config.dims is None:
            return dict.fromkeys(fields, self.config.d_max)
        missing = [f for f in fields if f not in self.config.dims]
        if missing:
            raise ValueError(f"UniformConfig.dims misses fields {missing}")
        return {f: int(self.config.dims[f]) for f in fields}

    def build_sparse(
        self, fields: Sequence[str], vocab: dict[str, int], device: torch.device | None = None
    ) -> SparseSuperNet:
        dims = self.dims_for(fields)
        kept = [f for f in fields if dims[f] > 0]
        if not kept:
            raise ValueError("UniformSearch: every field has dim 0")
        stored = [self.config.stored(dims[f]) for f in kept]
        tables = [table_config(f, f, vocab[f], s, self.config.init_std) for f, s in zip(kept, stored)]
        post = SlicePost(kept, [dims[f] for f in kept], stored)
        return SparseSuperNet(EmbeddingBagCollection(tables=tables, device=device), post)

    def output_width(self, sparse: SparseSuperNet) -> int:
        raise NotImplementedError("uniform widths may differ per field; build_model sums them")

    def build_model(self, sparse: SparseSuperNet, fields: Sequence[str], train_cfg: TrainConfig) -> CTRModel:
        return CTRModel(
            sparse,
            combine="concat",
            adapter_dim=train_cfg.adapter_dim,
            in_dim=sum(sparse.post.dims),
            hidden=tuple(train_cfg.hidden),
            dropout=train_cfg.dropout,
        )

    def train(
        self,
        trained: Trained,
        data: PreparedData,
        train_cfg: TrainConfig,
        step_hook: Callable[[int], None] | None = None,
    ) -> tuple[list[dict[str, float]], int]:
        """Trains only with ``config.train`` (no search happens either way)."""
        if self.config.train:
            return super().train(trained, data, train_cfg, step_hook)
        return [], 0

    def export_dims(self, trained: Trained, data: PreparedData, train_cfg: TrainConfig) -> dict[str, int]:
        return self.dims_for(list(data.fields))
