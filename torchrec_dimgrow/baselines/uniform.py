"""Full / uniform dims: every field at ``d_max``, no search.

This is the model every SuperNet at least pays for (OptEmbed and SSEDS train exactly this
table set). With ``dims`` given it is the *physical floor* of the memory benchmark: the cost
of training the final-dims model directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_dimgrow.baselines.base import (
    BaselineConfig,
    BaselineSearch,
    Trained,
)
from torchrec_dimgrow.baselines.supernet import (
    SparseSuperNet,
    table_config,
)
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.modules.backbone import Combine


@dataclass
class UniformConfig(BaselineConfig):
    """``dims``: per-field widths (fields at 0 are dropped); ``None`` means ``d_max`` everywhere.
    ``train``: train the model during the run (the memory benchmark needs the cost of
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

    def _kept(self, fields: Sequence[str]) -> tuple[list[str], list[int], list[int]]:
        """Fields with a dim > 0, their dims and their stored widths."""
        dims = self.dims_for(fields)
        kept = [f for f in fields if dims[f] > 0]
        if not kept:
            raise ValueError("UniformSearch: every field has dim 0")
        return kept, [dims[f] for f in kept], [self.config.stored(dims[f]) for f in kept]

    def tables(self, fields: Sequence[str], vocab: dict[str, int]) -> list[EmbeddingBagConfig]:
        kept, _, stored = self._kept(fields)
        return [table_config(f, f, vocab[f], s, self.config.init_std) for f, s in zip(kept, stored)]

    def build_post(self, fields: Sequence[str], vocab: dict[str, int]) -> nn.Module:
        return SlicePost(*self._kept(fields))

    def head_input(
        self, sparse: SparseSuperNet, fields: Sequence[str], train_cfg: TrainConfig
    ) -> tuple[Combine, int | None]:
        """Widths may differ per field: the backbone takes their concatenation."""
        return "concat", sum(sparse.post.dims)

    def trains(self) -> bool:
        """Only with ``config.train`` (no search happens either way)."""
        return self.config.train

    def export_dims(self, trained: Trained, data: PreparedData, train_cfg: TrainConfig) -> dict[str, int]:
        return self.dims_for(list(data.fields))
