"""No stall by construction: early stopping never ends a run that has not learned anything,
and a search whose first epoch learned nothing trains without its gates until it has.

A run counts as having learned once its best validation AUC is more than
``training.LEARNED_Z`` standard errors (Hanley & McNeil) above where it started; until then
non-improving epochs are not held against the patience, whatever the dims did, and only the
epoch cap ends the run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.dist_utils import run_ranks
from torchrec_dimgrow.training import LEARNED_Z, EarlyStopping, auc_standard_error, learned_floor


def _rank_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    ranks = np.argsort(np.argsort(np.concatenate([pos, neg]))) + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@pytest.mark.parametrize("auc", [0.5, 0.75])
def test_auc_standard_error_matches_the_spread_of_simulated_aucs(auc: float) -> None:
    """The Hanley-McNeil error is the spread of AUCs over resampled validation sets."""
    rng = np.random.default_rng(0)
    n1, n0 = 150, 600
    # Exponential scores, the model the formula is derived for: P(pos > neg) = 1 / (1 + rate).
    rate = 1 / auc - 1
    draws = [_rank_auc(rng.exponential(1 / rate, n1), rng.exponential(1, n0)) for _ in range(3000)]
    assert auc_standard_error(auc, n1, n0) == pytest.approx(float(np.std(draws)), rel=0.1)
    assert float(np.mean(draws)) == pytest.approx(auc, abs=0.005)


def test_floor_is_chance_or_the_start_plus_its_noise() -> None:
    se = auc_standard_error(0.5, 200, 800)
    assert learned_floor({"auc": 0.47, "positives": 200, "negatives": 800}) == 0.5 + LEARNED_Z * se
    above = learned_floor({"auc": 0.6, "positives": 200, "negatives": 800})
    assert above == 0.6 + LEARNED_Z * auc_standard_error(0.6, 200, 800)
    assert math.isnan(learned_floor({"auc": float("nan"), "positives": 0, "negatives": 10}))


def test_patience_runs_only_once_the_best_clears_the_floor() -> None:
    early = EarlyStopping(patience=1, floor=0.52)
    assert early.update(0.505, 0)
    for epoch, auc in enumerate([0.50, 0.51, 0.49, 0.515], start=1):  # a plateau: never counted
        early.update(auc, epoch)
        assert not early.stop and not early.learned
    assert early.update(0.56, 5) and early.learned
    assert not early.update(0.55, 6) and early.stop


def test_without_a_floor_it_is_plain_patience() -> None:
    early = EarlyStopping(patience=2)
    early.update(0.49, 0)
    early.update(0.48, 1)
    assert not early.stop
    early.update(0.47, 2)
    assert early.stop and early.learned


def search_run(rank: int, world: int, out: str, grow_threshold: float, signal: bool) -> dict[str, Any]:
    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.data.synthetic import from_arrays
    from torchrec_dimgrow.distributed.env import init_distributed
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    env = init_distributed("gloo")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 10, (2_000, 3))
    if signal:  # the label is the parity of field a's id: learned within an epoch
        labels = (rng.random(2_000) < np.where(ids[:, 0] % 2 == 0, 0.85, 0.15)).astype(np.float32)
    else:  # nothing to learn: one id per field, so every row scores the same (AUC exactly 0.5)
        ids = np.zeros_like(ids)
        labels = (rng.random(2_000) < 0.5).astype(np.float32)
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
        "learned": m["learned"],
        "floor": m["val_auc_floor"],
        "phases": [h["phase"] for h in m["history"]],
        "learn_epochs": m["learn_epochs"],
    }


@pytest.mark.parametrize("grows", [False, True], ids=["stuck-at-start", "grows"])
def test_a_search_that_learned_nothing_runs_to_the_epoch_cap(tmp_path: Path, grows: bool) -> None:
    (r,) = run_ranks(search_run, 1, str(tmp_path), 0.3 if grows else 0.99, False, timeout=600)
    aucs = r["aucs"]
    stale = [i for i in range(1, len(aucs)) if aucs[i] <= max(aucs[:i])]
    assert stale, f"the data must give non-improving epochs: {aucs}"
    assert max(aucs) <= r["floor"] and not r["learned"], r
    if grows:
        assert r["dims"][0] > 3, r  # the dims moved: that alone no longer starts the patience
    else:
        assert r["dims"][0] == 3, r
    # Not learned after half its 6 epochs: the rest is learn-first training at the storage
    # block's width (d_max 4 here), gates out of the forward, until the epoch cap. These
    # epochs do not count against train.epochs, but at most that many run.
    assert r["phases"] == ["search"] * 3 + ["learn"] * 6 and r["learn_epochs"] == 6, r
    assert r["dims"][3:] == [12] * 6, r
    assert r["epochs"] == 9, "patience must not end a run that is still at its start"


def test_a_search_that_learned_stops_on_its_patience(tmp_path: Path) -> None:
    (r,) = run_ranks(search_run, 1, str(tmp_path), 0.6, True, timeout=600)
    aucs, phases = r["aucs"], r["phases"]
    assert r["learned"] and max(aucs) > r["floor"] + 0.1, r
    # Patience counts the judged epochs after any learn-first ones (the best is chosen there).
    start = len(phases) - phases[::-1].index("learn") if "learn" in phases else 0
    judged = aucs[start:]
    stale = [i for i in range(1, len(judged)) if judged[i] <= max(judged[:i])]
    assert stale, f"the run must see a non-improving epoch once learned: {aucs}"
    assert r["epochs"] == start + stale[0] + 1 < 6 + r["learn_epochs"], r  # patience 1: the first ends it


def zipf_search_run(rank: int, world: int, out: str, seeds: list[int]) -> list[dict[str, Any]]:
    """The package defaults on Zipf-id, interaction-only data with cheap noise fields."""
    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.data.synthetic import fm_interactions, fm_zipf_config
    from torchrec_dimgrow.distributed.env import init_distributed
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    env = init_distributed("gloo")
    data = fm_interactions(fm_zipf_config())  # 65k rows: smaller, even plain training stays at chance longer
    runs = []
    for seed in seeds:
        result = run_search(
            data,
            DimGrowConfig(),
            TrainConfig(epochs=10, seed=seed),
            PlanningConfig(),
            env,
            SearchOptions(Path(out) / str(seed), quiet=True, log_every=0),
        )
        m = result["metrics"]
        runs.append({k: m[k] for k in ("learned", "val_auc", "val_auc_floor", "learn_epochs", "history")})
        runs[-1]["dims"] = result["dims"]
    return runs


def test_no_search_seed_ends_at_chance_on_zipf_interaction_only_data(tmp_path: Path) -> None:
    """The stall case (12 fields of 50-5,000 Zipf ids, FM teacher, three noise fields): with
    the gates' shuffle noise from the start, searches ended at chance AUC. Now no seed does:
    where the first half of the epochs stays within noise of the start, learn-first training gets the
    model clear of it and the search judges only afterwards."""
    (runs,) = run_ranks(zipf_search_run, 1, str(tmp_path), [0, 1], timeout=900)
    for seed, r in enumerate(runs):
        assert r["learned"] and r["val_auc"] > r["val_auc_floor"], (seed, r)
        assert sum(r["dims"].values()) > 0, (seed, r["dims"])
        if r["learn_epochs"]:  # after half the 10 epochs, all within noise of the start
            first = r["history"][:5]
            assert all(h["val_auc"] <= r["val_auc_floor"] for h in first), (seed, first)
            phases = [h["phase"] for h in r["history"]]
            assert phases[5 : 5 + r["learn_epochs"]] == ["learn"] * r["learn_epochs"], phases
            assert phases.count("search") <= 10, "the learn-first epochs do not count against train.epochs"
