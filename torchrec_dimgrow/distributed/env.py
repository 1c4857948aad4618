"""Process-group setup shared by ``torchrun`` launches and plain single-process runs."""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from torchrec_dimgrow.errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend() -> str:
    """nccl when this process can see a GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def check_backend(backend: str, local_rank: int = 0) -> None:
    """Refuse a backend this process cannot run, naming the flag instead of a torch trace.

    Without it ``run.backend=nccl`` on a CPU machine (or a rank beyond the visible GPUs)
    fails inside ``init_process_group`` / ``cuda.set_device`` with a RuntimeError.
    """
    if backend not in ("gloo", "nccl"):
        raise UsageError(f"run.backend / DIMGROW_BACKEND: unknown backend {backend!r} (gloo or nccl)")
    if backend != "nccl":
        return
    if not (dist.is_nccl_available() and torch.cuda.is_available()):
        raise UsageError(
            "run.backend nccl needs CUDA GPUs and a torch build with NCCL; this process has "
            f"{'no NCCL' if not dist.is_nccl_available() else 'no visible GPU'}: use run.backend=gloo"
        )
    if local_rank >= torch.cuda.device_count():
        raise UsageError(
            f"run.backend nccl: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
            "launch at most one rank per GPU"
        )


def init_distributed(backend: str | None = None) -> DistEnv:
    """Join the process group ``torchrun`` describes, or make a 1-rank group.

    The same search code then runs with 1 or N ranks: a plain ``python -m
    torchrec_dimgrow search`` is a world of size 1, so there is one code path to test.
    """
    backend = backend or os.environ.get("DIMGROW_BACKEND") or default_backend()
    if not dist.is_initialized():
        check_backend(backend, int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    world = dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistEnv(rank, world, local_rank, device, dist.get_backend())


def destroy_distributed(synchronize: bool = False) -> None:
    """Leave the process group.

    ``synchronize`` (the success path): wait at a barrier first, so every rank leaves the
    group together instead of one tearing down its gloo connections while a peer still works
    (rank 0 writing outputs). Never on an error path: a failed peer would never reach the
    barrier. The abort some finished ranks met at exit is handled by :func:`exit_rank`.
    """
    if not dist.is_initialized():
        return
    if synchronize and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """Exit this process with ``code``; a finished rank of a multi-process run skips teardown.

    Gloo's worker threads may still be freeing a completed collective (its work object holds
    tensors with Python references) when CPython finalizes; the thread then dies waiting for
    the GIL inside a destructor and the process aborts: "terminate called without an active
    exception", exit -6, and torchrun reports the run failed (core dump: ``~AsyncAllgatherWork``
    -> ``decref_pyobject`` -> ``take_gil`` in ``ProcessGroupGloo::runLoop`` while the main
    thread is in ``Py_FinalizeEx``; pytorch/pytorch#190489). It hit 4 of 12 2-rank runs of
    ``examples/dlrm_criteo.py`` on this 2-core machine. So code 0 with ``WORLD_SIZE > 1``
    flushes and leaves with ``os._exit``: call this last, once every output is written and
    closed. Any other code exits normally: torchrun stops the peers as soon as one rank exits
    non-zero, and a fast exit there would cut off their own error lines.
    """
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)
    sys.exit(code)
