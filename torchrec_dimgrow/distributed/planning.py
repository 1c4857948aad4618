"""Sharding plans for DimGrow tables with TorchRec's own planner and sharder.

The collection keeps its tables in a stock ``EmbeddingBagCollection`` child, so the stock
``EmbeddingBagCollectionSharder`` shards it and no custom sharder is needed. What this
module adds is the DimGrow-specific policy: every table is constrained to the fused
(FBGEMM TBE) kernel with sharding types whose shard widths stay multiples of 4, and
row-wise plans (which TorchRec's planner does not offer on CPU) are built by hand.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

ShardingChoice = Literal["auto", "table_wise", "column_wise", "table_column_wise", "row_wise"]

#: Types the planner may pick under "auto": all keep fused-kernel widths a multiple of 4
#: when the table width is, and all carry a fused optimizer state we can copy.
AUTO_TYPES = ["table_wise", "column_wise", "table_column_wise"]


@dataclass
class PlanningConfig:
    """How tables are placed at sharding time and at every re-plan.

    ``keep_placement``: a re-plan keeps each table whose width changes on the ranks that
    hold it when its shards hold whole rows (table-wise, row-wise, a single column shard):
    only its width changes, no row crosses ranks, and each rank rewidths its rows in
    memory. The planner then places nothing at a re-plan but tables split by columns.
    ``False``: the planner re-places every table whose width changed (which may move it to
    another rank, through the spill file).
    """

    sharding: ShardingChoice = "auto"
    batch_size: int = 256
    min_partition: int = 4
    keep_placement: bool = True


def validate_configs(configs: list[EmbeddingBagConfig], block: int = 4) -> None:
    """Fail before planning (``collective_plan`` hangs the other ranks if rank 0 raises)."""
    for c in configs:
        if c.embedding_dim % block:
            raise ValueError(
                f"table {c.name!r}: physical width {c.embedding_dim} is not a multiple of {block} "
                "(FBGEMM's fused kernel rejects it)"
            )
        if c.num_embeddings <= 0:
            raise ValueError(f"table {c.name!r}: num_embeddings must be > 0")


def constraints_for(
    configs: list[EmbeddingBagConfig], cfg: PlanningConfig, rowwise_state: bool = False
) -> dict[str, ParameterConstraints]:
    """Fused kernel only; no column split when the optimizer keeps one state per row."""
    types = AUTO_TYPES if cfg.sharding == "auto" else [cfg.sharding]
    if rowwise_state:
        if cfg.sharding in ("column_wise", "table_column_wise"):
            raise ValueError(f"sharding {cfg.sharding!r} is not supported with a row-wise optimizer state")
        types = [t for t in types if t not in ("column_wise", "table_column_wise")]
    return {
        c.name: ParameterConstraints(
            sharding_types=list(types), compute_kernels=["fused"], min_partition=cfg.min_partition
        )
        for c in configs
    }


def make_planner(
    world_size: int,
    device: torch.device,
    configs: list[EmbeddingBagConfig],
    cfg: PlanningConfig,
    rowwise_state: bool = False,
) -> EmbeddingShardingPlanner:
    return EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type),
        batch_size=cfg.batch_size,
        constraints=constraints_for(configs, cfg, rowwise_state),
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
    )


def _hand_built(
    ebc: EmbeddingBagCollection, kind: str, world_size: int, device: torch.device
) -> EmbeddingModuleShardingPlan:
    """Deterministic plans for types the CPU planner refuses (row-wise) or when asked to."""
    gens = {}
    for i, c in enumerate(ebc.embedding_bag_configs()):
        if kind == "row_wise":
            gens[c.name] = row_wise(compute_kernel="fused")
        elif kind == "table_wise":
            gens[c.name] = table_wise(rank=i % world_size, compute_kernel="fused")
        else:
            gens[c.name] = column_wise(ranks=list(range(world_size)), compute_kernel="fused")
    return construct_module_sharding_plan(
        ebc,
        gens,
        sharder=EmbeddingBagCollectionSharder(),
        local_size=world_size,
        world_size=world_size,
        device_type=device.type,
    )


def plan_collection(
    ebc: EmbeddingBagCollection,
    fqn: str,
    world_size: int,
    device: torch.device,
    cfg: PlanningConfig,
    group: dist.ProcessGroup | None = None,
    rowwise_state: bool = False,
) -> EmbeddingModuleShardingPlan:
    """Plan one EBC (at its current physical widths) and return its module plan.

    ``auto``/``table_wise``/``column_wise``/``table_column_wise`` go through TorchRec's
    ``EmbeddingShardingPlanner.collective_plan`` (rank 0 plans, all ranks receive);
    ``row_wise`` is built by hand because the CPU planner does not offer it.
    """
    configs = ebc.embedding_bag_configs()
    validate_configs(configs)
    if cfg.sharding == "row_wise":
        return _hand_built(ebc, cfg.sharding, world_size, device)
    holder = nn.Module()
    holder.add_module("ebc", ebc)
    planner = make_planner(world_size, device, configs, cfg, rowwise_state)
    sharders = [EmbeddingBagCollectionSharder()]
    if group is not None and dist.is_initialized():
        plan: ShardingPlan = planner.collective_plan(holder, sharders, group)  # type: ignore[arg-type]
    else:
        plan = planner.plan(holder, sharders)  # type: ignore[arg-type]
    module_plan = plan.get_plan_for_module("ebc")
    if module_plan is None:
        raise RuntimeError(f"planner returned no plan for {fqn!r}")
    return module_plan  # type: ignore[return-value]


def pin_width(ps: ParameterSharding | None, old: int, new: int) -> ParameterSharding | None:
    """``ps`` at width ``new``, every shard on the rank it was; ``None`` unless every shard
    holds whole rows (table-wise, row-wise, or a column split into a single column
    shard), the layouts whose shards a width change does not split."""
    shards = getattr(ps.sharding_spec, "shards", None) if ps is not None else None
    if ps is None or not shards:
        return None
    if any(int(m.shard_offsets[1]) != 0 or int(m.shard_sizes[1]) != old for m in shards):
        return None
    pinned = copy.deepcopy(ps)
    for m in pinned.sharding_spec.shards:  # type: ignore[union-attr]
        m.shard_sizes[1] = new
    return pinned
