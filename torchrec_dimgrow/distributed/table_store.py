"""Re-plan a sharded DimGrow collection when table widths change.

No TorchRec API changes a table's width (``DistributedModelParallel.reshard`` only moves
same-shape shards), so a capacity change is a rebuild of the collection's inner sharded
EBC, done in place inside the existing DMP:

1. a new meta-device ``EmbeddingBagCollection`` at the new widths gets the same in-backward
   (fused) optimizer and is planned: tables whose width did not change keep their old
   placement, and so do (``PlanningConfig.keep_placement``) changed tables whose shards
   hold whole rows; TorchRec's planner places the rest (column-split tables);
2. TorchRec's stock sharder shards it;
3. every kept column of every table, and the matching fused-optimizer state, is copied
   bit-exactly (in memory on the rank that holds it, or shard-to-shard through a spill
   file, :mod:`torchrec_dimgrow.distributed.shard_io`); new columns are drawn from
   N(0, std) with zero optimizer state;
4. the new sharded module replaces the old one and the DMP's fused optimizer and plan are
   rebuilt. Dense parts (gates, projections, the user's model) and DDP are untouched.

All fields that changed at one check are handled by one re-plan. The TorchRec / FBGEMM
internals the rebuild leans on (one TBE per table, buffer handover, freeing the old module)
are :mod:`torchrec_dimgrow.distributed.rebuild`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer

from torchrec_dimgrow.distributed.planning import PlanningConfig, pin_width, plan_collection, validate_configs
from torchrec_dimgrow.distributed.rebuild import (
    Buffers,
    Handover,
    discard,
    find_fqn,
    forget_handover,
    keep_values,
    sharder,
    without_tbe_init,
)
from torchrec_dimgrow.distributed.shard_io import (
    Spill,
    SpilledTable,
    TableView,
    can_release_pages,
    copy_block,
    fill_columns,
    restore_block,
    rewidth_rows,
    state_view,
    view_of,
)
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.table_store import ResizeResult
from torchrec_dimgrow.optim import EmbeddingOptimizer


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
        self.last_in_place: list[str] = []  # tables the latest re-plan rewidthed in memory
        # Rewidth tables that keep their placement in memory (False: always through the
        # spill file, the path every layout supports).
        self.rewidth_in_place = True

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
        ``preallocated_host_buffers``), so they are neither copied nor reallocated.

        A table whose width changes but whose shards hold whole rows (table-wise, row-wise,
        one column shard) keeps its ranks under ``PlanningConfig.keep_placement`` and is
        rewidthed in memory on each rank
        (:func:`~torchrec_dimgrow.distributed.shard_io.rewidth_rows`: the new buffer fills as
        the old one's pages are given back) and handed to the new TBE the same way; a
        row-wise optimizer state (one value per row) is handed over as it is. The
        surviving columns of any other changed table (one the planner places anew, or not
        in a TBE of its own, or where pages cannot be given back) are spilled to a
        scratch file in row chunks, the old module is dropped (freeing exactly those
        tables), the new module is sharded, and the kept columns are read back chunk by
        chunk (all-reduced only when a table changed owner). New columns are drawn after
        the new module is built, table by table in name order, on whichever path the table
        took, so the draws do not depend on the path. A re-plan therefore costs time and
        transient memory in proportion to the tables that change, not to all tables.
        """
        start = time.perf_counter()
        old_widths = {c.name: c.embedding_dim for c in self.collection.physical_configs()}
        configs = [
            replace(c, embedding_dim=capacities.get(c.name, c.embedding_dim), init_fn=keep_values)
            for c in self.collection.physical_configs()
        ]
        new_ebc = EmbeddingBagCollection(
            tables=configs, is_weighted=self.collection.is_weighted(), device=torch.device("meta")
        )
        self.optimizer.apply(new_ebc.parameters())
        widths = {c.name: c.embedding_dim for c in configs}
        module_plan, pinned = self._plan(new_ebc, set(capacities), old_widths, widths)
        in_place = (
            pinned if self.rewidth_in_place and self.device.type == "cpu" and can_release_pages() else set()
        )
        phases = {"plan": time.perf_counter() - start}
        handover = self._handover(set(capacities), in_place)
        spill = Spill(self.spill_dir)
        try:
            spilled = self._spill(widths, {*handover.global_tables, *handover.in_place}, spill)
            phases["spill"] = time.perf_counter() - start - sum(phases.values())
            # With nothing spilled, no other table draws in between: new columns are drawn
            # during the copy, in the order _restore would draw them.
            fill = not spilled
            self._rewidth(handover, old_widths, widths, std if fill else None, fill)
            phases["rewidth"] = time.perf_counter() - start - sum(phases.values())
            for pname, param in new_ebc.named_parameters():
                table = pname.split(".")[1]
                if table in handover:  # one kwargs dict per table (apply() shares one among all)
                    kwargs = dict(param._optimizer_kwargs[0], preallocated_host_buffers=handover[table])  # type: ignore[attr-defined,index]
                    param._optimizer_kwargs = [kwargs]  # type: ignore[attr-defined]
            self._release_old(collect=bool(spilled))
            env = ShardingEnv.from_process_group(self.group)
            with without_tbe_init():
                new = sharder().shard(new_ebc, module_plan, env, self.device, self.fqn)  # type: ignore[arg-type]
            forget_handover(new_ebc)
            handover_in_place = handover.in_place
            del handover
            phases["shard"] = time.perf_counter() - start - sum(phases.values())
            later = {} if fill else {t: min(old_widths[t], widths[t]) for t in handover_in_place}
            moved = self._restore(new, spilled, spill, std, later)
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
        self.last_in_place = list(handover_in_place)
        return ResizeResult(seconds, moved)

    def _plan(
        self,
        new_ebc: EmbeddingBagCollection,
        changed: set[str],
        old_widths: dict[str, int],
        widths: dict[str, int],
    ) -> tuple[EmbeddingModuleShardingPlan, set[str]]:
        """The module plan at the new widths, and the changed tables that keep their ranks.

        Unchanged tables keep their old placement; changed ones whose shards hold whole
        rows too under ``keep_placement`` (:func:`pin_width`). TorchRec's planner runs only when
        some table is left to place (it is a collective, and its choice for the changed
        tables ignores where the unchanged ones actually are). The decision uses only the
        old plan and the widths, identical on every rank.
        """
        old_plan = self.dmp.plan.plan.get(self.fqn, {})
        plan: dict[str, ParameterSharding] = {}
        pinned: set[str] = set()
        for name in widths:
            if name not in changed and name in old_plan:
                plan[name] = old_plan[name]  # type: ignore[index]
            elif name in changed and self.planning.keep_placement:
                same_ranks = pin_width(old_plan.get(name), old_widths[name], widths[name])  # type: ignore[arg-type]
                if same_ranks is not None:
                    plan[name] = same_ranks
                    pinned.add(name)
        if len(plan) == len(widths):
            validate_configs(new_ebc.embedding_bag_configs())
            return EmbeddingModuleShardingPlan(plan), pinned
        fresh = plan_collection(
            new_ebc,
            self.fqn,
            dist.get_world_size(self.group),
            self.device,
            self.planning,
            self.group,
            self.optimizer.rowwise(),
        )
        return EmbeddingModuleShardingPlan({n: plan.get(n, fresh[n]) for n in widths}), pinned

    def _handover(self, changed: set[str], in_place: set[str]) -> Handover:
        """Storage of the tables that each sit in a TBE of their own, on every rank.

        A table qualifies only when no rank holds it in a TBE shared with another table or
        outside host memory (agreed with an all-reduce, since spilling is collective). An unchanged one is
        handed to the new TBE as it is; a changed one in ``in_place`` (its placement is
        kept) is rewidthed in memory (:meth:`_rewidth`); other changed ones are spilled.
        """
        local: dict[str, Buffers] = {}
        shared: set[str] = set()
        for lookup in self.sharded._lookups:
            for emb in getattr(lookup, "_emb_modules", []):
                names = {t.name for t in emb.config.embedding_tables}
                if len(names) != 1:
                    shared |= names
                    continue
                tbe = emb.emb_module
                buffers = Buffers()
                for key in ("weights", *self.optimizer.state_kinds()):  # what FBGEMM consumes
                    t = getattr(tbe, f"{key}_host", None)
                    if isinstance(t, torch.Tensor) and t.numel() > 0:
                        buffers[key] = t.detach()
                if "weights" not in buffers:  # e.g. a TBE in device memory: no host buffers
                    shared |= names
                    continue
                local[next(iter(names))] = buffers
        tables = sorted(c.name for c in self.collection.physical_configs())
        ok = torch.tensor(
            [0 if (t in shared or (t in changed and t not in in_place)) else 1 for t in tables],
            dtype=torch.int32,
        )
        if dist.get_world_size(self.group) > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group)
        keep = [t for t, flag in zip(tables, ok.tolist()) if flag]
        return Handover(
            {t: local[t] for t in keep if t in local},
            [t for t in keep if t not in changed],
            [t for t in keep if t in changed],
        )

    def _rewidth(
        self, handover: Handover, old: dict[str, int], new: dict[str, int], std: float | None, fill: bool
    ) -> None:
        """Swap the old buffers of the ``in_place`` tables held here for rewidthed ones.

        Weights and per-column optimizer states get new buffers (kept columns copied, the
        old pages given back behind the copy); a row-wise state stays as it is. New
        columns are drawn from N(0, ``std``) (weights) and zeroed (states) during the copy
        when ``fill``, else left for :meth:`_restore`. Tables go in name order, weights
        first, as :meth:`_restore` draws. Local: each rank's pieces of these tables are
        whole rows, the same rows before and after.
        """
        rowwise = self.optimizer.state_kinds()
        for table in handover.in_place:
            buffers = handover.local.get(table)
            if buffers is None:
                continue  # no rows of this table here
            rows, rem = divmod(buffers["weights"].numel(), old[table])
            if rem:
                raise RuntimeError(f"table {table!r}: local buffer is not {old[table]} columns wide")
            for key in list(buffers):  # "weights" first
                if key == "weights" or not rowwise.get(key, False):
                    draw = std if key == "weights" else None
                    buffers[key] = rewidth_rows(buffers[key], rows, old[table], new[table], fill, draw)

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

    def _release_old(self, collect: bool) -> None:
        """Drop every reference this package holds to the old sharded tables, and free them.

        The old module sits in reference cycles (TorchRec's and FBGEMM's own); left to the
        cycle collector it would outlive the re-plan, often to the end of the run.
        :func:`discard` breaks the cycles, so it is freed here, before the new tables are
        allocated. ``collect``: also run the cycle collector, so that the storage of
        spilled tables is free before the new ones are built even if something else still
        refers to it (a full collection costs 0.2-1 s on a large heap).
        """
        old = self.collection.ebc
        self.collection.ebc = nn.Module()  # placeholder until the new module is in
        self.dmp._optim = CombinedOptimizer([])
        discard(old)
        del old
        if collect:
            gc.collect()

    @torch.no_grad()
    def _restore(
        self,
        new: ShardedEmbeddingBagCollection,
        spilled: dict[str, dict[str, tuple[SpilledTable, int]]],
        spill: Spill,
        std: float,
        in_place: dict[str, int],
    ) -> int:
        """New columns N(0, std) (states zero); kept columns read back from ``spill``.

        ``in_place``: table -> kept columns of the tables rewidthed in memory (their kept
        columns are already there). All tables are visited in one name order, so the
        random draws are the same whichever path a table took.
        """
        new_w = self._weights(new)
        new_s = self._states(new, new_w)
        rowwise = self.optimizer.state_kinds()
        moved = 0
        for table in sorted({*spilled, *in_place}):  # same order on every rank; the rest kept their storage
            dst = new_w[table]
            if table in in_place:
                keep = in_place[table]
                fill_columns(dst, list(range(keep, dst.cols)), std)
                for name in sorted(new_s[table]):
                    s_new = new_s[table][name]
                    fill_columns(s_new, list(range(1 if rowwise[name] else keep, s_new.cols)), None)
                continue
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


__all__ = ["ShardedTableStore", "find_fqn", "sharder"]
