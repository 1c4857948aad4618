"""The reference search network the search recipes train: DimGrow tables -> per-field adapter
(sum) -> WideDeep, over fields or over frequency blocks."""

from __future__ import annotations

from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.data.blocks import FieldBlocks
from torchrec_dimgrow.modules.backbone import CTRModel
from torchrec_dimgrow.modules.blocks import BlockDimGrowCollection
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection


def build_search_model(
    data: PreparedData, dg: DimGrowConfig, tc: TrainConfig, blocks: FieldBlocks | None = None
) -> tuple[CTRModel, DimGrowEmbeddingBagCollection]:
    """Reference search network: DimGrow tables -> per-field adapter (sum) -> WideDeep.

    With ``blocks``, one DimGrow table per frequency block behind the id remap
    (:class:`~torchrec_dimgrow.modules.blocks.BlockDimGrowCollection`); the returned
    collection is then the one over the blocks.
    """
    if blocks is not None:
        sparse = BlockDimGrowCollection(blocks, tc.adapter_dim, dg, align="project", device="meta")
        model = CTRModel(sparse, "sum", tc.adapter_dim, hidden=tc.hidden, dropout=tc.dropout)
        return model, sparse.coll
    tables = data.table_configs(tc.adapter_dim)
    coll = DimGrowEmbeddingBagCollection(tables, dg, align="project", device="meta")
    model = CTRModel(coll, "sum", tc.adapter_dim, hidden=tc.hidden, dropout=tc.dropout)
    return model, coll
