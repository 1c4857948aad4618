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

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder, ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from torchrec_dimgrow.distributed.planning import PlanningConfig, plan_collection
from torchrec_dimgrow.distributed.shard_io import TableView, copy_block, fill_columns, state_view, view_of
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.table_store import ResizeResult

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


def _rowwise() -> type[torch.optim.Optimizer]:
    from torchrec.optim import RowWiseAdagrad

    return RowWiseAdagrad  # type: ignore[return-value]


@dataclass
class EmbeddingOptimizer:
    """The fused (in-backward) optimizer of the tables, re-applied at every rebuild."""

    name: str = "adagrad"
    lr: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)

    def cls(self) -> type[torch.optim.Optimizer]:
        if self.name == "rowwise_adagrad":
            return _rowwise()
        try:
            return OPTIMIZERS[self.name]
        except KeyError as exc:
            raise ValueError(f"unknown embedding optimizer {self.name!r}") from exc

    def rowwise(self) -> bool:
        return any(self.optimizer_kinds_rowwise())

    def optimizer_kinds_rowwise(self) -> list[bool]:
        return list(self.state_kinds().values())

    def state_kinds(self) -> dict[str, bool]:
        """Fused optimizer states per table: name -> True if one value per row (row-wise)."""
        return {
            "adagrad": {"momentum1": False},
            "rowwise_adagrad": {"momentum1": True},
            "sgd": {},
            "adam": {"momentum1": False, "momentum2": False},
        }[self.name]

    def apply(self, params: Any) -> None:
        apply_optimizer_in_backward(self.cls(), params, {"lr": self.lr, **self.extra})


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
    ) -> None:
        self.dmp = dmp
        self.collection = collection
        self.optimizer = optimizer
        self.planning = planning
        self.device = device
        self.group = group if group is not None else dist.GroupMember.WORLD
        self.fqn = find_fqn(get_unwrapped_module(dmp), collection.ebc)
        self.on_rebuild = on_rebuild
        self.replans = 0
        self.replan_seconds = 0.0
        self.bytes_moved = 0

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
            self.bytes_moved += copy_block(t, t, [src], [dst], self.group, self.device)

    def reset_column(self, table: str, col: int, std: float) -> None:
        tensors = self._column_tensors(table)
        fill_columns(tensors[0], [col], std)
        for s in tensors[1:]:
            fill_columns(s, [col], None)

    def resize(self, capacities: dict[str, int], std: float) -> ResizeResult:
        start = time.perf_counter()
        old = self.sharded
        configs = [
            replace(c, embedding_dim=capacities.get(c.name, c.embedding_dim))
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
        env = ShardingEnv.from_process_group(self.group)
        new = EmbeddingBagCollectionSharder().shard(new_ebc, module_plan, env, self.device, self.fqn)  # type: ignore[arg-type]
        moved = self._copy_tables(old, new, std)
        self.collection.ebc = new
        root = get_unwrapped_module(self.dmp)
        self.dmp._optim = self.dmp._init_optim(root)
        self.dmp._plan.plan[self.fqn] = module_plan
        del old
        if self.on_rebuild is not None:
            self.on_rebuild(new)
        seconds = time.perf_counter() - start
        self.replans += 1
        self.replan_seconds += seconds
        self.bytes_moved += moved
        return ResizeResult(seconds, moved)

    @torch.no_grad()
    def _copy_tables(
        self, old: ShardedEmbeddingBagCollection, new: ShardedEmbeddingBagCollection, std: float
    ) -> int:
        old_w, new_w = self._weights(old), self._weights(new)
        old_s, new_s = self._states(old, old_w), self._states(new, new_w)
        moved = 0
        for table in sorted(new_w):  # same order on every rank
            src, dst = old_w[table], new_w[table]
            keep = min(src.cols, dst.cols)
            fill_columns(dst, list(range(dst.cols)), std)
            moved += copy_block(src, dst, list(range(keep)), list(range(keep)), self.group, self.device)
            for name in sorted(new_s[table]):
                s_old, s_new = old_s[table][name], new_s[table][name]
                fill_columns(s_new, list(range(s_new.cols)), None)
                k = min(s_old.cols, s_new.cols)
                moved += copy_block(s_old, s_new, list(range(k)), list(range(k)), self.group, self.device)
        return moved

    @torch.no_grad()
    def init_tables(self, std: float) -> None:
        """N(0, std) weights and zero optimizer state (the DimGrow reference init)."""
        weights, states = self.views()
        for table, w in weights.items():
            fill_columns(w, list(range(w.cols)), std)
            for v in states[table].values():
                fill_columns(v, list(range(v.cols)), None)
