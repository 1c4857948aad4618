"""The TorchRec / FBGEMM mechanics of a re-plan, below :class:`ShardedTableStore`.

:mod:`torchrec_dimgrow.distributed.table_store` decides what a re-plan keeps, moves and
rewidths; this module is what it needs from TorchRec and FBGEMM internals to rebuild a
sharded EBC in place without copying or leaking the tables it keeps:

* :func:`sharder`: the stock EBC sharder with one TBE per table (unchanged tables keep their
  buffers);
* :class:`Handover` / :class:`Buffers`: the unchanged tables' host buffers, handed to the new
  TBEs through their fused params; :func:`keep_values` as the new tables' ``init_fn``,
  :func:`without_tbe_init` to skip FBGEMM's init draw over them, :func:`forget_handover` so
  ``apply_optimizer_in_backward`` does not pin them;
* :func:`discard`: frees the old sharded EBC by reference counting (its cycles broken);
* :func:`find_fqn`: a module's path under the DMP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
from torchrec.distributed.embedding_sharding import USE_ONE_TBE_PER_TABLE
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder


def sharder() -> EmbeddingBagCollectionSharder:
    """TorchRec's stock EBC sharder, one TBE per table.

    FBGEMM packs the tables of a TBE into one buffer, so a table that shares a TBE can only
    be re-planned by rebuilding its neighbours too. With one TBE per table a re-plan hands
    the buffers of every unchanged table to the new module untouched.
    """
    return EmbeddingBagCollectionSharder(fused_params={USE_ONE_TBE_PER_TABLE: True})


class Buffers(dict[str, torch.Tensor]):
    """A TBE's host buffers by FBGEMM name; hashed by identity because TorchRec puts the
    per-table fused params (where these travel) into a grouping key."""

    __hash__ = object.__hash__  # type: ignore[assignment]


@dataclass
class Handover:
    """This rank's buffers of the tables handed over, and the handed-over tables (global).

    ``in_place``: the changed tables (global) that are rewidthed in memory where they are
    (:meth:`~torchrec_dimgrow.distributed.table_store.ShardedTableStore._rewidth`) instead of going through the spill file.
    """

    local: dict[str, Buffers]
    global_tables: list[str]
    in_place: list[str] = field(default_factory=list)

    def __contains__(self, table: object) -> bool:
        return table in self.local

    def __getitem__(self, table: str) -> Buffers:
        return self.local[table]


def keep_values(t: torch.Tensor) -> torch.Tensor:
    """The ``init_fn`` of re-planned tables: the store initialises every column itself."""
    return t


@contextlib.contextmanager
def without_tbe_init() -> Iterator[None]:
    """Skip the uniform init TorchRec draws into every fused TBE at construction.

    A re-plan writes every column itself (kept ones from the old tables, new ones from
    N(0, std)); the draw would only cost a pass over all tables and would overwrite the
    buffers handed over from the old tables.
    """
    original = BaseBatchedEmbeddingBag.init_parameters
    BaseBatchedEmbeddingBag.init_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        BaseBatchedEmbeddingBag.init_parameters = original  # type: ignore[method-assign]


def forget_handover(ebc: nn.Module) -> None:
    """Take the handed-over buffers out of the meta EBC's optimizer kwargs once sharded.

    ``apply_optimizer_in_backward`` keeps every parameter it saw alive for the life of the
    process (a weak-key map whose value, the grad accumulator, refers back to the key), so
    the kwargs of the meta parameters would pin the buffers of every table handed over,
    and a later re-plan that replaces such a table could not free its old storage.
    """
    for param in ebc.parameters():
        kwargs = getattr(param, "_optimizer_kwargs", None)
        if kwargs:
            param._optimizer_kwargs = [  # type: ignore[attr-defined]
                {k: v for k, v in kw.items() if k != "preallocated_host_buffers"} for kw in kwargs
            ]


def discard(module: nn.Module) -> None:
    """Free a sharded EBC that is no longer used (a re-plan's old one) without the cycle collector.

    TorchRec and FBGEMM modules refer back to themselves: the sharded EBC registers its own
    bound methods and a closure over itself as state-dict hooks, and every FBGEMM TBE keeps
    closures over itself as attributes (its input-stats and parameter reporters). So an old
    module with its lookups, TBEs and fused optimizers is cyclic garbage that only a full
    collection frees, and full collections are rare once the heap is large: each re-plan
    would leave its old module (a few MiB of per-TBE buffers and index tensors, more with
    more tables) until the end of the run. Emptying the attributes of every module of the
    old tree (the lookups are not registered children of a sharded EBC) breaks those
    cycles, so reference counting frees it at once. Storage handed over to the new module
    is shared, not freed. The module must not be used afterwards.
    """
    mods = list(module.modules())
    for lookup in getattr(module, "_lookups", []):
        if isinstance(lookup, nn.Module):
            mods += list(lookup.modules())
    for m in mods:  # a weight may outlive its module; its in-backward optimizers must not
        for param in m.__dict__.get("_parameters", {}).values():
            if param is not None:
                param.__dict__.pop("_in_backward_optimizers", None)
    for m in mods:
        m.__dict__.clear()


def find_fqn(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError("module not found under the DMP")
