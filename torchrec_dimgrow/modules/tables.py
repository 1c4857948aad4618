"""Small facts about an embedding table, each computed in one place.

* what it costs: :func:`dim_cost` (bytes of one column: rows x bytes per value of the
  table's data type; weights only, no optimizer state), summed over configs at given
  widths by :func:`embedding_bytes`; for one fp32 table per field of prepared data,
  :func:`field_params` counts values and :func:`field_bytes` their bytes;
* how it starts: :func:`normal_init`, the N(0, std) init of the DimGrow reference code
  (its tables, its baselines' tables and the retrained model all use it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

#: Bytes of one fp32 value: every table in this package is fp32.
FP32_BYTES = 4


def dim_cost(table: EmbeddingBagConfig) -> int:
    """Bytes one column of ``table`` costs: rows x bytes per value of its data type."""
    return -(-table.num_embeddings * DATA_TYPE_NUM_BITS[table.data_type] // 8)


def embedding_bytes(tables: Sequence[EmbeddingBagConfig], dims: Mapping[str, int] | None = None) -> int:
    """Bytes of the tables' weights at ``dims`` (default: the configs' own widths)."""
    return sum(dim_cost(t) * (dims[t.name] if dims is not None else t.embedding_dim) for t in tables)


def field_params(vocab: Mapping[str, int], dims: Mapping[str, int]) -> int:
    """Values in one table per field at ``dims`` (sum of vocab x dim; a field missing from
    ``dims`` counts 0): the size the found dims are compared by."""
    return int(sum(int(rows) * int(dims.get(f, 0)) for f, rows in vocab.items()))


def field_bytes(vocab: Mapping[str, int], dims: Mapping[str, int]) -> int:
    """Bytes of one fp32 table per field at ``dims``."""
    return FP32_BYTES * field_params(vocab, dims)


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, std) table init (an ``EmbeddingBagConfig.init_fn``)."""

    def init(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return weight.normal_(0.0, std)

    return init
