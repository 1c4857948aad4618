"""Cold start: epochs spent with every field still at its starting dim never count toward early stopping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.dist_utils import run_ranks


def noise_search(rank: int, world: int, out: str, grow_threshold: float) -> dict[str, Any]:
    import numpy as np

    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.data.synthetic import from_arrays
    from torchrec_dimgrow.distributed.env import init_distributed
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    env = init_distributed("gloo")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, (2_000, 3))
    labels = (rng.random(2_000) < 0.5).astype(np.float32)  # pure noise: val AUC wanders
    data = from_arrays(["a", "b", "c"], [10, 10, 10], ids, labels, (0.6, 0.2))
    dg = DimGrowConfig(d_max=4, initial_dim=1, grow_threshold=grow_threshold, gate_lr=0.05)
    tc = TrainConfig(epochs=6, batch_size=64, seed=0, early_stop_patience=1)
    result = run_search(
        data, dg, tc, PlanningConfig(), env, SearchOptions(Path(out), quiet=True, log_every=0)
    )
    m = result["metrics"]
    return {
        "epochs": m["epochs"],
        "aucs": [h["val_auc"] for h in m["history"]],
        "dims": [h["total_dim"] for h in m["history"]],
    }


@pytest.mark.parametrize("grows", [False, True], ids=["stuck-at-start", "grows"])
def test_patience_counts_only_after_the_dims_moved(tmp_path: Path, grows: bool) -> None:
    (r,) = run_ranks(noise_search, 1, str(tmp_path), 0.3 if grows else 0.99, timeout=600)
    aucs = r["aucs"]
    stale = [i for i in range(1, len(aucs)) if aucs[i] <= max(aucs[:i])]
    assert stale, f"the noise data must give non-improving epochs: {aucs}"
    if grows:
        # dims moved in the first epoch, so the first non-improving epoch ends the search
        assert r["dims"][0] > 3 and r["epochs"] == stale[0] + 1 < 6, r
    else:
        assert r["dims"] == [3] * 6 and r["epochs"] == 6, "at the start dims, patience must not run out"
