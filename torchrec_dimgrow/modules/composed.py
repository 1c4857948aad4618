"""Base for EBC subclasses that keep their tables in a plain ``EmbeddingBagCollection`` child.

The pattern of TorchRec's ``FeatureProcessedEmbeddingBagCollection``: the tables live in a
stock EBC child named ``ebc`` (so DMP shards it with the stock sharder), and a dense module
post-processes its ``KeyedTensor``. This base implements the EBC facade once (weighted flag,
device, table access, parameter reset) for every such collection in this package.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection


class ComposedEmbeddingBagCollection(EmbeddingBagCollection):
    """An EBC whose tables are the stock EBC child ``self.ebc`` (set by the subclass)."""

    ebc: nn.Module

    def _init_facade(self, is_weighted: bool, device: torch.device | None) -> None:
        """Call right after ``nn.Module.__init__`` (the stock EBC constructor is skipped on purpose)."""
        self._is_weighted = is_weighted
        self._device = device or torch.device("cpu")

    @property
    def embedding_bags(self) -> nn.ModuleDict:  # type: ignore[override]
        """The physical tables (only while unsharded, as for a plain EBC)."""
        return self.ebc.embedding_bags  # type: ignore[return-value]

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        return self._device

    def reset_parameters(self) -> None:
        if isinstance(self.ebc, EmbeddingBagCollection):
            self.ebc.reset_parameters()
