"""Resuming a search: the checkpoint's settings, its verification and its data.

A checkpoint records the settings that determine the result (:func:`saved_settings`);
``--resume`` adopts them, and refuses a setting the user gave that contradicts them
(:func:`adopt_saved`). The files are verified once the process group exists, every rank
hashing a share (:func:`verified_resume`), and the data must be the checkpoint's
(:func:`check_same_data`).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist

from torchrec_dimgrow.config import drop_retired
from torchrec_dimgrow.distributed.env import DistEnv
from torchrec_dimgrow.errors import CheckpointError, UsageError
from torchrec_dimgrow.manifest import Verified, compare_data, peek, select
from torchrec_dimgrow.recipes.setup import agree
from torchrec_dimgrow.runconfig import SearchRunConfig, from_flat, to_flat

log = logging.getLogger(__name__)

RUN_CONTROL = frozenset(
    {
        "run.out",
        "run.resume",
        "run.overwrite",
        "run.quiet",
        "run.log_level",
        "run.threads",
        "run.backend",
        "run.tensorboard",
        "run.strict",
        "data.cache_dir",
    }
)
"""Settings that steer how a run executes, not what it computes: free to change on resume."""

PATH_KEYS = frozenset({"data.path"})

BEHAVIOUR_BEFORE_SETTING = {"dimgrow.grow_price_exponent": 0.0, "dimgrow.cap_dims_at_rows": False}
"""What a search did before each of these settings existed (their defaults changed the rule).

A checkpoint written before a setting was added (and before presets, which replaced them)
records no value for it; it was searched with this value, which the current rule must match
for the checkpoint to resume."""

LEGACY_KEYS = {
    "data": "data.path",
    "format": "data.format",
    "label_col": "data.label_col",
    "drop_cols": "data.drop_cols",
    "min_count": "data.min_count",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "seed": "train.seed",
    "lr": "train.lr",
    "max_steps": "train.max_steps",
    "patience": "train.early_stop_patience",
    "embedding_optimizer": "train.embedding_optimizer",
    "embedding_lr": "train.embedding_lr",
    "sharding": "planning.sharding",
    "votes": "run.votes",
    "log_every": "run.log_every",
    "checkpoint_every": "run.checkpoint_every",
}
"""Checkpoints written before settings had sections recorded flag names; the rest of their
keys (``alpha``, ``gate_lr``, ...) are ``DimGrowConfig`` fields."""


def saved_settings(cfg: SearchRunConfig) -> dict[str, Any]:
    """The settings that determine a search's result, JSON-ready (stored in the checkpoint)."""
    return {k: v for k, v in sorted(to_flat(cfg).items()) if k not in RUN_CONTROL}


def _sectioned(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings as section keys, whichever way it recorded them."""
    out = {}
    for key, value in saved.items():
        if "." in key:
            out[key] = value
        elif key in LEGACY_KEYS:
            new = LEGACY_KEYS[key]
            out[new] = [c for c in value.split(",") if c] if new == "data.drop_cols" else value
        else:
            out[f"dimgrow.{key}"] = value
    return out


def adopt_saved(cfg: SearchRunConfig, saved: Mapping[str, Any], explicit: Collection[str]) -> SearchRunConfig:
    """``cfg`` with the checkpoint's settings; one the user gave that contradicts them is refused."""
    current = to_flat(cfg)
    sectioned = _sectioned(saved)
    older = {
        k: v
        for k, v in BEHAVIOUR_BEFORE_SETTING.items()
        if k not in sectioned and "dimgrow.preset" not in sectioned
    }
    for key, value in sorted(_without_retired({**sectioned, **older}).items()):
        if key in RUN_CONTROL or key not in current:
            continue
        if key in explicit and _norm(key, current[key]) != _norm(key, value):
            raise UsageError(
                f"{key} {current[key]} contradicts the checkpoint's {key} {value}; --resume continues "
                "with the saved settings (drop the setting, or start a new run)"
            )
        current[key] = value
    return from_flat(type(cfg), current)


def _without_retired(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's settings without the removed ones (:data:`~torchrec_dimgrow.config.RETIRED`,
    the preset's :class:`~torchrec_dimgrow.config.SearchRule`). A removed setting holding
    another value than this version's rule would silently change the search it continues, so
    the checkpoint is refused. One written before presets existed was searched by the
    ``"dimgrow"`` rule (its settings say so), which it then names."""
    prefix = "dimgrow."
    dimgrow = {k.removeprefix(prefix): v for k, v in flat.items() if k.startswith(prefix)}
    try:
        kept = drop_retired(dimgrow, "checkpoint")
    except ValueError as exc:
        raise CheckpointError(f"{exc}; resume it with the version that wrote it") from exc
    kept.setdefault("preset", "dimgrow")  # written before presets: searched by this rule (checked above)
    rest = {k: v for k, v in flat.items() if not k.startswith(prefix)}
    return {**rest, **{prefix + k: v for k, v in kept.items()}}


def _norm(key: str, value: Any) -> Any:
    """A path setting compares as the file it names (config.json records it absolute)."""
    return str(Path(value).resolve()) if key in PATH_KEYS and isinstance(value, str) else value


def preflight(cfg: SearchRunConfig, explicit: Collection[str]) -> tuple[SearchRunConfig, Verified]:
    """Adopt the checkpoint's settings before anything is written (every rank).

    Only its manifest is read here; the files are verified once the process group exists
    (:func:`verified_resume`), each rank hashing a share.
    """
    assert cfg.run.resume is not None
    found = peek(Path(cfg.run.resume))
    return adopt_saved(cfg, found.config, explicit), found


def verified_resume(path: Path, env: DistEnv) -> Verified:
    """The checkpoint to resume from, verified by all ranks together (same choice on each)."""

    def gather(error: str | None) -> list[str | None]:
        if env.world_size == 1:
            return [error]
        verdicts: list[str | None] = [None] * env.world_size
        dist.all_gather_object(verdicts, error)
        return verdicts

    found = select(path, share=(env.rank, env.world_size), agree=gather)
    if found.world_size != env.world_size and env.is_main:
        log.warning(
            "resuming a %d-rank checkpoint on %d rank(s): the tables are re-planned and the data "
            "continues from the rows consumed so far, so the result will not match an "
            "uninterrupted %d-rank run exactly",
            found.world_size,
            env.world_size,
            found.world_size,
        )
    return found


def check_same_data(resumed: Verified, fingerprint: dict[str, Any], env: DistEnv) -> None:
    """Refuse to resume on data other than the checkpoint's (every rank stops together)."""
    error: list[str | None] = [None]
    try:
        compare_data(resumed.manifest["data"], fingerprint)
    except CheckpointError as exc:
        error = [str(exc)]
    agree(error, env)
