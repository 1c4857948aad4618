"""Checkpoint and resume of a sharded training run: a component that recipes call.

The component never reaches into a recipe: the caller hands it the things that have state
(the ``DistributedModelParallel``, every optimizer, the :class:`DimGrowController`, any
other object with ``state_dict``/``load_state_dict``) plus a JSON-able *run state* (data
position, best epoch, whatever the recipe needs to continue), after torchtune's
``CheckpointClient``.

Layout of a checkpoint directory:

* ``search_state.json`` (rank 0): the run state, written as given, plus ``world_size``;
* ``dcp/``: ``torch.distributed.checkpoint`` of the DMP state (sharded tables, gates,
  dense layers) and of its fused embedding optimizer state;
* ``rank{r}.pt``: each rank's ``state_dict()`` of every stateful object, its RNG state,
  its rank-local buffers (BatchNorm statistics: each rank updates its own, DCP keeps one
  copy) and the sharding plan in force, so a resumed run places every table where the
  interrupted one had it and continues bit-exactly.

A checkpoint is written to ``NAME.tmp`` and swapped in only when every rank has finished,
so killing the job mid-save leaves the previous checkpoint intact. Rank 0 then writes
``manifest.json`` (sha256 of every file, run config, data fingerprint: see
``torchrec_dimgrow/manifest.py``) and keeps the replaced checkpoint as ``NAME.prev``.

The ranks agree on the outcome of each step of a save, so a rank whose disk is full stops
every rank with one :class:`~torchrec_dimgrow.errors.DiskError` (``NAME.tmp`` removed)
instead of leaving the others at a barrier; a Ctrl-C cannot land between the renames that
publish a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.distributed.types import ShardingPlan

from torchrec_dimgrow.diskwrite import agreed_write, deferred_sigint, disk_errors
from torchrec_dimgrow.manifest import file_shares, hash_files, write_manifest
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection

STATE_FILE = "search_state.json"


@dataclass
class Restored:
    """What :meth:`CheckpointClient.load` found: the run state and how it was written."""

    run_state: dict[str, Any]
    saved_world_size: int
    rng_restored: bool


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


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
        if (candidate / STATE_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no DimGrow checkpoint under {path} (expected {STATE_FILE})")


def read_run_state(path: Path) -> dict[str, Any]:
    """The run state a checkpoint holds (what to rebuild before the tensors are loaded)."""
    return dict(json.loads((resolve(path) / STATE_FILE).read_text()))


def saved_plan(path: Path, rank: int) -> ShardingPlan | None:
    """The sharding plan a checkpoint was written under (``None`` for older checkpoints)."""
    local = torch.load(resolve(path) / f"rank{rank}.pt", weights_only=False)
    plan = local.get("plan")
    return plan if isinstance(plan, ShardingPlan) else None


def _rank_local_buffers(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """Buffers outside the DimGrow collections, e.g. BatchNorm running statistics.

    Each rank updates them from its own part of the global batch, so they differ across
    ranks, while DCP stores a replicated tensor once (rank 0's copy). Inside a collection
    every buffer is either sharded or identical on all ranks.
    """
    root = get_unwrapped_module(dmp)
    prefixes = tuple(f"{n}." for n, m in root.named_modules() if isinstance(m, DimGrowEmbeddingBagCollection))
    return {n: b.detach().clone() for n, b in root.named_buffers() if not n.startswith(prefixes)}


class AliasingSavePlanner(DefaultSavePlanner):
    """DCP's default save plan, but a CPU view into a larger buffer is written without a copy.

    Why: tables grouped in one TBE are views into its flat weight/optimizer buffers, and
    DCP's file writer clones every tensor whose storage is larger than itself and keeps
    each clone until the whole rank file is written: one extra copy of all tables and
    their optimizer state at the save (+51.5 MiB in the memory benchmark while
    tables shared TBEs). A contiguous view is handed over as a tensor of its own storage
    over the same memory (via numpy, no copy); the bytes written are the same.
    """

    def resolve_data(self, write_item: WriteItem) -> Any:
        data = super().resolve_data(write_item)
        if (
            isinstance(data, torch.Tensor)
            and data.device.type == "cpu"
            and data.is_contiguous()
            and data.untyped_storage().nbytes() != data.nbytes
            and data.dtype in _NUMPY_DTYPES
        ):
            return torch.from_numpy(data.detach().numpy())
        return data


_NUMPY_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
)


def _tensor_state(dmp: DistributedModelParallel) -> dict[str, Any]:
    return {"model": dmp.state_dict(), "emb_optim": dmp.fused_optimizer.state_dict()}


class CheckpointClient:
    """Saves and restores a DMP, named stateful objects and a run state (collective calls).

    Args:
        dmp: the sharded model (tables, dense layers and its fused optimizer go to DCP).
        stateful: name -> object with ``state_dict``/``load_state_dict`` (optimizers, the
            controller, accumulators); each rank saves its own copy.
        rank, world_size: this process and the world.
    """

    def __init__(
        self,
        dmp: DistributedModelParallel,
        stateful: Mapping[str, Stateful],
        rank: int,
        world_size: int,
    ) -> None:
        self.dmp = dmp
        self.stateful = dict(stateful)
        self.rank = rank
        self.world_size = world_size

    def save(
        self,
        path: Path,
        run_state: Mapping[str, Any],
        manifest: Mapping[str, Any] | None = None,
        discard_latest: bool = False,
    ) -> None:
        """Write a complete checkpoint to ``path`` (all ranks call; rank 0's run state is kept).

        ``manifest`` (``config``, ``data``, ``step``): rank 0 also writes ``manifest.json``
        (sha256 of every file, see :mod:`torchrec_dimgrow.manifest`; each rank hashes a
        share of the files and rank 0 gathers them). The checkpoint it
        replaces is kept as ``NAME.prev`` (``discard_latest``: set aside as
        ``NAME.damaged`` instead, when resume found it broken).
        """
        tmp = path.with_name(path.name + ".tmp")
        with disk_errors(path, partial=[tmp] if self.rank == 0 else []):
            self._agreed(path, lambda: self._start(tmp))
            self._agreed(path, lambda: self._write(tmp, run_state))
            entries = self._hash_shares(tmp) if manifest is not None else None
            self._agreed(path, lambda: self._publish(tmp, path, manifest, entries, discard_latest))

    def _start(self, tmp: Path) -> None:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def _write(self, tmp: Path, run_state: Mapping[str, Any]) -> None:
        """This rank's part: its DCP shards, its local state (and rank 0 the run state)."""
        dcp.save(_tensor_state(self.dmp), checkpoint_id=str(tmp / "dcp"), planner=AliasingSavePlanner())
        torch.save(
            {
                "stateful": {name: obj.state_dict() for name, obj in self.stateful.items()},
                "rng": torch.get_rng_state(),
                "buffers": _rank_local_buffers(self.dmp),
                "plan": self.dmp.plan,
            },
            tmp / f"rank{self.rank}.pt",
        )
        if self.rank == 0:
            (tmp / STATE_FILE).write_text(json.dumps({**run_state, "world_size": self.world_size}))

    def _publish(
        self,
        tmp: Path,
        path: Path,
        manifest: Mapping[str, Any] | None,
        entries: dict[str, dict[str, Any]] | None,
        discard_latest: bool,
    ) -> None:
        """Rank 0: the manifest, then the renames that make ``tmp`` the latest checkpoint."""
        if self.rank != 0:
            return
        if manifest is not None:
            write_manifest(tmp, world_size=self.world_size, entries=entries, **manifest)
        with deferred_sigint():
            rotate(tmp, path, discard_latest=discard_latest)

    def _agreed(self, path: Path, step: Callable[[], None]) -> None:
        agreed_write(path, step, self.world_size)

    def _hash_shares(self, tmp: Path) -> dict[str, dict[str, Any]]:
        """Every file's manifest entry; each rank hashes one :func:`file_shares` share."""
        mine = hash_files(tmp, file_shares(tmp, self.world_size)[self.rank])
        if self.world_size == 1:
            return mine
        if not (dist.is_initialized() and dist.get_world_size() == self.world_size):
            raise RuntimeError(f"checkpoint of {self.world_size} ranks saved without their process group")
        shares: list[dict[str, dict[str, Any]] | None] = [None] * self.world_size
        dist.all_gather_object(shares, mine)
        return {name: entry for share in shares for name, entry in (share or {}).items()}

    def load(self, path: Path, optional: tuple[str, ...] = ()) -> Restored:
        """Restore every tensor and stateful object from ``path``; return its run state.

        The model must already be built at the checkpoint's table widths (and sharded
        with its :func:`saved_plan`, or planned afresh on another world size). Names in
        ``optional`` may be missing from older checkpoints; those objects keep their fresh
        state. On another world size DCP reshards the tables onto this run's plan, rank
        ``r`` takes rank ``r mod saved``'s local state (the dense and gate optimizer states
        are replicated anyway; importance windows and BatchNorm statistics become one
        rank's), and the RNG is not restored (the caller reseeds per rank).
        """
        path = resolve(path)
        run_state = read_run_state(path)
        saved_world = int(run_state["world_size"])
        state = _tensor_state(self.dmp)
        dcp.load(state, checkpoint_id=str(path / "dcp"))
        self.dmp.load_state_dict(state["model"])
        self.dmp.fused_optimizer.load_state_dict(state["emb_optim"])
        local = torch.load(path / f"rank{self.rank % saved_world}.pt", weights_only=False)
        saved = local["stateful"]
        for name, obj in self.stateful.items():
            if name in saved:
                obj.load_state_dict(saved[name])
            elif name not in optional:
                raise ValueError(f"{path}: checkpoint holds no state for {name!r}")
        buffers = dict(get_unwrapped_module(self.dmp).named_buffers())
        for name, value in local.get("buffers", {}).items():
            buffers[name].copy_(value)
        same_world = saved_world == self.world_size
        if same_world:
            torch.set_rng_state(local["rng"])
        return Restored(run_state, saved_world, rng_restored=same_world)
