"""Data layer: raw Criteo/Avazu/MovieLens/CSV/Parquet -> vocab -> memory-mapped splits.

``prepare`` streams raw files once per pass (never whole into memory), builds the vocab on
train rows only and writes encoded ``.npy`` splits; ``load_prepared`` reopens them
memory-mapped; ``Split.batches`` yields TorchRec ``Batch`` objects with a rank-consistent
global batch plan.
"""

from torchrec_dimgrow.data.columns import MISSING
from torchrec_dimgrow.data.prepare import FORMATS, prepare
from torchrec_dimgrow.data.split import Split
from torchrec_dimgrow.data.store import PreparedData, load_prepared, load_vocab, vocab_path
from torchrec_dimgrow.errors import DataError

__all__ = [
    "FORMATS",
    "MISSING",
    "DataError",
    "PreparedData",
    "Split",
    "load_prepared",
    "load_vocab",
    "prepare",
    "vocab_path",
]
