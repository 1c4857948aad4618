"""Run a function on N real processes (gloo, CPU), as torchrun would."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child process, without the rendezvous variables an
    in-process 1-rank run left behind: a child would otherwise try to listen on that run's
    port, which may be taken by then (EADDRINUSE)."""
    return {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS}, **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    dist.init_process_group("gloo")
    try:
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():  # a body may leave the group itself
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int = 2, *args: Any, timeout: float = 300) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes; return per-rank results."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    results: dict[int, Any] = {}
    errors = []
    while not queue.empty():
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = payload
        else:
            errors.append(f"rank {rank}:\n{payload}")
    if errors:
        raise AssertionError("\n".join(errors))
    if alive or len(results) != world:
        raise AssertionError(f"ranks did not finish (alive={len(alive)}, results={sorted(results)})")
    return [results[r] for r in range(world)]


def dcp_tensors(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Every tensor of a ``torch.distributed.checkpoint`` dir, by flattened key (any world size)."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(directory, os.path.join(tmp, "all.pt"))
        state = torch.load(os.path.join(tmp, "all.pt"), weights_only=False)

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}/{key}").items()}
        return {prefix: value}

    return flat(state, "")


def same_tensors(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ (or exist on one side only); [] when identical."""
    import torch

    def equal(x: Any, y: Any) -> bool:
        return torch.equal(x, y) if isinstance(x, torch.Tensor) else bool(x == y)

    return [k for k in sorted(set(a) | set(b)) if k not in a or k not in b or not equal(a[k], b[k])]
