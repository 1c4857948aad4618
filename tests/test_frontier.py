"""The frontier benchmark: margin over the uniform curve, seed spread, an end-to-end CLI run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import child_env

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import frontier  # noqa: E402


def test_uniform_reference_interpolates_in_log_bytes_and_clamps_at_the_ends() -> None:
    curve = [(100.0, 0.70), (400.0, 0.74), (200.0, 0.72)]  # unsorted on purpose
    assert frontier.uniform_reference(curve, 200.0) == pytest.approx(0.72)
    # halfway in log bytes between 100 and 200 is sqrt(2) * 100, not 150
    assert frontier.uniform_reference(curve, 100 * math.sqrt(2)) == pytest.approx(0.71)
    assert frontier.uniform_reference(curve, 150.0) > 0.71
    assert frontier.uniform_reference(curve, 10.0) == 0.70
    assert frontier.uniform_reference(curve, 1e6) == 0.74
    with pytest.raises(ValueError):
        frontier.uniform_reference([], 1.0)


def test_dims_spread_is_the_mean_abs_difference_over_seed_pairs() -> None:
    a, b, c = {"x": 1, "y": 4}, {"x": 3, "y": 4}, {"x": 1, "y": 0}
    assert frontier.dims_spread([a]) == 0.0
    assert frontier.dims_spread([a, b]) == 1.0  # |1-3| + |4-4| over 2 fields
    assert frontier.dims_spread([a, b, c]) == pytest.approx((2 + 0 + 0 + 4 + 2 + 4) / 6)


def test_random_allocation_fills_the_budget_without_exceeding_it() -> None:
    import random

    vocab = {"big": 5000, "mid": 300, "small": 7, "tiny": 2}
    full = frontier.embedding_bytes(vocab, dict.fromkeys(vocab, 16))
    seen = set()
    for i in range(20):
        cap = int(0.25 * full)
        dims = frontier.random_allocation(vocab, cap, 16, random.Random(i))
        assert dims == frontier.random_allocation(vocab, cap, 16, random.Random(i))  # seeded
        assert set(dims) == set(vocab) and all(0 <= d <= 16 for d in dims.values())
        n = frontier.embedding_bytes(vocab, dims)
        # fits, and fills: one more dim on the big table would not have fitted, or all are at d_max
        assert n <= cap and (n + 4 * vocab["big"] > cap or dims["big"] == 16), (dims, n, cap)
        seen.add(tuple(dims.values()))
    assert len(seen) > 10  # random, not one allocation scaled


def test_bench_frontier_runs_end_to_end(tmp_path: Path) -> None:
    env = child_env(PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    args = ["--data", "fm", "--rows", "3000", "--uniform", "1,2", "--budgets", "0.3", "--methods", "dimgrow,sseds",
            "--no-unbudgeted", "--search-seeds", "0,1", "--retrain-seeds", "0", "--search-epochs", "1",
            "--retrain-epochs", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "torchrec_dimgrow", "bench", "frontier", *args],
        cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "frontier_fm.json").read_text())["rows"]
    assert [(x["method"], x["budget"]) for x in rows] == [
        ("uniform", "dim 1"), ("uniform", "dim 2"), ("DimGrow", 0.3), ("SSEDS", 0.3)
    ]  # fmt: skip
    from torchrec_dimgrow.data.synthetic import generate

    full = 4 * 16 * sum(generate("fm", rows=3000).vocab_sizes)  # the d_max model, fp32
    for row in rows[2:]:
        assert max(row["per_search_bytes"]) <= 0.3 * full, row
        assert isinstance(row["margin"], float) and row["dims_spread"] >= 0
    assert (tmp_path / "out" / "frontier_fm.png").stat().st_size > 1000
    assert "| DimGrow | 0.3" in r.stdout


def test_bench_frontier_retrains_hand_picked_allocations_with_their_margin(tmp_path: Path) -> None:
    env = child_env(PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    base = ["--data", "fm", "--rows", "3000", "--uniform", "1,2", "--methods", "", "--retrain-seeds", "0",
            "--retrain-epochs", "1", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]  # fmt: skip

    def bench(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "torchrec_dimgrow", "bench", "frontier", *base, *extra],
            cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    r = bench("--fixed", "2,2,1,1,1,1;0,0,1,2,2,2")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "frontier_fm.json").read_text())["rows"]
    fixed = [x for x in rows if x["method"] == "fixed"]
    assert [x["budget"] for x in fixed] == ["2,2,1,1,1,1", "0,0,1,2,2,2"]
    assert [x["dims"] for x in fixed] == ["2 2 1 1 1 1", "0 0 1 2 2 2"]
    assert all(isinstance(x["margin"], float) for x in fixed)
    r = bench("--random", "2", "--budgets", "0.3")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "frontier_fm.json").read_text())["rows"]
    rand, best = (x for x in rows if x["method"].startswith("random"))
    assert (rand["method"], rand["runs"], best["method"]) == ("random x2", "2x1", "random, best val")
    assert best["dims"] in rand["dims"].split(" | ") and isinstance(best["margin"], float)
    from torchrec_dimgrow.data.synthetic import generate

    cap = 0.3 * 4 * 16 * sum(generate("fm", rows=3000).vocab_sizes)
    assert max(rand["per_search_bytes"]) <= cap
    bad = bench("--fixed", "1,2,3")
    assert bad.returncode != 0 and "3 dims for 6 fields" in bad.stderr


def test_bench_frontier_votes_over_cached_searches(tmp_path: Path) -> None:
    from torchrec_dimgrow.data.synthetic import generate
    from torchrec_dimgrow.policy import vote_dims

    env = child_env(PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    work = tmp_path / "work"
    args = ["--data", "fm", "--rows", "3000", "--uniform", "1", "--budgets", "0.2", "--methods", "dimgrow",
            "--no-unbudgeted", "--search-seeds", "1", "--search-votes", "3", "--retrain-seeds", "0",
            "--search-epochs", "1", "--retrain-epochs", "1", "--work", str(work), "--out", str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "torchrec_dimgrow", "bench", "frontier", *args],
        cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [
        x
        for x in json.loads((tmp_path / "out" / "frontier_fm_votes3.json").read_text())["rows"]
        if x["method"] != "uniform"
    ]
    assert row["method"] == "DimGrow (3 votes)" and row["runs"] == "1x1"
    data = generate("fm", rows=3000)
    # voted point 1 uses the searches of seeds 3, 4 and 5, each cached on its own
    searches = [
        json.loads(next(work.glob(f"*/dimgrow-b0.2-s{s}-search.json")).read_text())["dims"] for s in (3, 4, 5)
    ]
    costs = [4 * v for v in data.vocab_sizes]
    expect = vote_dims([[d[f] for f in data.fields] for d in searches], costs, int(0.2 * 16 * sum(costs)))
    assert row["dims"] == " ".join(map(str, expect))
