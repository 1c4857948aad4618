"""The one sharding path: shard a model, and keep a re-plan store per DimGrow collection.

``shard_model`` is what a user calls instead of building ``DistributedModelParallel``
themselves: it attaches the fused embedding optimizer to every table, plans every stock
``EmbeddingBagCollection`` of the model (a DimGrow collection's ``.ebc`` child, a
SuperNet baseline's, any other) with TorchRec's planner, builds the DMP with TorchRec's
stock sharder, and returns one :class:`ShardedTableStore` per DimGrow collection for later
re-plans. A script that builds its own DMP (the DLRM example, through
:class:`~torchrec_dimgrow.swap.DimGrowHandle`) gets the same stores from
:func:`attach_stores`. The search recipe, the handle and the baselines all shard here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_dimgrow.distributed.planning import AUTO_TYPES, PlanningConfig, plan_collection
from torchrec_dimgrow.distributed.table_store import ShardedTableStore, sharder
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.optim import EmbeddingOptimizer

#: Sharding types the re-plan store can copy shard-to-shard (``row_wise`` hand-built).
SUPPORTED_SHARDING = (*AUTO_TYPES, "row_wise")


def find_collections(model: nn.Module) -> list[tuple[str, DimGrowEmbeddingBagCollection]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DimGrowEmbeddingBagCollection)]


def stock_collections(model: nn.Module) -> list[tuple[str, EmbeddingBagCollection]]:
    """Every stock ``EmbeddingBagCollection`` (exact type: subclasses shard through their child)."""
    return [(n, m) for n, m in model.named_modules() if type(m) is EmbeddingBagCollection]


@dataclass
class ShardedModel:
    """The DMP plus one re-plan store per DimGrow collection (keyed by module path)."""

    dmp: DistributedModelParallel
    stores: dict[str, ShardedTableStore]

    def store_for(self, collection: DimGrowEmbeddingBagCollection) -> ShardedTableStore:
        for store in self.stores.values():
            if store.collection is collection:
                return store
        raise KeyError("collection is not part of this sharded model")


def shard_model(
    model: nn.Module,
    device: torch.device,
    planning: PlanningConfig | None = None,
    optimizer: EmbeddingOptimizer | None = None,
    group: dist.ProcessGroup | None = None,
    saved_plan: ShardingPlan | None = None,
) -> ShardedModel:
    """Build the DMP for ``model``; its tables must still be on the meta device.

    ``saved_plan`` (a resumed search's ``dmp.plan``) places every collection exactly where
    the interrupted run had it. Re-plans only move the tables whose width changed, so
    after a few of them the placement depends on the search's history, and planning
    afresh would put tables on other ranks: the weights would still load (DCP re-shards),
    but each rank would then initialise different new columns from its own random stream
    and the resumed search would drift from the uninterrupted one.
    """
    planning = planning or PlanningConfig()
    optimizer = optimizer or EmbeddingOptimizer()
    optimizer.check_device(device)
    group = group if group is not None else dist.GroupMember.WORLD
    world = dist.get_world_size(group)
    tables = stock_collections(model)
    if not tables:
        raise ValueError("shard_model: the model contains no EmbeddingBagCollection")
    plan = ShardingPlan({})
    for fqn, ebc in tables:
        optimizer.apply(ebc.parameters())
        if saved_plan is not None:
            module_plan = saved_plan.get_plan_for_module(fqn)
            if module_plan is None:
                raise ValueError(f"saved sharding plan has no entry for {fqn!r}")
            plan.plan[fqn] = module_plan
            continue
        plan.plan[fqn] = plan_collection(  # type: ignore[assignment]
            ebc,
            fqn,
            world,
            device,
            planning,
            group,
            optimizer.rowwise(),  # type: ignore[arg-type]
        )
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(group),
        device=device,
        plan=plan,
        sharders=[sharder()],  # type: ignore[list-item]
    )
    return attach_stores(dmp, dict(find_collections(model)), optimizer, planning, device, group)


def attach_stores(
    dmp: DistributedModelParallel,
    collections: Mapping[str, DimGrowEmbeddingBagCollection],
    optimizer: EmbeddingOptimizer,
    planning: PlanningConfig,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> ShardedModel:
    """One :class:`ShardedTableStore` per collection of an existing DMP, tables initialised.

    Refuses plans the re-plan cannot copy (data-parallel tables, non-fused kernels), naming
    the table; every table gets the DimGrow reference init, N(0, ``init_std``) weights and
    zero optimizer state.
    """
    stores: dict[str, ShardedTableStore] = {}
    for path, coll in collections.items():
        if not isinstance(coll.ebc, ShardedEmbeddingBagCollection):
            raise ValueError(f"{path}.ebc was not sharded by the DMP (is its path in the plan?)")
        store = ShardedTableStore(dmp, coll, optimizer, planning, device, group)
        _validate_plan(dmp, store)
        store.init_tables(coll.config.init_std)
        stores[path] = store
    return ShardedModel(dmp, stores)


def _validate_plan(dmp: DistributedModelParallel, store: ShardedTableStore) -> None:
    plan = dmp.plan.plan.get(store.fqn, {})
    for table, ps in plan.items():  # type: ignore[union-attr]
        if ps.sharding_type not in SUPPORTED_SHARDING or ps.compute_kernel != "fused":
            raise ValueError(
                f"table {table!r} is planned as {ps.sharding_type}/{ps.compute_kernel}; DimGrow re-plans need "
                f"the fused kernel and one of {SUPPORTED_SHARDING}: pass constraints=handle.constraints() "
                "to the planner"
            )
