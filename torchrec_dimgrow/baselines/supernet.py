"""What the SuperNet baselines share: the module pattern and its table helpers.

Every baseline is ``post(ebc(features))`` (:class:`SparseSuperNet`): a plain TorchRec
``EmbeddingBagCollection`` (sharded by the stock sharder under ``DistributedModelParallel``)
and a dense module holding what the method adds. The tables are one ``width``-wide table
per field (:func:`field_tables`), stored at a multiple of the fused kernel's block
(:func:`round_up`) and read back as (batch, field, width) blocks (:func:`field_blocks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_dimgrow.modules.tables import embedding_bytes, normal_init


class SparseSuperNet(nn.Module):
    """``post(ebc(features))``: a plain EBC (sharded by the stock sharder) + a dense module.

    ``table_bytes`` is fixed at construction from the configs (fp32), so it stays right after
    DMP has replaced ``ebc`` by its sharded version.
    """

    post: Any  # the method's dense module (typed loosely: each method has its own)

    def __init__(self, ebc: EmbeddingBagCollection, post: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc
        self.post = post
        self.table_configs = list(ebc.embedding_bag_configs())
        self.table_bytes = embedding_bytes(self.table_configs)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.post(self.ebc(features))


def round_up(width: int, block: int) -> int:
    return max(block, -(-width // block) * block)


def table_config(name: str, feature: str, rows: int, dim: int, std: float) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[feature], init_fn=normal_init(std)
    )


def field_tables(
    fields: Sequence[str], vocab: dict[str, int], width: int, std: float
) -> list[EmbeddingBagConfig]:
    """One ``width``-wide table per field, named after it: the SuperNets' shared storage."""
    return [table_config(f, f, vocab[f], width, std) for f in fields]


def field_blocks(
    pooled: KeyedTensor, fields: Sequence[str], width: int, stored: int | None = None
) -> torch.Tensor:
    """Pooled embeddings as (B, F, width), fields in ``fields`` order.

    Each field is stored ``stored`` (default ``width``) columns wide; only the first
    ``width`` are returned. A plain EBC (sharded or not) returns its keys in table order,
    which is ``fields`` order for the one-table-per-field baselines; the dict fallback
    covers any other order.
    """
    stored = stored or width
    values = pooled.values()
    if list(pooled.keys()) == list(fields):
        x = values.view(values.shape[0], len(fields), stored)
    else:
        by_name = pooled.to_dict()
        x = torch.stack([by_name[f] for f in fields], dim=1)
    return x if stored == width else x[:, :, :width]


def keyed(fields: Sequence[str], width: int, x: torch.Tensor) -> KeyedTensor:
    """(B, F, width) -> KeyedTensor with one ``width``-wide key per field."""
    return KeyedTensor(
        keys=list(fields), length_per_key=[width] * len(fields), values=x.reshape(x.shape[0], -1)
    )


def all_reduce_mean(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Average ``t`` over ranks (identity on one rank): keeps architecture state identical."""
    if world_size > 1:
        dist.all_reduce(t)
        t = t / world_size
    return t
