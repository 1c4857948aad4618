"""Publishing the weights a DimGrow search holds *now*, at its current found dims, without a retrain.

What a published model computes, exactly
----------------------------------------
A DimGrow collection with ``align="project"`` turns the active columns ``x_c`` of feature
``f`` (slot ``c``, gate ``g_c``) into ``sum_c (g_c x_c + (1 - g_c) n_c) W_f[c]``, where the
noise ``n_c`` is, in ``eval()`` with the default rule (``SearchRule.eval_mixing="mean"``), the *batch* mean of
column ``c``: a score that depends on the other rows of the batch, which no per-request
serving model can reproduce. The published model therefore fixes the noise at ``mu_c``, the
mean of column ``c`` over the rows the trainer scored since the last dim change
(:class:`ColumnMeans`), and drops the columns whose gate is at most ``final_threshold``
(the found-dims rule of ``dims.json``), replacing them by that mean (``g_c`` read as 0)::

    serving(x) = head( sum_{c kept} x_c (g_c W[c]) + sum_{c active} (1 - g'_c) mu_c W[c] )

with ``g'_c = g_c`` for kept columns and 0 for dropped ones. That is the retrain model's
shape exactly: a stock ``EmbeddingBagCollection`` holding only the kept columns (the
searched weights, copied), concatenated, one ``Linear(sum d, adapter_dim)`` whose weight
is the gate-scaled projection rows and whose bias is the second sum, then the searched
WideDeep head (BatchNorm statistics of rank 0). :func:`reference_logits` computes the same
function the trainer's way, through the collection's own layout, gates and projection rows,
so the two can be compared: they agree to float32 rounding (the folded ``g W`` product and
the summation order differ).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_dimgrow.distributed.shard_io import copy_block
from torchrec_dimgrow.modules.backbone import CTRModel
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.table_store import TableStore


def kept_slots(coll: DimGrowEmbeddingBagCollection) -> list[list[int]]:
    """Per table, the active slots whose gate exceeds ``final_threshold`` (ascending).

    Their count per table is the found dim (``policy.final_dims``, what ``dims.json`` says).
    """
    gates = coll.gate_values()
    thr = coll.config.final_threshold
    return [[s for s in range(d) if float(gates[t, s]) > thr] for t, d in enumerate(coll.dims_list())]


def _table_weight(coll: DimGrowEmbeddingBagCollection, store: TableStore | None, name: str) -> torch.Tensor:
    if isinstance(coll.ebc, EmbeddingBagCollection):
        return coll.ebc.embedding_bags[name].weight  # type: ignore[index,return-value]
    if store is None or not hasattr(store, "views"):
        raise ValueError(f"{name}: the collection is sharded; pass its ShardedTableStore")
    return store.views()[0][name]  # type: ignore[attr-defined,no-any-return]


@torch.no_grad()
def gather_active_tables(
    coll: DimGrowEmbeddingBagCollection, store: TableStore | None = None
) -> dict[str, torch.Tensor]:
    """Every table's active columns (rows x dim, float32 on CPU), on every rank (collective).

    Sharded tables are read through :func:`~torchrec_dimgrow.distributed.shard_io.copy_block`
    (each element comes from the one rank owning it: bit-exact for every layout).
    """
    out: dict[str, torch.Tensor] = {}
    rows = {t.name: t.num_embeddings for t in coll._user_configs}
    for name, dim in zip(coll.table_names, coll.dims_list()):
        dst = torch.zeros(rows[name], dim, dtype=torch.float32)
        if dim:
            src = _table_weight(coll, store, name)
            copy_block(src, dst, list(range(dim)), list(range(dim)))
        out[name] = dst
    return out


class ColumnMeans:
    """Running mean of every active column (table x slot) over the rows the trainer scored.

    Fed with the lookup of each scored batch (:meth:`add`); :meth:`reset` after every dim
    change (slots move, so a slot's mean no longer describes its column). :meth:`mean`
    all-reduces over ranks (collective). Saved with the run (``state_dict``).
    """

    def __init__(self, tables: int, slots: int) -> None:
        self.sums = torch.zeros(tables, slots, dtype=torch.float64)
        self.rows = 0

    def add(self, coll: DimGrowEmbeddingBagCollection, pooled: KeyedTensor) -> None:
        x, _, lay, _ = coll.post._active(pooled)
        col_sums = x.detach().double().sum(0).cpu()
        if lay.col_t.numel():
            feature_rows = torch.zeros_like(self.sums)
            feature_rows.index_put_((lay.col_t.cpu(), lay.col_s.cpu()), col_sums, accumulate=True)
            counts = torch.zeros_like(self.sums)
            counts.index_put_((lay.col_t.cpu(), lay.col_s.cpu()), torch.ones_like(col_sums), accumulate=True)
            self.sums += feature_rows / counts.clamp_min(1.0)  # a table read by several features
        self.rows += int(x.shape[0])

    def reset(self) -> None:
        self.sums.zero_()
        self.rows = 0

    def mean(self) -> torch.Tensor:
        sums = self.sums.clone()
        rows = torch.tensor([float(self.rows)], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(rows)
        return (sums / rows.clamp_min(1.0)).float()

    def state_dict(self) -> dict[str, object]:
        return {"sums": self.sums.clone(), "rows": self.rows}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.sums = state["sums"].clone()  # type: ignore[attr-defined]
        self.rows = int(state["rows"])  # type: ignore[call-overload]


@dataclass
class FoldedCollection:
    """One DimGrow collection as a plain model sees it: kept columns and the folded adapter.

    ``tables``: table -> (rows x found dim) weights of the kept columns. Per feature ``i``
    (collection order): ``weights[i]`` (found dim x width) = ``g_c W_i[c]`` of its kept
    columns, ``bias[i]`` (width) = ``sum_c (1 - g'_c) mu_c W_i[c]`` over its active columns.
    """

    dims: dict[str, int]
    tables: dict[str, torch.Tensor]
    features: list[str]
    feature_tables: list[str]
    weights: list[torch.Tensor]
    bias: list[torch.Tensor]


@torch.no_grad()
def fold(
    coll: DimGrowEmbeddingBagCollection, active: Mapping[str, torch.Tensor], mu: torch.Tensor
) -> FoldedCollection:
    """The published form of ``coll`` (``align="project"``): see the module docstring."""
    post = coll.post
    if post.projection is None:
        raise ValueError("fold: the collection has no projections (align='project' is needed)")
    kept = kept_slots(coll)
    names = coll.table_names
    gates = coll.gate_values().float().cpu()
    proj = post.projection.detach().float().cpu()
    dims_now = coll.dims_list()
    weights, bias = [], []
    for i, t in enumerate(post.feature_tables):
        width = post.out_dims[i]
        g_eff = torch.zeros(dims_now[t])
        g_eff[kept[t]] = gates[t, kept[t]]
        w = proj[i, : dims_now[t], :width]
        m = mu[t, : dims_now[t]].float().cpu()
        bias.append(((1.0 - g_eff) * m) @ w)
        weights.append(gates[t, kept[t]].unsqueeze(1) * w[kept[t]])
    tables = {n: active[n][:, kept[t]].contiguous() for t, n in enumerate(names)}
    return FoldedCollection(
        dims={n: len(kept[t]) for t, n in enumerate(names)},
        tables=tables,
        features=list(post.feature_names),
        feature_tables=[names[t] for t in post.feature_tables],
        weights=weights,
        bias=bias,
    )


@torch.no_grad()
def load_into_ctr(plain: CTRModel, folded: FoldedCollection, head: nn.Module) -> CTRModel:
    """Copy a folded search collection and the searched head into a retrain ``CTRModel``.

    ``plain`` is ``saved_model.build_model`` at ``folded.dims`` (tables in field order, one
    feature per table, ``Linear(sum d, adapter_dim)``): the search model's summed features
    become the adapter, the bias the sum of the per-feature biases.
    """
    ebc = plain.sparse
    assert isinstance(ebc, EmbeddingBagCollection)
    cols = []
    for cfg in ebc.embedding_bag_configs():
        ebc.embedding_bags[cfg.name].weight.copy_(folded.tables[cfg.name])
        (feature,) = cfg.feature_names
        cols.append(folded.weights[folded.features.index(feature)])
    adapter = plain.adapter
    assert isinstance(adapter, nn.Linear)
    adapter.weight.copy_(torch.cat(cols, dim=0).t())
    adapter.bias.copy_(torch.stack(folded.bias).sum(0))
    plain.head.load_state_dict(head.state_dict())
    plain.eval()
    return plain


@torch.no_grad()
def reference_logits(
    coll: DimGrowEmbeddingBagCollection,
    head: nn.Module,
    active: Mapping[str, torch.Tensor],
    mu: torch.Tensor,
    features: KeyedJaggedTensor,
) -> torch.Tensor:
    """The trainer network's logits for the published function, computed the trainer's way.

    A lookup of the active columns, then the collection's own column layout, gates and
    projection rows (``DimGrowPostProcess``), noise ``mu``, gates of dropped columns read as
    0, summed, the head in eval mode. Not the folded model: this is what it is checked against.
    """
    configs = [
        EmbeddingBagConfig(
            name=n,
            embedding_dim=max(1, active[n].shape[1]),
            num_embeddings=active[n].shape[0],
            feature_names=fs,
        )
        for n, fs in zip(coll.table_names, coll._feature_names)
    ]
    lookup = EmbeddingBagCollection(tables=configs, device=torch.device("cpu"))
    for n in coll.table_names:
        w = lookup.embedding_bags[n].weight
        w.zero_()
        w[:, : active[n].shape[1]].copy_(active[n])
    pooled = lookup(features)
    dims = coll.dims_list()
    post = coll.post
    layout = post._layout_for(pooled, dims)
    x = pooled.values().float()
    if layout.select is not None:
        x = x.index_select(1, layout.select.cpu())
    col_t, col_s = layout.col_t.cpu(), layout.col_s.cpu()
    g = post.gate.gates().detach().float().cpu()[col_t, col_s]
    keep = g > coll.config.final_threshold
    g = torch.where(keep, g, torch.zeros_like(g))
    m = mu.float().cpu()[col_t, col_s]
    assert post.projection is not None
    rows = post.projection.detach().float().cpu().flatten(0, 1).index_select(0, layout.slot_rows.cpu())
    y = (g * x + (1.0 - g) * m) @ rows
    was = head.training
    head.eval()
    try:
        return head(y).float()  # type: ignore[no-any-return]
    finally:
        head.train(was)


def unsharded_head(model: nn.Module) -> nn.Module:
    """The dense head of a (possibly DMP/DDP-wrapped) CTR model: a local module on every rank."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ValueError("publishing needs a CTRModel (a .head module after the DimGrow collection)")
    return head


def request_of(features: KeyedJaggedTensor, fields: Sequence[str]) -> dict[str, torch.Tensor]:
    """A serving request (``values``/``lengths`` in ``fields`` order) carrying ``features``."""
    by_key = features.to_dict()
    values = torch.cat([by_key[f].values() for f in fields])
    lengths = torch.cat([by_key[f].lengths() for f in fields])
    return {"values": values.long().cpu(), "lengths": lengths.int().cpu()}


QUANT_BITS = {"int8": 8, "int4": 4}


@torch.no_grad()
def logit_error_bound(plain: CTRModel, serving: str, max_bag: int) -> float:
    """A bound on |served logit - fp32 logit| from the tables' quantisation alone.

    Per table, the largest per-element error of FBGEMM's row-wise quantisation: at int8/int4
    half a step of the row's ``(max - min) / (2^bits - 1)`` grid, plus the rounding of its
    scale and bias to fp16 (``(levels * scale + |min|) * 2^-10``, twice fp16's unit
    roundoff); at fp16 ``|w| * 2^-10``. Times ``max_bag`` (sum pooling), it is propagated as
    an elementwise interval through the model: ``|W| e`` through every linear layer (the
    adapter, the wide part, each deep layer), ``|gamma| / sqrt(var + eps)`` through an eval
    BatchNorm, unchanged through ReLU and Dropout. Rigorous for the float model; the fp32
    arithmetic's own rounding (~1e-6 relative) comes on top.
    """
    if serving == "fp32":
        return 0.0
    ebc = plain.sparse
    assert isinstance(ebc, EmbeddingBagCollection)
    parts = []
    for cfg in ebc.embedding_bag_configs():
        w = ebc.embedding_bags[cfg.name].weight.detach().float()
        if serving == "fp16":
            err = float(w.abs().max()) * 2.0**-10
        else:
            levels = 2 ** QUANT_BITS[serving] - 1
            lo, hi = w.min(dim=1).values, w.max(dim=1).values
            scale = (hi - lo) / levels
            err = float((0.5 * scale + (levels * scale + lo.abs()) * 2.0**-10).max())
        parts.append(torch.full((cfg.embedding_dim,), err * max_bag))
    e = torch.cat(parts)
    adapter = plain.adapter
    assert isinstance(adapter, nn.Linear)
    e = adapter.weight.detach().abs() @ e
    head = plain.head
    wide = head.wide.weight.detach().abs() @ e  # type: ignore[union-attr]
    for layer in head.deep:  # type: ignore[union-attr]
        if isinstance(layer, nn.Linear):
            e = layer.weight.detach().abs() @ e
        elif isinstance(layer, nn.BatchNorm1d):
            assert layer.running_var is not None
            gamma = layer.weight.detach() if layer.weight is not None else torch.ones_like(layer.running_var)
            e = gamma.abs() / torch.sqrt(layer.running_var + layer.eps) * e
        elif not isinstance(layer, (nn.ReLU, nn.Dropout)):
            raise ValueError(f"logit_error_bound: no rule for {type(layer).__name__}")
    return float((e + wide).max())


@torch.no_grad()
def load_into_mixed(mixed: nn.Module, folded: FoldedCollection) -> nn.Module:
    """Copy a folded collection into ``export``'s ``MixedDimEmbeddingBagCollection`` (align="project").

    What a user's own model (a DLRM) publishes from: ``export(build_model(), dims,
    align="project")`` holds one such collection per DimGrow collection, tables at the found
    dims and one bias-free ``d x width`` projection per kept feature. Those take the kept
    columns and the gate-scaled projection rows; they have no bias, so the collection must
    have been folded without column means (zero noise: :meth:`DimGrowHandle.serving_weights`'s
    default), whose bias is zero.
    """
    from torchrec_dimgrow.modules.mixed_dim import MixedDimEmbeddingBagCollection

    if not isinstance(mixed, MixedDimEmbeddingBagCollection):
        raise TypeError(
            f"load_into_mixed: expected a MixedDimEmbeddingBagCollection, got {type(mixed).__name__}"
        )
    if any(float(b.abs().max()) > 0 for b in folded.bias if b.numel()):
        raise ValueError(
            "load_into_mixed: the fold has a bias (column means) that a mixed-dim collection cannot hold"
        )
    tables = mixed.ebc.embedding_bags  # type: ignore[union-attr]
    for name, weight in folded.tables.items():
        if folded.dims[name]:
            tables[name].weight.copy_(weight)  # type: ignore[index,union-attr]
    align = mixed.align
    for i, feature in enumerate(align.feature_names):  # type: ignore[union-attr,arg-type]
        if str(i) in align.projections:  # type: ignore[operator,union-attr]
            align.projections[str(i)].copy_(folded.weights[folded.features.index(feature)])  # type: ignore[index,union-attr]
    return mixed


def write_version(
    staging: Path,
    model: nn.Module,
    input_features: Sequence[str],
    serving: str,
    number: int,
    step: int,
    *,
    extra_meta: Mapping[str, Any] | None = None,
    field_rows: Mapping[str, int] | None = None,
    vocab: Mapping[str, Any] | None = None,
    world_size: int = 1,
) -> None:
    """A complete serving version in ``staging``: ``export_serving``'s files, version.json, manifest.

    For :meth:`~torchrec_dimgrow.versions.VersionPublisher.publish` from a user's loop::

        folded = handle.serving_weights()                    # every rank (collective)
        if rank == 0:
            model = export(build_model(), handle.found_dims(), align="project")
            load_into_mixed(model.<path>, folded["<path>"]); copy the dense layers
            publisher.publish(k, step, lambda d: write_version(d, model, keys, "fp32", k, step))
    """
    from torchrec_dimgrow.serving import export_serving
    from torchrec_dimgrow.versions import finish_version

    export_serving(
        model,
        input_features,
        serving,
        staging,
        extra_meta={"step": step, **(extra_meta or {})},
        field_rows=field_rows,
        vocab=vocab,
    )
    finish_version(staging, number, step, manifest_config={"serving": serving}, world_size=world_size)
