"""``FeatureGroups``: pooled features summed into groups (a field's frequency blocks into the field).

A field cut into frequency blocks is looked up as one table per block, and a consumer wants
one feature per field: the sum of its blocks' pooled outputs. :class:`FeatureGroups` holds
which group every feature goes to and does that sum on a ``KeyedTensor`` (:meth:`sum`).
:class:`~torchrec_dimgrow.modules.post_process.DimGrowPostProcess` also takes it into its
training forward, where the sum runs inside the batched projection over whole
feature-major slabs, before the one layout copy (no batch x blocks x width output is ever
built or copied).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor


class FeatureGroups(nn.Module):
    """Features summed into groups: feature ``i`` adds into group ``group_of[i]``.

    Every feature of a group must come out at the group's width (``align="pad"`` or
    ``"project"`` in a DimGrow collection; a block at 0 dims contributes zeros there).
    """

    def __init__(self, features: list[str], groups: list[str], group_of: list[int]) -> None:
        super().__init__()
        if len(group_of) != len(features) or not all(0 <= g < len(groups) for g in group_of):
            raise ValueError(
                f"FeatureGroups: need a group in 0..{len(groups) - 1} for each of {len(features)} features, "
                f"got {group_of}"
            )
        self.features = list(features)
        self.groups = list(groups)
        self.group_of = list(group_of)
        self._key: tuple[object, ...] = ()
        self._dest: torch.Tensor | None = None
        self._widths: list[int] = []
        self._index: dict[torch.device, torch.Tensor] = {}

    def index(self, device: torch.device) -> torch.Tensor:
        """``group_of`` as an int64 tensor on ``device`` (cached: no copy per step)."""
        if device not in self._index:
            self._index[device] = torch.tensor(self.group_of, dtype=torch.int64, device=device)
        return self._index[device]

    def _plan(self, pooled: KeyedTensor) -> tuple[torch.Tensor, list[int]]:
        keys, lengths = pooled.keys(), pooled.length_per_key()
        key = (tuple(keys), tuple(lengths), pooled.values().device)
        if self._dest is None or self._key != key:
            if list(keys) != self.features:
                raise KeyError(f"FeatureGroups: expected the features {self.features}, got {keys}")
            widths: list[int] = [-1] * len(self.groups)
            for g, w in zip(self.group_of, lengths):
                if widths[g] not in (-1, w):
                    raise ValueError(
                        f"FeatureGroups: the features of group {self.groups[g]!r} have different widths; "
                        "use align='pad' or 'project'"
                    )
                widths[g] = w
            if len(set(lengths)) == 1:  # one common width: add whole features (B x F x w)
                dest = list(self.group_of)
            else:
                starts = [sum(widths[:g]) for g in range(len(widths))]
                dest = [starts[g] + k for g, w in zip(self.group_of, lengths) for k in range(w)]
            self._dest = torch.tensor(dest, dtype=torch.int64, device=pooled.values().device)
            self._widths, self._key = widths, key
        return self._dest, self._widths

    def sum(self, pooled: KeyedTensor) -> KeyedTensor:
        """Pooled outputs per feature -> one output per group (the sum of its features)."""
        dest, widths = self._plan(pooled)
        x = pooled.values()
        if dest.numel() == len(self.features):
            # Feature by feature (a w-wide slice per index), not column by column: the latter
            # scatters through a batch-sized index, several times slower on a CPU.
            w = widths[0]
            parts = x.reshape(x.shape[0], -1, w)
            out = x.new_zeros(x.shape[0], len(widths), w).index_add(1, dest, parts).view(x.shape[0], -1)
        else:
            out = x.new_zeros(x.shape[0], sum(widths)).index_add(1, dest, x)
        return KeyedTensor(keys=self.groups, length_per_key=widths, values=out)

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        return self.sum(pooled)
