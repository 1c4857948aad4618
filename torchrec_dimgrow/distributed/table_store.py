"""Re-plan a sharded DimGrow collection when table widths change.

No TorchRec API changes a table's width (``DistributedModelParallel.reshard`` only moves
same-shape shards), so a capacity change is a rebuild of the collection's inner sharded
EBC, done in place inside the existing DMP:

1. a new meta-device ``EmbeddingBagCollection`` at the new widths gets the same in-backward
   (fused) optimizer and is planned by TorchRec's planner (tables whose width did not
   change keep their old placement, so they are copied locally, not moved);
2. TorchRec's stock sharder shards it;
3. every kept column of every table, and the matching fused-optimizer state, is copied
   bit-exactly shard-to-shard (:mod:`torchrec_dimgrow.distributed.shard_io`); new columns
   are drawn from N(0, std) with zero optimizer state;
4. the new sharded module replaces the old one and the DMP's fused optimizer and plan are
   rebuilt. Dense parts (gates, projections, the user's model) and DDP are untouched.

All fields that changed at one check are handled by one re-plan.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
from torchrec.distributed.embedding_sharding import USE_ONE_TBE_PER_TABLE
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer

from torchrec_dimgrow.distributed.planning import PlanningConfig, plan_collection
from torchrec_dimgrow.distributed.shard_io import (
    Spill,
    SpilledTable,
    TableView,
    copy_block,
    fill_columns,
    restore_block,
    state_view,
    view_of,
)
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.table_store import ResizeResult
from torchrec_dimgrow.optim import EmbeddingOptimizer


def sharder() -> EmbeddingBagCollectionSharder:
    """TorchRec's stock EBC sharder, one TBE per table.

    FBGEMM packs the tables of a TBE into one buffer, so a table that shares a TBE can only
    be re-planned by rebuilding its neighbours too. With one TBE per table a re-plan hands
    the buffers of every unchanged table to the new module untouched.
    """
    return EmbeddingBagCollectionSharder(fused_params={USE_ONE_TBE_PER_TABLE: True})


class _Buffers(dict[str, torch.Tensor]):
    """A TBE's host buffers by FBGEMM name; hashed by identity because TorchRec puts the
    per-table fused params (where these travel) into a grouping key."""

    __hash__ = object.__hash__  # type: ignore[assignment]


@dataclass
class _Handover:
    """This rank's buffers of the tables handed over, and the handed-over tables (global)."""

    local: dict[str, _Buffers]
    global_tables: list[str]

    def __contains__(self, table: object) -> bool:
        return table in self.local

    def __getitem__(self, table: str) -> _Buffers:
        return self.local[table]


def _keep_values(t: torch.Tensor) -> torch.Tensor:
    """The ``init_fn`` of re-planned tables: the store initialises every column itself."""
    return t


@contextlib.contextmanager
def _without_tbe_init() -> Iterator[None]:
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


def _forget_handover(ebc: nn.Module) -> None:
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


def find_fqn(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError("module not found under the DMP")


class ShardedTableStore:
    """:class:`~torchrec_dimgrow.modules.table_store.TableStore` over a DMP-sharded collection."""

    def __init__(
        self,
        dmp: DistributedModelParallel,
        collection: DimGrowEmbeddingBagCollection,
        optimizer: EmbeddingOptimizer,
        planning: PlanningConfig,
        device: torch.device,
        group: dist.ProcessGroup | None = None,
        on_rebuild: Callable[[ShardedEmbeddingBagCollection], None] | None = None,
        spill_dir: str | None = None,
    ) -> None:
        self.dmp = dmp
        self.collection = collection
        self.optimizer = optimizer
        self.planning = planning
        self.device = device
        self.group = group if group is not None else dist.GroupMember.WORLD
        self.fqn = find_fqn(get_unwrapped_module(dmp), collection.ebc)
        self.on_rebuild = on_rebuild
        self.spill_dir = spill_dir  # scratch files of re-plans (None: the system temp dir)
        self.spilled_bytes = 0
        self.last_phases: dict[str, float] = {}  # seconds per phase of the latest re-plan

    # ------------------------------------------------------------------ tensors
    @property
    def sharded(self) -> ShardedEmbeddingBagCollection:
        ebc = self.collection.ebc
        if not isinstance(ebc, ShardedEmbeddingBagCollection):
            raise TypeError(f"{self.fqn} is not sharded (got {type(ebc).__name__})")
        return ebc

    @staticmethod
    def _weights(ebc: ShardedEmbeddingBagCollection) -> dict[str, TableView]:
        """Every table's weight layout (global) and local shards, on every rank."""
        sd = ebc.state_dict()
        return {
            k.split(".")[1]: view_of(v)
            for k, v in sd.items()
            if k.startswith("embedding_bags.") and k.endswith(".weight")
        }

    def _states(
        self, ebc: ShardedEmbeddingBagCollection, weights: dict[str, TableView]
    ) -> dict[str, dict[str, TableView]]:
        """table -> {state name: layout}, for every table on every rank (see state_view)."""
        local = ebc.fused_optimizer.state_dict()["state"]
        kinds = self.optimizer.state_kinds()
        out: dict[str, dict[str, TableView]] = {}
        for table, w in weights.items():
            mine = local.get(f"embedding_bags.{table}.weight", {})
            out[table] = {
                name: state_view(w, mine.get(f"{table}.{name}"), rowwise) for name, rowwise in kinds.items()
            }
        return out

    def views(self) -> tuple[dict[str, TableView], dict[str, dict[str, TableView]]]:
        weights = self._weights(self.sharded)
        return weights, self._states(self.sharded, weights)

    def _column_tensors(self, table: str) -> list[TableView]:
        """Weight plus every optimizer state laid out per column (not the row-wise ones)."""
        weights, states = self.views()
        rowwise = self.optimizer.state_kinds()
        return [weights[table], *(v for n, v in states[table].items() if not rowwise[n])]

    def local_bytes(self) -> int:
        """Bytes of this rank's table shards plus their fused optimizer state."""
        weights, states = self.views()
        total = sum(w.local_bytes() for w in weights.values())
        return total + sum(v.local_bytes() for d in states.values() for v in d.values())

    # ------------------------------------------------------------------ TableStore API
    def move_column(self, table: str, src: int, dst: int) -> None:
        for t in self._column_tensors(table):
            copy_block(t, t, [src], [dst], self.group, self.device)

    def reset_column(self, table: str, col: int, std: float) -> None:
        tensors = self._column_tensors(table)
        fill_columns(tensors[0], [col], std)
        for s in tensors[1:]:
            fill_columns(s, [col], None)

    def resize(self, capacities: dict[str, int], std: float) -> ResizeResult:
        """Rebuild the tables at ``capacities`` (table -> new width), keeping every kept column.

        Nothing is held twice. Tables whose width does not change keep their place and
        their storage: each sits in its own TBE (:func:`sharder`), and the new TBE is
        built on the old weight and optimizer-state buffers (FBGEMM's
        ``preallocated_host_buffers``), so they are neither copied nor reallocated. The
        surviving columns of the tables that do change (and of any table not in a TBE of
        its own, e.g. a model sharded by the user's own sharder) are spilled to a scratch
        file in row chunks, the old module is dropped (freeing exactly those tables), the
        new module is sharded, and the kept columns are read back chunk by chunk
        (all-reduced only when a table changed owner). A re-plan therefore costs time and
        transient memory in proportion to the tables that change, not to all tables.
        """
        start = time.perf_counter()
        configs = [
            replace(c, embedding_dim=capacities.get(c.name, c.embedding_dim), init_fn=_keep_values)
            for c in self.collection.physical_configs()
        ]
        new_ebc = EmbeddingBagCollection(
            tables=configs, is_weighted=self.collection.is_weighted(), device=torch.device("meta")
        )
        self.optimizer.apply(new_ebc.parameters())
        world = dist.get_world_size(self.group)
        module_plan = plan_collection(
            new_ebc, self.fqn, world, self.device, self.planning, self.group, self.optimizer.rowwise()
        )
        old_plan = self.dmp.plan.plan.get(self.fqn, {})
        for name in module_plan:
            if name not in capacities and name in old_plan:  # keep untouched tables in place
                module_plan[name] = old_plan[name]  # type: ignore[index]
        widths = {c.name: c.embedding_dim for c in configs}
        phases = {"plan": time.perf_counter() - start}
        handover = self._handover(set(capacities))
        for pname, param in new_ebc.named_parameters():
            table = pname.split(".")[1]
            if table in handover:  # one kwargs dict per table (apply() shares one among all)
                kwargs = dict(param._optimizer_kwargs[0], preallocated_host_buffers=handover[table])  # type: ignore[attr-defined,index]
                param._optimizer_kwargs = [kwargs]  # type: ignore[attr-defined]
        spill = Spill(self.spill_dir)
        try:
            spilled = self._spill(widths, set(handover.global_tables), spill)
            phases["spill"] = time.perf_counter() - start - sum(phases.values())
            self._release_old()
            env = ShardingEnv.from_process_group(self.group)
            with _without_tbe_init():
                new = sharder().shard(new_ebc, module_plan, env, self.device, self.fqn)  # type: ignore[arg-type]
            _forget_handover(new_ebc)
            del handover
            phases["shard"] = time.perf_counter() - start - sum(phases.values())
            moved = self._restore(new, spilled, spill, std)
            phases["restore"] = time.perf_counter() - start - sum(phases.values())
            self.spilled_bytes += spill.bytes
        finally:
            spill.close()
        self.collection.ebc = new
        root = get_unwrapped_module(self.dmp)
        self.dmp._optim = self.dmp._init_optim(root)
        self.dmp._plan.plan[self.fqn] = module_plan
        if self.on_rebuild is not None:
            self.on_rebuild(new)
        seconds = time.perf_counter() - start
        phases["rebuild_optimizer"] = seconds - sum(phases.values())
        self.last_phases = phases
        return ResizeResult(seconds, moved)

    def _handover(self, changed: set[str]) -> _Handover:
        """Storage of the unchanged tables that each sit in a TBE of their own, on every rank.

        A table qualifies only when no rank holds it in a TBE shared with another table
        (agreed with an all-reduce, since spilling is collective); its buffers are handed
        to the new TBE as they are.
        """
        local: dict[str, _Buffers] = {}
        shared: set[str] = set()
        for lookup in self.sharded._lookups:
            for emb in getattr(lookup, "_emb_modules", []):
                names = {t.name for t in emb.config.embedding_tables}
                if len(names) != 1:
                    shared |= names
                    continue
                tbe = emb.emb_module
                buffers = _Buffers()
                for key in ("weights", *self.optimizer.state_kinds()):  # what FBGEMM consumes
                    t = getattr(tbe, f"{key}_host", None)
                    if isinstance(t, torch.Tensor) and t.numel() > 0:
                        buffers[key] = t.detach()
                local[next(iter(names))] = buffers
        tables = sorted(c.name for c in self.collection.physical_configs())
        ok = torch.tensor([0 if (t in changed or t in shared) else 1 for t in tables], dtype=torch.int32)
        if dist.get_world_size(self.group) > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        keep = [t for t, flag in zip(tables, ok.tolist()) if flag]
        return _Handover({t: local[t] for t in keep if t in local}, keep)

    def _spill(
        self, widths: dict[str, int], skip: set[str], spill: Spill
    ) -> dict[str, dict[str, tuple[SpilledTable, int]]]:
        """Write the surviving columns (weight + each optimizer state) of every table not in
        ``skip`` to ``spill``.

        Returns table -> {"weight" | state name: (spilled layout and pieces, kept columns)}.
        """
        weights, states = self.views()
        rowwise = self.optimizer.state_kinds()
        out: dict[str, dict[str, tuple[SpilledTable, int]]] = {}
        for table in sorted(weights):
            if table in skip:
                continue
            w = weights[table]
            keep = min(w.cols, widths[table])
            out[table] = {"weight": (spill.write(w, keep), keep)}
            for name in sorted(states[table]):
                v = states[table][name]
                k = min(v.cols, 1 if rowwise[name] else widths[table])
                out[table][name] = (spill.write(v, k), k)
        return out

    def _release_old(self) -> None:
        """Drop every reference this package holds to the old sharded tables, then collect."""
        self.collection.ebc = nn.Module()  # placeholder until the new module is in
        self.dmp._optim = CombinedOptimizer([])
        gc.collect()

    @torch.no_grad()
    def _restore(
        self,
        new: ShardedEmbeddingBagCollection,
        spilled: dict[str, dict[str, tuple[SpilledTable, int]]],
        spill: Spill,
        std: float,
    ) -> int:
        """New columns N(0, std) (states zero); kept columns read back from ``spill``."""
        new_w = self._weights(new)
        new_s = self._states(new, new_w)
        moved = 0
        for table in sorted(spilled):  # same order on every rank; the rest kept their storage
            dst = new_w[table]
            src, keep = spilled[table]["weight"]
            fill_columns(dst, list(range(keep, dst.cols)), std)
            moved += restore_block(spill, src, dst, keep, self.group, self.device)
            for name in sorted(new_s[table]):
                s_new = new_s[table][name]
                src, k = spilled[table][name]
                fill_columns(s_new, list(range(k, s_new.cols)), None)
                moved += restore_block(spill, src, s_new, k, self.group, self.device)
        return moved

    @torch.no_grad()
    def init_tables(self, std: float) -> None:
        """N(0, std) weights and zero optimizer state (the DimGrow reference init)."""
        weights, states = self.views()
        for table, w in weights.items():
            fill_columns(w, list(range(w.cols)), std)
            for v in states[table].values():
                fill_columns(v, list(range(v.cols)), None)
