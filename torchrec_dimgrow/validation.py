"""Checks the CLI runs before anything is written: flag ranges, output directories, resume.

Every check raises :class:`~torchrec_dimgrow.errors.UsageError` with one line that names
the flag, so ``main()`` can print it and exit 2 on every rank. A new numeric flag gets its
range by adding one entry to :data:`RANGES` (keyed by the argparse ``dest``); flags absent
from a subcommand are skipped, so one table serves search, retrain and later subcommands.
"""

from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchrec_dimgrow.errors import UsageError


@dataclass(frozen=True)
class Bound:
    """Allowed interval of a numeric flag; ``*_open`` excludes the end point itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        assert self.high is not None
        return f"{'<' if self.high_open else '<='} {_num(self.high)}"

    def holds(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


def _num(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() else str(x)


POSITIVE = Bound(0, low_open=True)
AT_LEAST_1 = Bound(1)
NON_NEGATIVE = Bound(0)
MAX_DIM = 256
"""Upper bound of ``--d-max``/``--uniform-dim``: DimGrow searches small per-field dims (the
paper stops at 16-64); a larger value is almost always a typo that would allocate
``vocab x d`` floats per table before failing."""

RANGES: dict[str, Bound] = {
    # data
    "min_count": AT_LEAST_1,
    # training (search and retrain)
    "epochs": AT_LEAST_1,
    "batch_size": AT_LEAST_1,
    "seed": Bound(0, 2**32 - 1),  # numpy's seed range
    "lr": POSITIVE,
    "max_steps": AT_LEAST_1,
    "patience": AT_LEAST_1,
    "threads": Bound(1, 4096),
    # search
    "d_max": Bound(1, MAX_DIM),
    "initial_dim": Bound(1, MAX_DIM),  # None = "block"
    "alpha": NON_NEGATIVE,
    "budget_pressure": NON_NEGATIVE,
    "votes": AT_LEAST_1,
    "gate_lr": POSITIVE,
    "check_interval": AT_LEAST_1,
    "grow_threshold": Bound(0, 1, low_open=True),
    "grow_price_exponent": NON_NEGATIVE,
    "shrink_threshold": Bound(0, 1, high_open=True),
    "grow_patience": AT_LEAST_1,
    "shrink_patience": AT_LEAST_1,
    "embedding_lr": POSITIVE,
    "checkpoint_every": NON_NEGATIVE,
    "log_every": NON_NEGATIVE,
    "publish_every": AT_LEAST_1,  # search --stream
    "keep_versions": AT_LEAST_1,
    # retrain
    "uniform_dim": Bound(1, MAX_DIM),
    # export
    "row_alignment": AT_LEAST_1,
}


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_ranges(args: argparse.Namespace, ranges: dict[str, Bound] | None = None) -> None:
    """Every numeric flag present in ``args`` (and not None) lies in its :data:`RANGES` interval."""
    for dest, bound in (RANGES if ranges is None else ranges).items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):
            continue
        if not bound.holds(value):
            raise UsageError(f"{flag_name(dest)} must be {bound.describe()}, got {_num(value)}")
    grow, shrink = getattr(args, "grow_threshold", None), getattr(args, "shrink_threshold", None)
    if grow is not None and shrink is not None and not shrink < grow:
        raise UsageError(f"--shrink-threshold ({shrink}) must be below --grow-threshold ({grow})")


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests the user actually typed (argparse cannot tell a default from a typed value).

    Re-parses ``argv`` with every default replaced by ``SUPPRESS``, so only typed flags
    appear in the namespace. Used by ``--resume`` to refuse flags that contradict the
    checkpoint while letting untyped ones take the saved values.
    """
    for action in _all_actions(parser):
        if action.dest != "command" and not isinstance(action, argparse._SubParsersAction):
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv))))


def _all_actions(parser: argparse.ArgumentParser) -> Iterable[argparse.Action]:
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


# ---------------------------------------------------------------- output directories
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
STREAM_OUTPUTS = ("versions", "stream_metrics.jsonl")  # besides SEARCH_OUTPUTS, with search --stream
RETRAIN_OUTPUTS = ("metrics.json", "model")


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


# ---------------------------------------------------------------- resume
RUN_CONTROL = frozenset(
    {
        "command",
        "resume",
        "out",
        "overwrite",
        "quiet",
        "log_level",
        "threads",
        "backend",
        "tensorboard",
        "cache_dir",
        "strict",
    }
)
"""Flags that steer how a run executes, not what it computes: free to change on resume."""


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that determine a search's result, JSON-ready (stored in the checkpoint)."""
    return {k: _jsonable(v) for k, v in sorted(vars(args).items()) if k not in RUN_CONTROL}


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


BEHAVIOUR_BEFORE_FLAG = {"grow_price_exponent": 0.0, "cap_dims_at_rows": False}
"""What a search did before each of these flags existed (their defaults changed the rule).

A checkpoint written before a flag was added records no value for it; resuming it must
continue the rule it was searched with, not the newer default."""


def apply_saved_config(args: argparse.Namespace, saved: dict[str, Any], explicit: set[str]) -> None:
    """Resume takes the checkpoint's settings; a typed flag that contradicts them is refused."""
    older = {k: v for k, v in BEHAVIOUR_BEFORE_FLAG.items() if k not in saved and hasattr(args, k)}
    for dest, value in sorted({**saved, **older}.items()):
        if dest in RUN_CONTROL or not hasattr(args, dest):
            continue
        typed = _jsonable(getattr(args, dest))
        if dest in explicit and typed != value:
            raise UsageError(
                f"{flag_name(dest)} {typed} contradicts the checkpoint's {flag_name(dest)} {value}; "
                "--resume continues with the saved settings (drop the flag, or start a new run)"
            )
        setattr(args, dest, value)
