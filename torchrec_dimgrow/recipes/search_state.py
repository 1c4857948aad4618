"""A search's options (what the recipe hands the loop) and its resumable state (what a
checkpoint records besides tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchrec_dimgrow.data.blocks import BlockConfig
from torchrec_dimgrow.training import EarlyStopping


@dataclass
class SearchOptions:
    out_dir: Path
    log_every: int = 50
    checkpoint_every: int = 0
    resume: Path | None = None
    quiet: bool = False
    run_config: dict[str, Any] = field(default_factory=dict)  # recorded in each checkpoint's manifest
    data_fingerprint: dict[str, Any] = field(default_factory=dict)
    discard_latest: bool = False  # resume fell back past a damaged latest checkpoint
    tensorboard: Path | None = None  # rank 0 also logs loss, val AUC, dims and gates here
    resave: bool = False  # resumed on another world size: rewrite the checkpoint at this one first
    config_file: dict[str, Any] | None = None  # config.json: the run's config (else the dataclasses')
    # Frequency blocks (data/blocks.py): with ``enabled``, one table (gates, dims) per block.
    blocks: BlockConfig | None = None


@dataclass
class SearchState:
    """Everything besides tensors that a resumed search needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    val_epoch: int = 0
    val_batch: int = 0
    early: EarlyStopping = field(default_factory=lambda: EarlyStopping(patience=2))
    best_gates: list[list[float]] = field(default_factory=list)
    best_dims: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    peak_embedding_bytes: int = 0
    peak_rank_bytes: int = 0
    wall_seconds: float = 0.0  # up to the last checkpoint, so a resumed run reports the whole run
    done: bool = False
    # Learn-first epochs (``DimGrowSearch._learns_first``): ``learning`` while they run,
    # ``learn_epochs`` how many ran (at most one such phase per search).
    learning: bool = False
    learn_epochs: int = 0
    chance_floor: float = float("nan")  # learned_floor of a start at chance (0.5)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SearchState:
        return cls(**{**raw, "early": EarlyStopping(**raw["early"])})
