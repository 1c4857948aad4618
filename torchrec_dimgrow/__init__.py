"""torchrec-dimgrow: DimGrow embedding-dimension search as a TorchRec plugin.

The public API, importable from here (PEFT-style: one entry point per job):

* :class:`DimGrowEmbeddingBagCollection` + :class:`DimGrowConfig`: the module and its knobs;
* :class:`DimGrowController`: the whole DimGrow step of a training loop (gate step, check,
  re-plan), sharded or not;
* :func:`swap_in` / :func:`export`: put DimGrow collections into an existing TorchRec model
  (e.g. DLRM) and take a plain model at the found dims back out.
"""

from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
from torchrec_dimgrow.controller import CheckReport, DimGrowController
from torchrec_dimgrow.modules.collection import ChangeReport, DimGrowEmbeddingBagCollection
from torchrec_dimgrow.policy import DimChange, PolicyState, decide
from torchrec_dimgrow.swap import DimGrowHandle, export, swap_in

__version__ = "0.1.0"

__all__ = [
    "ChangeReport",
    "CheckReport",
    "DimChange",
    "DimGrowConfig",
    "DimGrowController",
    "DimGrowEmbeddingBagCollection",
    "DimGrowHandle",
    "PolicyState",
    "TrainConfig",
    "decide",
    "export",
    "swap_in",
]
