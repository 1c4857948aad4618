"""torchrec-dimgrow: DimGrow embedding-dimension search as a TorchRec plugin."""

from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
from torchrec_dimgrow.modules.collection import ChangeReport, DimGrowEmbeddingBagCollection
from torchrec_dimgrow.policy import DimChange, PolicyState, decide

__version__ = "0.1.0"

__all__ = [
    "ChangeReport",
    "DimChange",
    "DimGrowConfig",
    "DimGrowEmbeddingBagCollection",
    "PolicyState",
    "TrainConfig",
    "decide",
]
