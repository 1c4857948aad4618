"""benchmarks/noretrain.py: the folded batch search scores what the searched model scores, and main() runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import noretrain

from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
from torchrec_dimgrow.data.synthetic import HubConfig, planted_hub
from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.online import ColumnMeans, kept_slots
from torchrec_dimgrow.recipes.search import DimGrowSearch, SearchOptions

FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    data = planted_hub(HubConfig(rows=4000, seed=0))
    env = init_distributed("gloo")
    tc = TrainConfig(epochs=2, seed=0)
    out = tmp_path_factory.mktemp("search")
    search = DimGrowSearch(
        data, DimGrowConfig(d_max=8), tc, PlanningConfig(), env, SearchOptions(out, quiet=True)
    )
    result = search.run()
    yield data, tc, search, result
    destroy_distributed()


def test_folded_model_is_the_published_function_of_the_searched_weights(searched) -> None:  # type: ignore[no-untyped-def]
    data, tc, search, result = searched
    _, dims, err = noretrain.fold_search(search, data, tc)
    assert dims == {f: len(k) for f, k in zip(search.coll.table_names, kept_slots(search.coll))}
    assert err <= FP32_ATOL  # against online.reference_logits, the trainer's network
    assert (
        sum(dims.values()) > 0 and dims == result["dims"]
    )  # the last step's gates are the best epoch's here


def test_folded_model_scores_what_the_searched_model_scores_in_eval(searched) -> None:  # type: ignore[no-untyped-def]
    """Equal where equality is defined (online's module docstring): every active column kept
    (gate above final_threshold) and the noise at the column means of the very batch scored,
    which is what the searched model's eval() mixes in (``eval_mixing="mean"``)."""
    data, tc, search, _ = searched
    coll = search.coll
    gates = coll.gate_values()
    theta = coll.post.gate.theta
    thr = coll.config.final_threshold
    with torch.no_grad():
        for t, d in enumerate(coll.dims_list()):  # keep every active column: the equality's domain
            for s in range(d):
                if float(gates[t, s]) <= thr:
                    theta[t, s] = 1.0
    assert all(len(k) == d for k, d in zip(kept_slots(coll), coll.dims_list()))
    batch = next(iter(data.test.batches(tc.batch_size)))
    feats = batch.sparse_features
    means = ColumnMeans(len(coll.table_names), int(gates.shape[1]))
    search.dmp.eval()
    with torch.no_grad():
        means.add(coll, coll.ebc(feats))
        searched_scores = search.dmp(feats).float()
    search.dmp.train()
    original = noretrain.column_means
    noretrain.column_means = lambda s, b: means.mean()  # type: ignore[assignment]
    try:
        plain, _, _ = noretrain.fold_search(search, data, tc)
    finally:
        noretrain.column_means = original
    with torch.no_grad():
        served = plain(feats).float()
    assert (served - searched_scores).abs().max().item() <= FP32_ATOL * max(
        1.0, float(searched_scores.abs().max())
    )


def test_main_runs_on_a_tiny_dataset(tmp_path: Path) -> None:
    argv = ["--data", "planted", "--rows", "3000", "--seeds", "0", "--search-epochs", "1"]
    argv += ["--retrain-epochs", "1", "--finetune-epochs", "1", "--d-max", "4"]
    assert noretrain.main([*argv, "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "noretrain_planted.json").read_text())
    assert [r["path"][:3] for r in written["rows"]] == ["(a)", "(b)", "(c)", "(d)"]
    assert written["meta"]["fold_err_max"] <= FP32_ATOL
    assert (tmp_path / "out" / "noretrain_planted.csv").is_file()
