"""Export-side modules: a stock ``EmbeddingBagCollection`` at mixed per-table dims.

What a DimGrow search hands to the retrain: :class:`MixedDimEmbeddingBagCollection` keeps
the found tables in a plain EBC child (DMP's stock sharder shards it like any EBC) and
presents every feature at its original width through :class:`AlignToWidth`, so a model
that needs one common width (``DLRM``) runs unchanged. :func:`export_collection` builds
either that or, with ``align="raw"``, a bare EBC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_dimgrow.config import AlignMode
from torchrec_dimgrow.modules.composed import ComposedEmbeddingBagCollection


class AlignToWidth(nn.Module):
    """Presents each pooled feature at its configured width: zero-pad, or a learned projection.

    A dense leaf (no sharded module inside), so a pipeline's fx tracer does not enter it.
    Features of dropped tables (dim 0) come out as zeros, which keeps a DLRM's feature
    count (and its interaction layer) unchanged.
    """

    def __init__(
        self,
        feature_names: list[str],
        in_dims: list[int],
        out_dims: list[int],
        align: AlignMode,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if align not in ("pad", "project"):
            raise ValueError(f"AlignToWidth: align must be 'pad' or 'project', got {align!r}")
        for name, d, w in zip(feature_names, in_dims, out_dims):
            if align == "pad" and d > w:
                raise ValueError(
                    f"feature {name!r}: dim {d} does not fit the width {w} (use align='project')"
                )
        self.feature_names, self.in_dims, self.out_dims, self.align = feature_names, in_dims, out_dims, align
        # One (d x w) projection per kept feature, keyed by position; a dropped feature has
        # none (an unused parameter would stall DDP). N(0, 1/d) keeps the output's scale.
        self.projections = nn.ParameterDict()
        if align == "project":
            for i, (d, w) in enumerate(zip(in_dims, out_dims)):
                if d > 0:
                    weight = nn.init.normal_(torch.empty(d, w, device=device), 0.0, d**-0.5)
                    self.projections[str(i)] = nn.Parameter(weight)

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        by_name = pooled.to_dict()
        values = pooled.values()
        parts = []
        for i, (name, d, w) in enumerate(zip(self.feature_names, self.in_dims, self.out_dims)):
            if d == 0:
                parts.append(values.new_zeros(values.shape[0], w))
            elif self.align == "pad":
                parts.append(nn.functional.pad(by_name[name], (0, w - d)))
            else:
                parts.append(by_name[name] @ self.projections[str(i)])
        return KeyedTensor(
            keys=self.feature_names, length_per_key=self.out_dims, values=torch.cat(parts, dim=1)
        )


def _found_configs(tables: list[EmbeddingBagConfig], dims: Mapping[str, int]) -> list[EmbeddingBagConfig]:
    """``tables`` at their found dims, tables at 0 left out; every table needs a dim."""
    missing = [t.name for t in tables if t.name not in dims]
    if missing:
        raise ValueError(f"no dim for tables {missing}")
    kept = [replace(t, embedding_dim=int(dims[t.name])) for t in tables if int(dims[t.name]) > 0]
    if not kept:
        raise ValueError("every table has dim 0: nothing to export")
    return kept


class MixedDimEmbeddingBagCollection(ComposedEmbeddingBagCollection):
    """A stock ``EmbeddingBagCollection`` at per-table dims, presented at the configured widths.

    What a DimGrow search exports for models that need one common width (``DLRM``): the
    tables are a plain EBC child (``.ebc``, sharded by DMP's stock sharder like any EBC),
    and ``.align`` pads or projects each feature to the width of its original config
    (the mixed-dimension embeddings of the original DLRM code use the same projection).
    ``embedding_bag_configs()`` reports the original configs, so DLRM's checks hold.

    Args:
        tables: the original configs (their ``embedding_dim`` is the presented width).
        dims: found dim per table name; 0 drops the table (its features output zeros).
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        dims: Mapping[str, int],
        align: AlignMode = "project",
        is_weighted: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        kept = _found_configs(tables, dims)
        self._configs = [replace(t) for t in tables]
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self._init_facade(is_weighted, dev)
        self.ebc = EmbeddingBagCollection(tables=kept, is_weighted=is_weighted, device=dev)
        names = [f for t in tables for f in t.feature_names]
        in_dims = [int(dims[t.name]) for t in tables for _ in t.feature_names]
        out_dims = [t.embedding_dim for t in tables for _ in t.feature_names]
        self.align = AlignToWidth(names, in_dims, out_dims, align, None if dev.type == "meta" else dev)
        self._embedding_names = names
        self._feature_names = [list(t.feature_names) for t in tables]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.align(self.ebc(features))

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def table_dims(self) -> dict[str, int]:
        """The stored (found) dim of every kept table."""
        return {c.name: c.embedding_dim for c in self.ebc.embedding_bag_configs()}  # type: ignore[operator]

    @property
    def _lengths_per_embedding(self) -> list[int]:  # type: ignore[override]
        return list(self.align.out_dims)


def export_collection(
    tables: list[EmbeddingBagConfig],
    dims: Mapping[str, int],
    align: AlignMode = "project",
    is_weighted: bool = False,
    device: torch.device | str | None = None,
) -> EmbeddingBagCollection:
    """A fresh collection at ``dims``: a plain EBC (``raw``) or a mixed-dim one (pad/project)."""
    if align == "raw":
        kept = _found_configs(tables, dims)
        return EmbeddingBagCollection(
            tables=kept, is_weighted=is_weighted, device=torch.device(device or "cpu")
        )
    return MixedDimEmbeddingBagCollection(tables, dims, align, is_weighted, device)
