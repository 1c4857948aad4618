"""DimGrow on planted structure: noise fields end clearly below the fields that matter most.

Fields with hidden ranks 0, 0, 1, 2, 4, 8 interact with an 8-rank hub field
(:func:`~torchrec_dimgrow.data.synthetic.planted_hub`). A real search (1 rank, real DMP,
real re-plans, default penalty) must learn, re-plan, and leave both rank-0 (noise) fields
at least 2 dims below the hub and the rank-4 and rank-8 fields; from dim 1 (the default
start) the noise fields must also end below every signal field.

What is asserted is a property measured to hold with margin on every seed tried, not the
outcome of one seed: numerics differ between CPUs, so a seeded search's exact dims do too.
Measured on an AMD EPYC machine (training seeds 0-5 from dim 1, 0-3 from the block start):
the noise fields end at 0-2 dims from dim 1 and 1-3 from the block start; the hub and the
rank-4/8 fields at 5-15, a gap of at least 3 dims on every seed; from dim 1 every signal
field ends at least 2 dims above the noise. The order among the signal fields is not stable
(Spearman with the hidden ranks 0.63-0.98 from dim 1), and from the block start the rank-1
field can end level with the noise, so neither is asserted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

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
    tc = TrainConfig(epochs=8, batch_size=128, seed=0)
    result = run_search(
        data, dg, tc, PlanningConfig(), env, SearchOptions(Path(out), quiet=True, log_every=0)
    )
    m = result["metrics"]
    return {
        "dims": result["dims"],
        "need": data.source["need"],
        "replans": m["replans"],
        "learned": m["learned"],
    }


@pytest.mark.parametrize("initial_dim", [None, 1], ids=["block", "dim1"])
def test_noise_fields_end_below_the_strong_fields(tmp_path: Path, initial_dim: int | None) -> None:
    (r,) = run_ranks(planted_search, 1, str(tmp_path), initial_dim, timeout=900)
    dims, need = r["dims"], r["need"]
    assert r["learned"], r
    noise = [dims[f] for f in need if need[f] == 0]
    signal = [dims[f] for f in need if need[f] > 0]
    strong = [dims[f] for f in need if need[f] >= 4 or f == "hub"]
    assert max(noise) + 2 <= min(strong), dims
    if initial_dim == 1:
        assert max(noise) < min(signal), dims
    assert r["replans"] >= 1, "growth past 4 dims must have re-planned"
