"""The baseline recipe: a baseline's ``metrics.json`` carries the DimGrow search's keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.dist_utils import run_ranks


def _search_and_baseline_metrics(rank: int, world: int, out: str) -> dict[str, Any]:
    from torchrec_dimgrow.baselines import Placement, make_baseline
    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.data.synthetic import from_arrays
    from torchrec_dimgrow.distributed.env import init_distributed
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.baseline import run_baseline
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    torch.set_num_threads(1)
    env = init_distributed("gloo")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, (1_200, 3))
    labels = (rng.random(1_200) < np.where(ids[:, 0] % 2 == 0, 0.85, 0.15)).astype(np.float32)
    data = from_arrays(["a", "b", "c"], [10, 10, 10], ids, labels, (0.6, 0.2))
    tc = TrainConfig(epochs=2, batch_size=64, seed=0, hidden=[8])
    dg = DimGrowConfig(d_max=4)
    run_search(
        data, dg, tc, PlanningConfig(), env, SearchOptions(Path(out) / "search", quiet=True, log_every=0)
    )
    res = run_baseline(
        make_baseline("autodim", d_max=4), data, tc, out_dir=Path(out) / "autodim", placement=Placement(env)
    )
    run_baseline(
        make_baseline("uniform", d_max=4), data, tc, out_dir=Path(out) / "uniform", placement=Placement(env)
    )
    return {"dims": res.dims, "steps": res.steps}


def test_baseline_metrics_json_has_the_search_keys(tmp_path: Path) -> None:
    (r,) = run_ranks(_search_and_baseline_metrics, 1, str(tmp_path), timeout=600)
    search = json.loads((tmp_path / "search" / "metrics.json").read_text())
    autodim = json.loads((tmp_path / "autodim" / "metrics.json").read_text())
    uniform = json.loads((tmp_path / "uniform" / "metrics.json").read_text())
    for m in (autodim, uniform):
        assert set(search) <= set(m), sorted(set(search) - set(m))
        assert {"method", "embedding_param_bytes", "optimizer_state_bytes", "extra"} <= set(m)
    assert autodim["method"] == "autodim" and autodim["found_total_dim"] == sum(r["dims"].values())
    assert autodim["steps"] == r["steps"] and autodim["epochs"] == len(autodim["history"]) >= 1
    assert autodim["val_auc"] == max(h["val_auc"] for h in autodim["history"])
    assert isinstance(autodim["learned"], bool) and autodim["val_auc_floor"] is not None
    assert autodim["replans"] == 0 and autodim["budget_bytes"] is None
    assert autodim["peak_rank_embedding_bytes"] > autodim["peak_embedding_bytes"] > 0  # + Adagrad state
    # uniform without train=True trains nothing: no validation numbers, every field at d_max
    assert (
        uniform["val_auc"] is None
        and uniform["search_test_auc"] is None
        and uniform["epochs"] == 0
        and uniform["found_total_dim"] == 12
    )


def test_baseline_cli_writes_dims_and_metrics_and_takes_the_renamed_knobs(tmp_path: Path) -> None:
    """``python -m torchrec_dimgrow baseline`` (1-rank DMP) goes through the recipe."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "autodim"
    args = ["--data", str(root.parent / "shared" / "data" / "movielens-100k"), "--format", "movielens"]
    args += [
        "--out",
        str(out),
        "--epochs",
        "1",
        "--set",
        "train.max_steps=30",
        "--quiet",
        "--method",
        "autodim",
    ]
    args += ["--d-max", "8", "--set", "method.gate_every=2", "--set", "method.gate_lr=0.01"]
    args += ["--set", "method.capacity_block=4"]
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "torchrec_dimgrow", "baseline", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    dims = json.loads((out / "dims.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    assert m["found_total_dim"] == sum(dims.values()) and f"total_dim {sum(dims.values())}" in r.stdout
    assert m["steps"] == 30 and m["epochs"] == 1 and m["world_size"] == 1
    assert m["extra"]["config"]["gate_every"] == 2 and m["extra"]["config"]["gate_lr"] == 0.01
