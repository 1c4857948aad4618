"""The CTR backbone shared by the search, every baseline and the retrain.

WideDeep exactly as the DimGrow reference uses it: an MLP (Linear -> BatchNorm -> ReLU ->
Dropout per hidden layer, then Linear to 1) plus a linear "wide" part, summed into one
logit. ``CTRModel`` puts any KJT -> KeyedTensor module in front of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class WideDeep(nn.Module):
    def __init__(self, in_dim: int, hidden: Sequence[int] = (32, 16), dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_dim
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
            prev = h
        layers.append(nn.Linear(prev, 1))
        self.deep = nn.Sequential(*layers)
        self.wide = nn.Linear(in_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (self.deep(h) + self.wide(h)).squeeze(-1)


Combine = Literal["sum", "concat"]


class CTRModel(nn.Module):
    """``sparse`` (KJT -> KeyedTensor) followed by an adapter and :class:`WideDeep`.

    ``combine="sum"``: every feature arrives at ``adapter_dim`` already (a DimGrow
    collection with ``align="project"``) and the features are summed; this is exactly the
    reference's shared adapter ``concat(x_f) @ concat(W_f)`` and needs no resizing as
    dims change. ``combine="concat"``: the KeyedTensor values (``in_dim`` wide) go through
    ``Linear(in_dim, adapter_dim)`` with bias, the reference's retrain model.
    """

    def __init__(
        self,
        sparse: nn.Module,
        combine: Combine,
        adapter_dim: int = 64,
        in_dim: int | None = None,
        hidden: Sequence[int] = (32, 16),
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.sparse = sparse
        self.combine: Combine = combine
        self.adapter_dim = adapter_dim
        if combine == "concat":
            if not in_dim:
                raise ValueError("CTRModel: combine='concat' needs in_dim (sum of feature widths) > 0")
            self.adapter: nn.Module = nn.Linear(in_dim, adapter_dim)
        elif combine == "sum":
            self.adapter = nn.Identity()
        else:
            raise ValueError(f"CTRModel: unknown combine {combine!r}")
        self.head = WideDeep(adapter_dim, hidden, dropout)
        # A sparse module that can sum its aligned features itself (a DimGrow collection:
        # one matmul over the concatenated active columns) skips the B x F x adapter_dim
        # per-feature outputs that ``embed`` would sum.
        self._sums_inside = combine == "sum" and callable(getattr(sparse, "forward_summed", None))

    def embed(self, pooled: KeyedTensor) -> torch.Tensor:
        values = pooled.values()
        if self.combine == "sum":
            return values.view(values.shape[0], -1, self.adapter_dim).sum(dim=1)
        return self.adapter(values)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Logits, one per row of ``features``."""
        if self._sums_inside:
            return self.head(self.sparse.forward_summed(features))  # type: ignore[operator]
        return self.head(self.embed(self.sparse(features)))
