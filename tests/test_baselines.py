"""The SuperNet baselines do what their papers say, on tiny inputs.

Planted tests freeze the tables (embedding lr 0) at values where one candidate / column is
known to carry the label and the rest is noise, so what is checked is the method's selection
mechanism, not whether a few steps of training happen to learn good embeddings.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from tests.dist_utils import child_env
from torchrec_dimgrow.artifacts import read_dims_json
from torchrec_dimgrow.baselines import BASELINES, make_baseline
from torchrec_dimgrow.baselines.autodim import AutoDimPost, power_of_two_candidates
from torchrec_dimgrow.baselines.optembed import Evolution, OptEmbedPost, prefix_mask
from torchrec_dimgrow.baselines.sseds import SSEDSConfig, keep_top
from torchrec_dimgrow.baselines.supernet import SparseSuperNet
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data.split import make_kjt
from torchrec_dimgrow.data.synthetic import PlantedConfig, from_arrays, planted
from torchrec_dimgrow.recipes.baseline import run_baseline, train_supernet

FIELDS = ["a", "b", "c"]
VOCAB = {"a": 7, "b": 11, "c": 5}
FROZEN = dict(embedding_optimizer="sgd", embedding_lr=0.0)


def _kjt(batch: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = np.stack([torch.randint(0, VOCAB[f], (batch,), generator=gen).numpy() for f in FIELDS], axis=1)
    return make_kjt(ids, FIELDS)


def _informative_data(rows: int = 16_000, vocab: int = 500, seed: int = 0):
    """One field ``x`` whose per-id effect drives the label, one independent field ``z``."""
    rng = np.random.default_rng(seed)
    effect = rng.normal(size=vocab) * 2.0
    ids = np.stack([rng.integers(0, vocab, rows), rng.integers(0, vocab, rows)], axis=1)
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-effect[ids[:, 0]]))).astype(np.float32)
    return from_arrays(["x", "z"], [vocab, vocab], ids, labels, (0.7, 0.2)), torch.from_numpy(effect).float()


def _set_table(ebc: EmbeddingBagCollection, name: str, values: torch.Tensor) -> None:
    with torch.no_grad():
        ebc.embedding_bags[name].weight.copy_(values)


# ------------------------------------------------------------------------------------ AutoDim
def test_autodim_builds_one_plain_table_per_field_and_candidate() -> None:
    search = make_baseline("autodim", d_max=16, capacity_block=1)
    sparse = search.build_sparse(FIELDS, VOCAB)
    assert power_of_two_candidates(16) == (2, 4, 8, 16)
    assert power_of_two_candidates(6) == (2, 4, 6)
    assert type(sparse.ebc) is EmbeddingBagCollection  # the stock sharder shards exactly this type
    names = [t.name for t in sparse.ebc.embedding_bag_configs()]
    assert names == [f"{f}__d{c}" for c in (2, 4, 8, 16) for f in FIELDS]
    assert sparse.table_bytes == 4 * sum(VOCAB.values()) * (2 + 4 + 8 + 16)


def test_autodim_mixture_weights_sum_to_one_and_temperature_anneals() -> None:
    search = make_baseline("autodim", d_max=8, candidates=(1, 3, 8))
    sparse = search.build_sparse(FIELDS, VOCAB)
    post: AutoDimPost = sparse.post  # type: ignore[assignment]
    with torch.no_grad():
        post.alpha.normal_()
    for training in (True, False):
        post.train(training)
        w = post.mixture_weights()
        assert w.shape == (3, 3)
        assert torch.allclose(w.sum(dim=1), torch.ones(3), atol=1e-6)
        assert bool((w >= 0).all())
    search.on_step(sparse, 9_999)
    assert float(post.temperature) == pytest.approx(0.5)
    search.on_step(sparse, 10**6)
    assert float(post.temperature) == pytest.approx(0.01)


def test_autodim_favours_the_informative_candidate() -> None:
    data, effect = _informative_data()
    search = make_baseline(
        "autodim", d_max=8, candidates=(2, 4, 8), capacity_block=1, gate_lr=0.05, common_dim=16
    )
    tc = TrainConfig(epochs=3, batch_size=256, hidden=[16], adapter_dim=16, early_stop_patience=5, **FROZEN)
    trained = search.build(data, tc)
    ebc = trained.sparse.ebc
    gen = torch.Generator().manual_seed(1)
    for c in (2, 4, 8):
        for f in ("x", "z"):
            _set_table(ebc, f"{f}__d{c}", torch.randn(500, c, generator=gen))
    planted_table = torch.randn(500, 4, generator=gen)
    planted_table[:, 0] = effect
    _set_table(ebc, "x__d4", planted_table)
    train_supernet(search, trained, data, tc)
    post: AutoDimPost = trained.sparse.post  # type: ignore[assignment]
    assert search.export_dims(trained, data, tc)["x"] == 4
    probs = torch.softmax(post.alpha.detach()[0], dim=0)
    assert float(probs[1]) > 0.5, probs


# ------------------------------------------------------------------------------------ OptEmbed
def test_optembed_training_masks_are_prefixes_of_the_drawn_length() -> None:
    d = 8
    post = OptEmbedPost(FIELDS, d).train()
    x = torch.randn(64, len(FIELDS), d) + 5.0  # no zeros of its own
    out = (
        post(KeyedTensor(keys=FIELDS, length_per_key=[d] * 3, values=x.reshape(64, -1)))
        .values()
        .view(64, 3, d)
    )
    lengths = post.last_lengths
    assert lengths is not None and lengths.shape == (64, 3)
    assert int(lengths.min()) >= 1 and int(lengths.max()) <= d
    assert len(set(lengths.reshape(-1).tolist())) > 3  # really random per sample and field
    kept = out != 0
    assert torch.equal(kept.sum(-1), lengths)
    assert torch.equal(kept, prefix_mask(lengths, d).bool())  # kept columns form a prefix
    assert torch.equal(out[kept], x[kept])


def test_optembed_eval_applies_the_fixed_per_field_dims() -> None:
    post = OptEmbedPost(FIELDS, 4).eval()
    post.set_eval_dims([1, 4, 2])
    x = torch.ones(2, 3, 4)
    out = (
        post(KeyedTensor(keys=FIELDS, length_per_key=[4] * 3, values=x.reshape(2, -1))).values().view(2, 3, 4)
    )
    assert out[0].sum(-1).tolist() == [1.0, 4.0, 2.0]
    with pytest.raises(ValueError):
        post.set_eval_dims([5, 1, 1])


def test_evolution_finds_a_planted_optimum() -> None:
    target = (3, 1, 7, 5, 2, 8)
    evo = Evolution(num_fields=6, d_max=8, iterations=30, seed=0)
    best, _, history = evo.run(lambda c: -float(sum(abs(a - b) for a, b in zip(c, target))))
    assert sum(abs(a - b) for a, b in zip(best, target)) <= 2
    assert [h["best_auc"] for h in history] == sorted(h["best_auc"] for h in history)  # elitist


def test_optembed_scores_the_same_with_and_without_cached_lookups() -> None:
    data = planted(PlantedConfig(rows=3_000, vocab=20))
    tc = TrainConfig(epochs=1, batch_size=128, hidden=[8], max_steps=10)
    scores = []
    for cache in (True, False):
        search = make_baseline("optembed", d_max=8, cache_lookups=cache, max_eval_rows=200)
        trained = search.build(data, tc)
        train_supernet(search, trained, data, tc)
        score = search.score_fn(trained, data, batch_size=64)
        scores.append([score((8,) * 7), score((1, 2, 3, 4, 5, 6, 7))])
    assert scores[0] == pytest.approx(scores[1])


# ------------------------------------------------------------------------------------ SSEDS
def test_sseds_saliency_ranks_the_planted_dim_above_noise() -> None:
    data, effect = _informative_data()
    search = make_baseline("sseds", d_max=4, capacity_block=1, saliency_batch_size=512)
    tc = TrainConfig(epochs=2, batch_size=256, hidden=[16], adapter_dim=16, early_stop_patience=5, **FROZEN)
    trained = search.build(data, tc)
    gen = torch.Generator().manual_seed(2)
    table_x = torch.randn(500, 4, generator=gen)
    table_x[:, 0] = effect
    _set_table(trained.sparse.ebc, "x", table_x)
    _set_table(trained.sparse.ebc, "z", torch.randn(500, 4, generator=gen))
    train_supernet(search, trained, data, tc)
    sal = search.saliency(trained, data)
    assert sal.shape == (2, 4)
    others = torch.cat([sal[0, 1:], sal[1]])
    assert float(sal[0, 0]) > 2.0 * float(others.max()), sal
    assert torch.equal(trained.sparse.post.mask, torch.ones(2, 4))  # the mask is never trained


def test_sseds_keeps_the_global_top_under_ratio_or_parameter_budget() -> None:
    sal = torch.tensor([[9.0, 1.0, 0.5, 0.1], [8.0, 7.0, 6.0, 0.2]])
    vocab = {"x": 10, "z": 100}
    assert keep_top(sal, ["x", "z"], vocab, SSEDSConfig(d_max=4, keep_ratio=0.25)) == {"x": 1, "z": 1}
    assert keep_top(sal, ["x", "z"], vocab, SSEDSConfig(d_max=4, keep_ratio=0.5)) == {"x": 1, "z": 3}
    by_budget = keep_top(sal, ["x", "z"], vocab, SSEDSConfig(d_max=4, param_budget=130))
    assert by_budget == {"x": 3, "z": 1}  # 9 (10) + 8 (100) + 1 (10) + 0.5 (10); 7 would exceed
    assert sum(vocab[f] * d for f, d in by_budget.items()) <= 130


# ------------------------------------------------------------------------------------ all methods
CASES = [
    ("uniform", {}),
    ("autodim", {}),
    ("autodim", {"weight_sharing": True}),
    ("optembed", {}),
    ("sseds", {}),
    ("dimreg", {}),
]


@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_sparse_module_forward_backward_and_advertised_widths(name: str, overrides: dict) -> None:
    torch.manual_seed(0)
    search = make_baseline(name, d_max=8, **overrides)
    sparse = search.build_sparse(FIELDS, VOCAB)
    assert isinstance(sparse, SparseSuperNet) and type(sparse.ebc) is EmbeddingBagCollection
    tc = TrainConfig(hidden=[8], adapter_dim=64)
    model = search.build_model(sparse, FIELDS, tc).train()
    pooled = sparse(_kjt())
    width = 64 if name == "autodim" else 8
    assert pooled.keys() == FIELDS
    assert pooled.length_per_key() == [width] * 3
    assert pooled.values().shape == (6, 3 * width)
    model(_kjt()).sum().backward()
    grads = [p.grad for p in sparse.ebc.parameters()]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_search_exports_a_dim_for_every_field(name: str, tmp_path: Path) -> None:
    data = planted(PlantedConfig(rows=3_000, vocab=20))
    overrides = {"optembed": {"iterations": 3}, "uniform": {"train": True}}.get(name, {})
    search = make_baseline(name, d_max=8, **overrides)
    tc = TrainConfig(epochs=1, batch_size=128, hidden=[8], max_steps=12)
    result = run_baseline(search, data, tc, out_dir=tmp_path)
    dims = read_dims_json(tmp_path / "dims.json", data.fields)
    assert dims == result.dims
    assert all(0 <= d <= 8 for d in dims.values())
    stored = json.loads((tmp_path / "search.json").read_text())
    assert stored["method"] == name and stored["embedding_param_bytes"] > 0
    assert result.embedding_state_bytes > 0  # Adagrad keeps one sum per table value
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == name and metrics["found_total_dim"] == sum(dims.values())
    assert metrics["steps"] == result.steps and metrics["epochs"] == len(result.history) == 1
    assert metrics["val_auc"] == result.history[0]["val_auc"]
    if name == "uniform":
        assert set(dims.values()) == {8}
    if name == "autodim":
        assert set(dims.values()) <= {2, 4, 8}


def test_uniform_with_dims_is_the_final_model_padded_to_the_capacity_block() -> None:
    search = make_baseline("uniform", dims={"a": 3, "b": 0, "c": 4})
    sparse = search.build_sparse(FIELDS, VOCAB)
    assert [(t.name, t.embedding_dim) for t in sparse.ebc.embedding_bag_configs()] == [("a", 4), ("c", 4)]
    pooled = sparse(_kjt())
    assert pooled.keys() == ["a", "c"] and pooled.length_per_key() == [3, 4]


def test_make_baseline_rejects_unknown_names_and_keys() -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("nas")
    with pytest.raises(ValueError, match="unknown config keys"):
        make_baseline("sseds", candidates=(2,))


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    from torchrec_dimgrow.baselines import Placement, make_baseline
    from torchrec_dimgrow.recipes.baseline import run_baseline
    from torchrec_dimgrow.data.synthetic import PlantedConfig, planted
    from torchrec_dimgrow.config import TrainConfig
    from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed

    env = init_distributed("gloo")
    data = planted(PlantedConfig(rows=2_000, vocab=20))
    tc = TrainConfig(epochs=1, batch_size=128, hidden=[8], max_steps=8)
    out = {}
    for name, kw in [("autodim", {}), ("optembed", {"iterations": 2}), ("sseds", {})]:
        search = make_baseline(name, d_max=8, **kw)
        res = run_baseline(search, data, tc, placement=Placement(env))
        sharded = isinstance(res.trained.sparse.ebc, ShardedEmbeddingBagCollection)
        out[name] = {"sharded": sharded, "fields": sorted(res.dims), "state": res.embedding_state_bytes,
                     "params": res.embedding_param_bytes}
    destroy_distributed()
    print("RESULT" + json.dumps(out))
    """
)


def test_baselines_shard_with_the_stock_sharder_and_fused_optimizer() -> None:
    """Same path as the DimGrow search: meta EBC, fused Adagrad, TorchRec planner + DMP (1 rank)."""
    env = child_env()
    env["OMP_NUM_THREADS"] = "1"  # OpenMP spin-waits make a shared 2-core box crawl
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, timeout=180, env=env
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT") :])
    fields = sorted(planted(PlantedConfig(rows=2_000, vocab=20)).fields)
    for name, res in out.items():
        assert res["sharded"], name
        assert res["fields"] == fields
        assert res["state"] == res["params"], name  # fused Adagrad: one fp32 sum per table value


def test_baseline_subcommand_writes_dims_and_rejects_unknown_knobs(tmp_path: Path, capsys) -> None:
    from torchrec_dimgrow.cli import main

    criteo = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo" / "criteo_head8k")
    common = ["baseline", "--data", criteo, "--format", "criteo", "--set", "run.local=true", "--d-max", "4"]
    assert main([*common, "--method", "uniform", "--out", str(tmp_path / "u")]) == 0
    dims = read_dims_json(tmp_path / "u" / "dims.json")
    assert len(dims) == 39 and set(dims.values()) == {4}
    assert main([*common, "--method", "sseds", "--set", "no_such_knob=1", "--out", str(tmp_path / "s")]) == 2
    assert "no_such_knob" in capsys.readouterr().err
