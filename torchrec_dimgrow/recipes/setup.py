"""What every recipe does before it trains: output-directory rules, the run lock, and the
data prepared on rank 0 (every rank learns of a failure, so none is left waiting).

Every refusal is one :class:`~torchrec_dimgrow.errors.DimGrowError` line; the CLI prints it
and exits 2 on every rank.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from torchrec_dimgrow.data import PreparedData, load_prepared, prepare
from torchrec_dimgrow.data.blocks import BlockConfig
from torchrec_dimgrow.distributed.env import DistEnv
from torchrec_dimgrow.errors import DataError, DimGrowError, DirectoryInUse, UsageError
from torchrec_dimgrow.runconfig import DataConfig
from torchrec_dimgrow.runlock import run_lock

SEARCH_OUTPUTS = (
    "dims.json",
    "metrics.json",
    "gates.json",
    "config.json",
    "trajectory.csv",
    "checkpoint",
    "checkpoint.prev",
    "votes",
)
STREAM_OUTPUTS = ("versions", "stream_metrics.jsonl")
"""What ``search --stream`` writes besides :data:`SEARCH_OUTPUTS`."""
RETRAIN_OUTPUTS = ("metrics.json", "model")


def local_env() -> DistEnv:
    """The 1-rank CPU world of the recipes that run without a process group."""
    return DistEnv(0, 1, 0, torch.device("cpu"), "none")


# ---------------------------------------------------------------- data
def prepare_on_rank0(
    data: DataConfig,
    cache: Path,
    env: DistEnv,
    batch_size: int | None = None,
    blocks: BlockConfig | None = None,
) -> PreparedData:
    """Rank 0 prepares the data; every rank learns of a failure (no rank left waiting).

    ``batch_size``: refuse a batch (times the world size) larger than the train split.
    ``blocks``: the rule that cuts each field into frequency blocks (default rule if None).
    """
    error: list[str | None] = [None]
    if env.is_main:
        try:
            prepare(
                data.path,
                data.format,
                cache,
                label_col=data.label_col,
                drop_cols=list(data.drop_cols),
                min_count=data.min_count,
                blocks=blocks,
            )
        except (DataError, OSError, ValueError) as exc:
            error = [str(exc)]
    agree(error, env)
    prepared = load_prepared(cache)
    check_meaningful(prepared, batch_size, env.world_size)
    return prepared


def agree(error: list[str | None], env: DistEnv, kind: type[DimGrowError] = DataError) -> None:
    """Share rank 0's error (or None) with every rank, so all stop together with one message."""
    if env.world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise kind(str(error[0]))


def check_meaningful(data: PreparedData, batch_size: int | None, world: int) -> None:
    """Refuse runs whose result would mean nothing: no training step, undefined AUC."""
    if batch_size is not None and data.train.num_batches(batch_size, world, drop_last=True) == 0:
        raise UsageError(
            f"--batch-size {batch_size} x {world} rank(s) exceeds the {len(data.train)} train rows: "
            "no training step would run"
        )
    for split in ("val", "test"):
        labels = getattr(data, split).labels
        rows, pos = len(labels), int(labels.sum())
        if pos in (0, rows):
            raise DataError(
                f"the {split} split has only label {0 if pos == 0 else 1} ({rows} rows): AUC is undefined, "
                "so no epoch could be judged"
            )


# ---------------------------------------------------------------- output directories
def lock_out(stack: contextlib.ExitStack, out: Path, env: DistEnv) -> None:
    """Rank 0 locks ``out`` for the rest of the run (``runlock``); every rank learns a refusal."""
    error: list[str | None] = [None]
    if env.is_main:
        try:
            stack.enter_context(run_lock(out))
        except DirectoryInUse as exc:
            error = [str(exc)]
    agree(error, env, DirectoryInUse)


def previous_run(out: Path, outputs: Sequence[str]) -> str | None:
    """The first output file of an earlier run found in ``out`` (None: nothing to clobber)."""
    if not out.is_dir():
        return None
    return next((name for name in outputs if (out / name).exists()), None)


def check_out_dir(out: Path, outputs: Sequence[str], overwrite: bool, resuming: bool = False) -> None:
    """Refuse to mix with or silently replace an earlier run's files."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    found = previous_run(out, outputs)
    if found is not None and not (overwrite or resuming):
        raise UsageError(
            f"--out {out} holds a previous run ({found}); pass --overwrite to replace it"
            + (" or --resume to continue it" if "checkpoint" in outputs else "")
        )


def clear_previous(out: Path, outputs: Sequence[str]) -> None:
    """Remove an earlier run's outputs (``--overwrite``) so old and new files never mix."""
    for name in outputs:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class OutputGuard:
    """Remembers what ``out`` held before the run, to remove only what a failed run added."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.existed = out.exists()
        self.before = {p.name for p in out.iterdir()} if out.is_dir() else set()

    def discard_new(self, keep: Sequence[str] = ()) -> None:
        if not self.out.is_dir():
            return
        if not self.existed and not keep:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        for path in self.out.iterdir():
            if path.name not in self.before and path.name not in keep:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
