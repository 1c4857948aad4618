"""Multi-process tests: 2 real ranks over gloo on CPU."""

from pathlib import Path

import pytest

from tests import dist_workers as w
from tests.dist_utils import run_ranks


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "row_wise"])
def test_sharded_forward_backward_equals_single_process(sharding: str) -> None:
    for r in run_ranks(w.sharded_matches_single, 2, sharding):
        assert r["forward"] < 1e-5, r
        assert r["theta_grad"] < 1e-5, r
        assert r["embedding_update"] < 1e-5, r


@pytest.mark.parametrize("sharding", ["table_wise", "column_wise", "row_wise"])
def test_capacity_change_replans_bit_exact_on_every_rank(sharding: str) -> None:
    results = run_ranks(w.replan_is_bit_exact, 2, sharding)
    for r in results:
        assert r["exact"] and r["state_exact"] and r["new_cols_zero_state"], r
        assert r["shapes"] == {"t0": (40, 8), "t1": (64, 4), "t2": (30, 4)}
        assert all(loss == loss and loss < 10 for loss in r["losses"])
        assert r["trained_after"]
    # each rank's fused optimizer lists the tables it owns; together they cover all tables
    owned = sorted({k for r in results for k in r["fused_keys"]})
    assert owned == [f"sparse.ebc.embedding_bags.t{i}.weight" for i in range(3)]
    assert results[0]["plan"] == results[1]["plan"]


def test_gather_importance_and_divergence_check() -> None:
    for r in run_ranks(w.importance_and_agreement, 2):
        assert r["table"] == [[0.5] * 3] * 2
        assert r["diverged"]


def test_ranks_fed_different_data_agree_on_dims() -> None:
    a, b = run_ranks(w.different_data_same_dims, 2)
    assert a == b
    assert sum(a[:3]) > 3, "the test must exercise growth"


def test_successful_ranks_leave_the_group_together(tmp_path: Path) -> None:
    marker = str(tmp_path / "rank1_done")
    for r in run_ranks(w.leave_after_peer, 2, marker):
        assert r == {"peer_done": True, "left": True}, r


def test_budget_caps_a_sharded_search_identically_on_every_rank() -> None:
    a, b = run_ranks(w.budgeted_controller_search, 2, 0.7)
    assert a == b, "ranks must take the same budgeted decisions"
    assert a["budget"] == int(0.7 * 8 * sum(a["costs"]))
    assert max(a["used"]) <= a["budget"] and a["found_bytes"] <= a["budget"]
    assert a["used"][-1] + min(a["costs"]) > a["budget"], "the budget, not d_max, must stop growth"
    assert a["replans"] >= 1 and max(a["capacity"]) == 8, "growth past one block re-plans"


@pytest.mark.parametrize(
    ("sharding", "optimizer", "in_place"),
    [
        ("table_wise", "adagrad", ["t0", "t1"]),
        ("row_wise", "rowwise_adagrad", ["t0", "t1"]),
        # t1 (8 -> 4) is split in two column shards: the planner places it, through the spill
        # file, while t0 (one 4-column shard) is rewidthed in memory in the same re-plan
        ("column_wise", "adagrad", ["t0"]),
    ],
)
def test_in_place_rewidth_equals_the_spill_path(sharding: str, optimizer: str, in_place: list[str]) -> None:
    results = run_ranks(w.rewidth_matches_spill, 2, sharding, optimizer)
    for r in results:
        assert r["in_place"] == in_place and r["spill_in_place"] == [], r
        assert r["shapes"] == {"t0": (40, 8), "t1": (64, 4), "t2": (30, 4)}, r
        assert r["same_weights"] and r["same_states"] and r["same_rng"], r
        assert r["new_cols_drawn"], r
    spilled = sum(r["spilled"] for r in results)
    assert (spilled == 0) == (in_place == ["t0", "t1"]), spilled
