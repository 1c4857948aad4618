"""Checkpoint and resume of a (sharded) DimGrow search.

Layout of ``DIR/checkpoint/``:
* ``search_state.json`` (rank 0): step/epoch/data position, policy counters, dims and
  capacities, best-epoch snapshot, trajectory so far;
* ``dcp/``: ``torch.distributed.checkpoint`` of the DMP state (sharded tables, gates,
  dense layers) and of the fused embedding optimizer state;
* ``rank{r}.pt``: each rank's dense/gate Adam state, RNG state, importance window,
  epoch gate means, rank-local buffers (BatchNorm statistics: each rank updates its own,
  DCP keeps one copy) and the sharding plan in force, so a resumed run places every
  table where the interrupted one had it and continues bit-exactly.

A checkpoint is written to ``checkpoint.tmp`` and swapped in only when every rank has
finished, so killing the job mid-save leaves the previous checkpoint intact. Rank 0 then
writes ``manifest.json`` (sha256 of every file, run config, data fingerprint: see
``torchrec_dimgrow/manifest.py``) and keeps the replaced checkpoint as ``checkpoint.prev``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.model_parallel import get_unwrapped_module
from torchrec.distributed.types import ShardingPlan

from torchrec_dimgrow.distributed.replan import find_fqn
from torchrec_dimgrow.manifest import write_manifest
from torchrec_dimgrow.policy import PolicyState

if TYPE_CHECKING:
    from torchrec_dimgrow.recipes.search import DimGrowSearch


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank_local_buffers(search: DimGrowSearch) -> dict[str, torch.Tensor]:
    """Buffers outside the DimGrow collection, e.g. BatchNorm running statistics.

    Each rank updates them from its own part of the global batch, so they differ across
    ranks, while DCP stores a replicated tensor once (rank 0's copy). Inside the
    collection every buffer is either sharded or identical on all ranks.
    """
    root = get_unwrapped_module(search.dmp)
    prefix = find_fqn(root, search.coll) + "."
    return {n: b.detach().clone() for n, b in root.named_buffers() if not n.startswith(prefix)}


def saved_plan(path: Path, rank: int) -> ShardingPlan | None:
    """The sharding plan a checkpoint was written under (``None`` for older checkpoints)."""
    local = torch.load(path / f"rank{rank}.pt", weights_only=False)
    plan = local.get("plan")
    return plan if isinstance(plan, ShardingPlan) else None


def _tensor_state(search: DimGrowSearch) -> dict[str, Any]:
    return {"model": search.dmp.state_dict(), "emb_optim": search.dmp.fused_optimizer.state_dict()}


def save_checkpoint(search: DimGrowSearch, path: Path) -> None:
    """Write a complete checkpoint of ``search`` to ``path`` (collective: all ranks call)."""
    tmp = path.with_name(path.name + ".tmp")
    rank = search.env.rank
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_tensor_state(search), checkpoint_id=str(tmp / "dcp"))
    torch.save(
        {
            "dense_opt": search.dense_opt.state_dict(),
            "gate_opt": search.gate_opt.state_dict(),
            "rng": torch.get_rng_state(),
            "importance_total": search.importance.total,
            "importance_count": search.importance.count,
            "epoch_gates_total": search.epoch_gates.total,
            "epoch_gates_count": search.epoch_gates.count,
            "buffers": _rank_local_buffers(search),
            "plan": search.dmp.plan,
        },
        tmp / f"rank{rank}.pt",
    )
    if rank == 0:
        meta = {
            "state": asdict(search.state),
            "policy": asdict(search.policy),
            "dims": search.coll.post.dims_list(),
            "capacity": search.coll.post.capacity_list(),
            "trajectory": search.trajectory,
            "world_size": search.env.world_size,
        }
        (tmp / "search_state.json").write_text(json.dumps(meta))
    _barrier()
    if rank == 0:
        opts = search.opts
        write_manifest(
            tmp,
            config=opts.run_config,
            data=opts.data_fingerprint,
            world_size=search.env.world_size,
            step=search.state.step,
        )
        rotate(tmp, path, discard_latest=opts.discard_latest)
        opts.discard_latest = False
    _barrier()


def rotate(tmp: Path, path: Path, discard_latest: bool = False) -> None:
    """Publish ``tmp`` as ``path``, keeping the one before as ``path.prev`` (two checkpoints).

    ``discard_latest``: the current ``path`` failed verification at resume; it is set
    aside as ``path.damaged`` instead of replacing the intact previous checkpoint.
    """
    prev = path.with_name(path.name + ".prev")
    if path.exists():
        if discard_latest:
            damaged = path.with_name(path.name + ".damaged")
            shutil.rmtree(damaged, ignore_errors=True)
            path.rename(damaged)
        else:
            shutil.rmtree(prev, ignore_errors=True)
            path.rename(prev)
    tmp.rename(path)


def resolve(path: Path) -> Path:
    """Accept a run directory or the checkpoint directory itself."""
    for candidate in (path, path / "checkpoint", path / "checkpoint.prev"):
        if (candidate / "search_state.json").is_file():
            return candidate
    raise FileNotFoundError(f"no DimGrow checkpoint under {path} (expected search_state.json)")


def load_checkpoint(search: DimGrowSearch, path: Path) -> None:
    """Restore tensors and state into a search whose model was built at the saved capacities."""
    from torchrec_dimgrow.recipes.search import SearchState

    path = resolve(path)
    meta = json.loads((path / "search_state.json").read_text())
    saved_world, world = int(meta["world_size"]), search.env.world_size
    elastic = saved_world != world
    state = _tensor_state(search)  # DCP reshards the saved tables onto this run's plan
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    search.dmp.load_state_dict(state["model"])
    search.dmp.fused_optimizer.load_state_dict(state["emb_optim"])
    # On another world size, rank r takes rank (r mod saved) 's local state: the dense and
    # gate Adam states are replicated anyway; importance windows and BatchNorm statistics
    # are one rank's instead of this rank's (a small, documented approximation).
    local = torch.load(path / f"rank{search.env.rank % saved_world}.pt", weights_only=False)
    search.dense_opt.load_state_dict(local["dense_opt"])
    search.gate_opt.load_state_dict(local["gate_opt"])
    search.importance.total.copy_(local["importance_total"])
    search.importance.count = int(local["importance_count"])
    if "epoch_gates_total" in local:  # absent in checkpoints written before final_gates existed
        search.epoch_gates.total.copy_(local["epoch_gates_total"])
        search.epoch_gates.count.copy_(local["epoch_gates_count"])
    buffers = dict(get_unwrapped_module(search.dmp).named_buffers())
    for name, value in local.get("buffers", {}).items():
        buffers[name].copy_(value)
    raw = meta["state"]
    if elastic:  # continue each split where the rows consumed so far end
        raw = {**raw, **{k: raw[k] * saved_world // world for k in ("batch_in_epoch", "val_batch")}}
    search.state = SearchState(**raw)
    search.policy = PolicyState(**meta["policy"])
    search.trajectory = list(meta["trajectory"])
    if not elastic:  # with other ranks the RNG streams differ anyway: reseed per rank
        torch.set_rng_state(local["rng"])
        search.restored_rng = True
