"""Shard any model that contains DimGrow collections, and keep handles to re-plan them.

``shard_model`` is what a user calls instead of building ``DistributedModelParallel``
themselves: it attaches the fused embedding optimizer, plans every DimGrow collection's
tables with TorchRec's planner, builds the DMP with TorchRec's stock sharder, and returns
one :class:`ShardedTableStore` per collection for later re-plans.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from torchrec_dimgrow.distributed.planning import PlanningConfig, plan_collection
from torchrec_dimgrow.distributed.table_store import ShardedTableStore
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.optim import EmbeddingOptimizer


def find_collections(model: nn.Module) -> list[tuple[str, DimGrowEmbeddingBagCollection]]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, DimGrowEmbeddingBagCollection)]
    if not found:
        raise ValueError("model contains no DimGrowEmbeddingBagCollection")
    return found


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
    """Build the DMP for ``model``; DimGrow tables must still be on the meta device.

    ``saved_plan`` (a resumed search's ``dmp.plan``) places every collection exactly where
    the interrupted run had it. Re-plans only move the tables whose width changed, so
    after a few of them the placement depends on the search's history, and planning
    afresh would put tables on other ranks: the weights would still load (DCP re-shards),
    but each rank would then initialise different new columns from its own random stream
    and the resumed search would drift from the uninterrupted one.
    """
    planning = planning or PlanningConfig()
    optimizer = optimizer or EmbeddingOptimizer()
    group = group if group is not None else dist.GroupMember.WORLD
    world = dist.get_world_size(group)
    collections = find_collections(model)
    plan = ShardingPlan({})
    for path, coll in collections:
        optimizer.apply(coll.ebc.parameters())
        fqn = f"{path}.ebc" if path else "ebc"
        if saved_plan is not None:
            module_plan = saved_plan.get_plan_for_module(fqn)
            if module_plan is None:
                raise ValueError(f"saved sharding plan has no entry for {fqn!r}")
            plan.plan[fqn] = module_plan
            continue
        plan.plan[fqn] = plan_collection(  # type: ignore[assignment]
            coll.ebc,
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
        sharders=[EmbeddingBagCollectionSharder()],  # type: ignore[list-item]
    )
    stores = {}
    for path, coll in collections:
        store = ShardedTableStore(dmp, coll, optimizer, planning, device, group)
        store.init_tables(coll.config.init_std)
        stores[path] = store
    return ShardedModel(dmp, stores)
