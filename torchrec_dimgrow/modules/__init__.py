from torchrec_dimgrow.modules.collection import ChangeReport, DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.shuffle_gate import ShuffleGate, column_shuffle, shuffle_mix
from torchrec_dimgrow.modules.table_store import LocalTableStore, TableStore

__all__ = [
    "ChangeReport",
    "DimGrowEmbeddingBagCollection",
    "LocalTableStore",
    "ShuffleGate",
    "TableStore",
    "column_shuffle",
    "shuffle_mix",
]
