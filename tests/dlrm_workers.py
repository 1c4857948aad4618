"""Per-rank bodies of the DLRM drop-in tests (importable by spawned processes).

Each worker is written the way a TorchRec user writes a DLRM script (stock planner, DMP,
KeyedOptimizerWrapper + CombinedOptimizer, TrainPipelineSparseDist); the DimGrow lines are
the ones marked ``# DimGrow``.
"""

from __future__ import annotations

import gc
import itertools
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.data import PreparedData, Split, load_prepared
from torchrec_dimgrow.swap import DimGrowHandle, export, swap_in
from torchrec_dimgrow.training import evaluate

D = 8
BATCH = 128


def categorical_tables(data: PreparedData, dim: int = D) -> list[EmbeddingBagConfig]:
    """One table per Criteo categorical field (the I fields feed the dense tower)."""
    return [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=v, feature_names=[f])
        for f, v in data.vocab().items()
        if f.startswith("C")
    ]


def build_dlrm(data: PreparedData, device: str = "meta") -> DLRMTrain:
    ebc = EmbeddingBagCollection(tables=categorical_tables(data), device=torch.device(device))
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=data.num_dense,
            dense_arch_layer_sizes=[16, D],
            over_arch_layer_sizes=[16, 1],
        )
    )


def batches(split: Split, rank: int, world: int, seed: int) -> Iterator[Batch]:
    """Endless shuffled epochs of this rank's share (the same global plan on every rank)."""
    for epoch in itertools.count():
        yield from split.batches(
            BATCH, shuffle=True, seed=seed, epoch=epoch, rank=rank, world_size=world, drop_last=True
        )


def logits_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    return model(batch)[1][1]


def _old_module_refs(handle: DimGrowHandle) -> list[weakref.ref]:
    return [weakref.ref(c.ebc) for c in handle.collections.values()]


def dlrm_pipeline_search(
    rank: int, world: int, cache_dir: str, steps: int, darts: bool, epoch_len: int
) -> dict[str, Any]:
    """Stock DLRM + DMP + TrainPipelineSparseDist with the swap; a forced re-plan mid-run.

    Training runs in "epochs" of ``epoch_len`` batches (the pipeline drains at each end),
    so the re-plan (at the 8th step) meets 2, 1 or 0 prefetched batches depending on it.
    """
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_prepared(cache_dir)
    device = torch.device("cpu")
    model = build_dlrm(data)
    # Started at dim 1 with a grow threshold below the initial gate value (0.5): every field
    # grows at every check (every 2 steps) and crosses capacity 4 at its 5th slot: a re-plan
    # at step 8 (the 4-row C9 stops at its row count). A later re-plan may land on the last
    # step; the pipeline re-attaches at its next batch, which the check below runs.
    cfg = DimGrowConfig(
        d_max=D,
        initial_dim=1,
        grow_threshold=0.3,
        shrink_threshold=0.001,
        check_interval=2,
    )
    handle = swap_in(model, cfg, align="project")  # DimGrow
    apply_optimizer_in_backward(torch.optim.Adagrad, handle.embedding_parameters(), {"lr": 0.05})
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        batch_size=BATCH,
        constraints=handle.constraints(),  # DimGrow
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    plan = planner.collective_plan(model, get_default_sharders(), dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.Adam(ps, lr=3e-3)
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    handle.attach(dmp, pipeline=pipeline, optimizer=optimizer)  # DimGrow
    torch.manual_seed(100 + rank)
    source = batches(data.train, rank, world, seed=0)
    expected = batches(data.train, rank, world, seed=0)  # what the pipeline must consume, in order
    val_it = batches(data.val, rank, world, seed=1)
    for group in dmp.fused_optimizer.param_groups:  # as an LR scheduler would
        group["lr"] = 0.04
    losses: list[float] = []
    refs: list[weakref.ref] = []
    replan_steps: list[int] = []
    replan_inflight: list[int] = []
    misaligned = 0
    dmp.train()
    while len(losses) < steps:
        epoch = itertools.islice(source, epoch_len)
        while True:
            try:
                loss, _logits, labels = pipeline.progress(epoch)
            except StopIteration:
                break
            losses.append(float(loss))
            misaligned += int(not torch.equal(labels, next(expected).labels))
            before, inflight = _old_module_refs(handle), len(pipeline.batches)
            report = handle.step(next(val_it) if darts else None)  # DimGrow
            if report is not None and report.replanned:
                replan_steps.append(len(losses))
                replan_inflight.append(inflight)
                refs += before
    pipeline.progress(itertools.islice(source, 1))  # a re-plan on the last step re-attaches here
    gc.collect()
    stale = sum(r() is not None for r in refs)
    with handle.unpipelined() as plain:
        val = evaluate(plain, data.val, BATCH, device, rank, world, forward=logits_of)
    found = handle.found_dims()
    out: dict[str, Any] = {
        "losses": losses,
        "replan_steps": replan_steps,
        "replans": handle.replans,
        "stale_modules": stale,
        "dims": handle.dims(),
        "found": found,
        "val_auc": val["auc"],
        "pipelined_current": [
            m is c.ebc for m, c in zip(pipeline._pipelined_modules, handle.collections.values())
        ],
        "misaligned_batches": misaligned,
        "replan_inflight": replan_inflight,
        "fused_lr": sorted({float(g["lr"]) for g in dmp.fused_optimizer.param_groups}),
        "fused_in_optimizer": any(sub is dmp.fused_optimizer for _, sub in optimizer.optimizers),
        "gates_in_dense": any(
            p is handle.gate_parameters()[0] for g in dense.param_groups for p in g["params"]
        ),
    }
    if rank == 0:
        out["export"] = _export_forward(data, found if any(found.values()) else handle.dims())
    return out


def _export_forward(data: PreparedData, found: dict[str, int]) -> dict[str, Any]:
    """Rebuild the user's DLRM, export the found dims into it, run a training step."""
    fresh = build_dlrm(data, device="cpu")
    export(fresh, found, align="project")
    coll = fresh.model.sparse_arch.embedding_bag_collection
    batch = next(data.test.batches(64))
    opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    loss, (_, logits, _) = fresh(batch)
    loss.backward()
    opt.step()
    return {
        "loss": float(loss),
        "logits_shape": list(logits.shape),
        "table_dims": coll.table_dims(),
        "type": type(coll).__name__,
        "finite": bool(torch.isfinite(logits).all()) and math.isfinite(float(loss)),
    }


def dlrm_budget_search(rank: int, world: int, cache_dir: str, steps: int, budget: float) -> dict[str, Any]:
    """The DLRM drop-in with ``DimGrowConfig.budget``: every field asks to grow at every check
    (grow threshold below the initial gate), so only the budget stops growth."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_prepared(cache_dir)
    device = torch.device("cpu")
    model = build_dlrm(data)
    cfg = DimGrowConfig(d_max=D, grow_threshold=0.3, shrink_threshold=0.001, check_interval=2, budget=budget)
    handle = swap_in(model, cfg, align="project")  # DimGrow
    apply_optimizer_in_backward(torch.optim.Adagrad, handle.embedding_parameters(), {"lr": 0.05})
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        batch_size=BATCH,
        constraints=handle.constraints(),  # DimGrow
    )
    plan = planner.collective_plan(model, get_default_sharders(), dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())), lambda ps: torch.optim.Adam(ps, lr=3e-3)
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    handle.attach(dmp, pipeline=pipeline, optimizer=optimizer)  # DimGrow
    (coll,) = handle.collections.values()
    source = itertools.islice(batches(data.train, rank, world, seed=0), steps)
    val_it = batches(data.val, rank, world, seed=1)
    used: list[int] = []
    dmp.train()
    while True:
        try:
            pipeline.progress(source)
        except StopIteration:
            break
        handle.step(next(val_it))  # DimGrow
        used.append(coll.embedding_bytes(physical=False))
    found = handle.found_dims()
    costs = dict(zip(coll.table_names, coll.dim_costs()))
    return {
        "dims": handle.dims(),
        "used": used,
        "budget": coll.budget_bytes(),
        "min_cost": min(costs.values()),
        "found_bytes": sum(costs[n] * d for n, d in found.items()),
    }
