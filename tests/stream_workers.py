"""Rank bodies of the stream tests (run by ``dist_utils.run_ranks`` on real gloo processes)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
from torchrec_dimgrow.data.synthetic import PlantedConfig, planted
from torchrec_dimgrow.distributed.env import DistEnv, init_distributed
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.recipes.stream import StreamConfig, StreamOptions, run_stream

GLOBAL_BATCH = 128


def tiny_data() -> Any:
    return planted(PlantedConfig(rows=7000, vocab=30, signal=2.0))


def configs(world: int) -> tuple[DimGrowConfig, TrainConfig, PlanningConfig]:
    dg = DimGrowConfig(d_max=8, gate_lr=0.05, capacity_block=4, capacity_slack_blocks=0, check_interval=2)
    per_rank = GLOBAL_BATCH // world
    tc = TrainConfig(batch_size=per_rank, hidden=[], adapter_dim=16, dropout=0.0, seed=0)
    return dg, tc, PlanningConfig(batch_size=per_rank)


def stream(rank: int, world: int, out: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One stream run into ``out``; ``kwargs``: StreamConfig fields plus max_steps (train),
    log_every (run), resume / crash_at_step / kill_in_publish."""
    env: DistEnv = init_distributed("gloo")
    dg, tc, planning = configs(world)
    resume = kwargs.pop("resume", None)
    crash = kwargs.pop("crash_at_step", None)
    kill = kwargs.pop("kill_in_publish", None)
    tc = replace(tc, max_steps=kwargs.pop("max_steps", None))
    opts = StreamOptions(
        Path(out),
        log_every=kwargs.pop("log_every", 50),
        quiet=True,
        resume=Path(resume) if resume else None,
        stream=StreamConfig(**kwargs),
        crash_at_step=crash,
        kill_in_publish=kill,
    )
    result = run_stream(tiny_data(), dg, tc, planning, env, opts)
    return {k: result[k] for k in ("dims", "metrics", "trajectory")}
