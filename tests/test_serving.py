"""Saved models, evaluate and the quantized serving export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.dist_utils import run_ranks
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data.synthetic import PlantedConfig, planted
from torchrec_dimgrow.errors import ModelError, UsageError
from torchrec_dimgrow.manifest import hash_files
from torchrec_dimgrow.modules.backbone import CTRModel
from torchrec_dimgrow.recipes.evaluate import evaluate_saved
from torchrec_dimgrow.recipes.export import export_saved
from torchrec_dimgrow.recipes.retrain import retrain
from torchrec_dimgrow.saved_model import ModelSpec, build_model, load_model, save_model, spec_for
from torchrec_dimgrow.serving import quantize_model, served_dim

FIELDS = ["a", "b", "c", "d"]
VOCAB = [40, 30, 20, 10]
DIMS = {"a": 3, "b": 0, "c": 4, "d": 5}  # odd dims (padded at int8/int4) and a dropped field


def _kjt(seed: int = 0, batch: int = 32, fields: list[str] = FIELDS) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(fields) * batch,), generator=g)
    values = torch.randint(0, 10, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor(keys=fields, values=values, lengths=lengths)


def _integer_tables(model: CTRModel, top: int) -> None:
    """Rows of integers in [0, top] that contain 0 and ``top``: row-wise int8 (top=255) and
    int4 (top=15) quantization is then exact, so any output difference is a layout bug."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.sparse.parameters():
            p.copy_(torch.randint(0, top + 1, p.shape, generator=g).float())
            p[:, 0], p[:, -1] = 0.0, float(top)
            p.mul_(2.0**-6)  # moderate logits; a power of 2 keeps scale and bias exact in fp16


def _model(spec: ModelSpec) -> CTRModel:
    torch.manual_seed(0)
    return build_model(spec).eval()


def test_served_dims_follow_the_kernels_2_byte_rule() -> None:
    assert [served_dim(d, "int8") for d in (1, 2, 3, 5, 8)] == [2, 2, 4, 6, 8]
    assert [served_dim(d, "int4") for d in (1, 3, 4, 5, 9)] == [4, 4, 4, 8, 12]
    assert [served_dim(d, s) for d in (1, 3) for s in ("fp32", "fp16")] == [1, 1, 3, 3]


def test_retrain_then_evaluate_reproduces_the_test_auc_exactly(tmp_path: Path) -> None:
    data = planted(PlantedConfig(rows=3000, seed=3))
    dims = {f: d for f, d in zip(data.fields, [3, 1, 2, 0, 1, 0, 5])}
    tc = TrainConfig(epochs=2, batch_size=128, seed=5, max_steps=30)
    metrics = retrain(dims, data, tc, tmp_path)
    again = evaluate_saved(tmp_path, data, tc.batch_size)
    assert again["test_auc"] == metrics["test_auc"]
    assert again["test_logloss"] == metrics["test_logloss"]
    assert again["val_auc"] == metrics["val_auc"]
    assert json.loads((tmp_path / "model" / "spec.json").read_text())["dims"] == dims


@pytest.mark.parametrize("serving,top", [("int8", 255), ("int4", 15)])
def test_padded_odd_dims_serve_exactly_what_the_float_model_computes(serving: str, top: int) -> None:
    spec = spec_for(FIELDS, VOCAB, DIMS)
    model = _model(spec)
    _integer_tables(model, top)
    served, report = quantize_model(build_copy(model, spec), serving)
    kjt = _kjt()
    assert {t.name: (t.dim, t.served_dim) for t in report} == {
        "a": (3, served_dim(3, serving)),
        "c": (4, 4),
        "d": (5, served_dim(5, serving)),
    }
    assert sum(t.padding_bytes for t in report) > 0
    assert torch.equal(served.sparse(kjt).values(), model.sparse(kjt).values())
    torch.testing.assert_close(served(kjt), model(kjt), rtol=0, atol=1e-6)


def _spread_model(spec: ModelSpec) -> CTRModel:
    """A model whose embeddings are spread wide (std 0.5), so quantization error is visible."""
    model = _model(spec)
    with torch.no_grad():
        for p in model.sparse.parameters():
            p.normal_(0.0, 0.5)
    return model


def build_copy(model: CTRModel, spec: ModelSpec) -> CTRModel:
    copy = build_model(spec).eval()
    copy.load_state_dict(model.state_dict())
    return copy


def test_int8_export_matches_float_within_the_quantization_error() -> None:
    spec = spec_for(FIELDS, VOCAB, DIMS)
    model = _spread_model(spec)
    served, _ = quantize_model(build_copy(model, spec), "int8")
    kjt = _kjt(seed=2)
    err = (served.sparse(kjt).values() - model.sparse(kjt).values()).abs()
    # Row-wise int8: error <= half a step ((max - min) / 255) per looked-up row, plus the fp16
    # rounding of the stored scale and bias; a bag sums at most 3 rows here.
    weights = torch.cat([p.flatten() for p in model.sparse.parameters()])
    step = (weights.max() - weights.min()) / 255
    bound = 3 * (0.5 * step + 2e-3 * weights.abs().max())
    assert 0 < err.max() <= bound
    assert (served(kjt) - model(kjt)).abs().max() < 0.05


def test_dropped_fields_have_no_table_and_the_artifact_runs_without_the_package(tmp_path: Path) -> None:
    spec = spec_for(FIELDS, VOCAB, DIMS)
    model = _model(spec)
    _integer_tables(model, 255)
    save_model(model, spec, tmp_path / "run")
    meta = export_saved(tmp_path / "run", "int8", tmp_path / "serve")
    assert [t["name"] for t in meta["tables"]] == ["a", "c", "d"]
    assert meta["dropped_fields"] == ["b"]
    assert meta["padding_bytes"] == 40 * 1 + 10 * 1  # a: 3 -> 4, d: 5 -> 6, one byte per row each
    kjt = _kjt(seed=4)
    torch.save({"values": kjt.values(), "lengths": kjt.lengths()}, tmp_path / "batch.pt")
    loader = (
        "import sys, json, torch, fbgemm_gpu\n"
        f"m = torch.jit.load({str(tmp_path / 'serve' / 'serving.pt')!r})\n"
        f"out = m(torch.load({str(tmp_path / 'batch.pt')!r}))\n"
        "assert not any(k.startswith('torchrec_dimgrow') for k in sys.modules), 'package imported'\n"
        "print(json.dumps(out.tolist()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", loader], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(served, model(kjt).detach(), rtol=0, atol=1e-5)


def test_the_artifact_checks_ids_once_its_own_way_not_again_in_fbgemm(tmp_path: Path) -> None:
    """FBGEMM's kernel check (on by default, repairing bad ids to row 0) is off behind the
    request checks, which refuse the same requests; a default TorchRec export keeps it."""
    from torchrec_dimgrow.serving import ServingModel, script
    from torchrec_dimgrow.serving_checks import skip_kernel_bounds_check

    spec = spec_for(FIELDS, VOCAB, DIMS)
    model = _model(spec)
    save_model(model, spec, tmp_path / "run")
    export_saved(tmp_path / "run", "int8", tmp_path / "serve")
    artifact = torch.jit.load(str(tmp_path / "serve" / "serving.pt"))
    assert "bounds_check_indices" not in artifact.model.code
    default, _ = quantize_model(_model(spec), "int8")
    assert "bounds_check_indices" in script(ServingModel(default, FIELDS)).code
    assert skip_kernel_bounds_check(default) == 1  # one kernel per quantized collection here
    assert "bounds_check_indices" not in script(ServingModel(default, FIELDS)).code
    bad = _kjt(seed=4)
    values = bad.values().clone()
    values[0] = VOCAB[0]  # one past the last row of feature 'a'
    with pytest.raises(torch.jit.Error, match=r"serving request: values: id 40 .*feature 'a'"):
        artifact({"values": values, "lengths": bad.lengths()})


def test_serving_json_states_the_request_rules_and_the_rows_of_every_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = spec_for(FIELDS, VOCAB, DIMS)
    save_model(_model(spec), spec, tmp_path / "run")
    with caplog.at_level("WARNING", logger="torchrec_dimgrow.recipes.export"):
        meta = export_saved(tmp_path / "run", "fp32", tmp_path / "serve")
    assert "no vocab.json is written" in caplog.text
    assert meta["rows"] == dict(zip(FIELDS, VOCAB))  # dropped b included: its ids are checked too
    assert meta["out_of_range_ids"].startswith("raise") and "int32 or int64" in meta["request"]
    assert meta["vocab"] is None and not (tmp_path / "serve" / "vocab.json").exists()  # none beside the model
    model = torch.jit.load(str(tmp_path / "serve" / "serving.pt"))
    values, lengths = torch.tensor([0, 29, 0, 0]), torch.ones(4, dtype=torch.int64)
    assert model({"values": values, "lengths": lengths}).shape == (1,)
    with pytest.raises(torch.jit.Error, match=r"id 30 at position 1 \(feature 'b'\) is outside \[0, 30\)"):
        model({"values": torch.tensor([0, 30, 0, 0]), "lengths": lengths})


def _vocab_file(path: Path, sizes: list[int]) -> Path:
    """A prepared-data vocab.json: ``size - 1`` values per field (row 0 is the shared bucket)."""
    vocab = {f: {f"{f}{i}": i for i in range(1, n)} for f, n in zip(FIELDS, sizes)}
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(
        json.dumps({"fields": FIELDS, "missing_token": "<missing>", "vocab": vocab})
    )
    return path / "vocab.json"


def test_export_takes_the_vocab_given_and_refuses_one_that_does_not_fit_the_model(tmp_path: Path) -> None:
    spec = spec_for(FIELDS, VOCAB, DIMS)
    save_model(_model(spec), spec, tmp_path / "run")
    good = _vocab_file(tmp_path / "prepared", VOCAB)
    meta = export_saved(tmp_path / "run", "int8", tmp_path / "serve", vocab=good)
    written = json.loads((tmp_path / "serve" / "vocab.json").read_text())
    assert meta["vocab"] == "vocab.json" and written["fields"] == FIELDS and written["unseen_id"] == 0
    assert written["ids"]["b"]["b29"] == 29 and written["missing_token"] == "<missing>"
    bad = _vocab_file(tmp_path / "other", [40, 31, 20, 10])
    with pytest.raises(
        UsageError,
        match=r"other/vocab.json: field 'b' maps to 31 rows \(bucket 0 included\), the model has 30",
    ):
        export_saved(tmp_path / "run", "int8", tmp_path / "serve2", vocab=bad)
    with pytest.raises(UsageError, match=r"--vocab .*nothere: no such file"):
        export_saved(tmp_path / "run", "int8", tmp_path / "serve2", vocab=tmp_path / "nothere")
    assert not (tmp_path / "serve2").exists()


def test_bad_model_dirs_and_serving_values_are_refused_before_writing(tmp_path: Path) -> None:
    spec = spec_for(FIELDS, VOCAB, DIMS)
    save_model(_model(spec), spec, tmp_path / "run")
    out = tmp_path / "serve"
    with pytest.raises(ValueError, match="unknown value 'int7'"):
        export_saved(tmp_path / "run", "int7", out)
    with pytest.raises(ModelError, match="model directory not found"):
        export_saved(tmp_path / "nothere", "int8", out)
    bad = json.loads((tmp_path / "run" / "model" / "spec.json").read_text())
    bad["dims"]["a"] = 7  # the stored table has 3 columns
    (tmp_path / "run" / "model" / "spec.json").write_text(json.dumps(bad))
    with pytest.raises(
        ModelError, match=r"spec\.json: \d+ bytes, the manifest says \d+"
    ):  # the manifest notices first
        export_saved(tmp_path / "run", "int8", out)
    manifest = tmp_path / "run" / "model" / "manifest.json"
    entries = json.loads(manifest.read_text())
    entries["files"].update(hash_files(manifest.parent, [manifest.parent / "spec.json"]))
    manifest.write_text(json.dumps(entries))  # a consistent manifest: the weights' shape check speaks
    with pytest.raises(ModelError, match=r"sparse\.embedding_bags\.a\.weight has shape \(40, 3\)"):
        export_saved(tmp_path / "run", "int8", out)
    assert not out.exists() and not (tmp_path / "serve.tmp").exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "torchrec_dimgrow", *args], capture_output=True, text=True, timeout=600
    )


def test_cli_refuses_bad_export_input_with_one_line(tmp_path: Path) -> None:
    spec = spec_for(FIELDS, VOCAB, DIMS)
    save_model(_model(spec), spec, tmp_path / "run")
    out = tmp_path / "serve"
    for model_dir, serving, expect in [
        (tmp_path / "run", "int7", "--serving"),
        (tmp_path / "missing", "int8", "model directory not found"),
    ]:
        proc = _cli("export", "--model", str(model_dir), "--serving", serving, "--out", str(out))
        assert proc.returncode == 2
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and expect in lines[0], proc.stderr
        assert not out.exists()


def _sharded_save(rank: int, world: int, out: str) -> list[list[float]]:
    from torchrec.distributed.model_parallel import DistributedModelParallel

    spec = spec_for(FIELDS, [64, 48, 32, 16], {"a": 4, "b": 0, "c": 8, "d": 4})
    torch.manual_seed(0)
    model = build_model(spec, device="meta")
    model.head.to_empty(device="cpu")
    model.adapter.to_empty(device="cpu")
    torch.manual_seed(0)
    model.head.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    model.adapter.reset_parameters()
    dmp = DistributedModelParallel(model, device=torch.device("cpu"))
    dmp.eval()
    save_model(dmp, spec, out)
    with torch.no_grad():
        return [dmp(_kjt(seed=10 + r)).tolist() for r in range(world)]


def test_a_two_rank_dmp_model_saves_through_dcp_and_loads_on_one_process(tmp_path: Path) -> None:
    results = run_ranks(_sharded_save, 2, str(tmp_path / "run"), timeout=600)
    model, _ = load_model(tmp_path / "run")
    assert all(r == results[0] for r in results)
    for r, expected in enumerate(results[0]):
        torch.testing.assert_close(
            model(_kjt(seed=10 + r)).detach(), torch.tensor(expected), rtol=0, atol=1e-6
        )


def test_dlrm_trained_at_found_dims_exports_for_serving() -> None:
    from tests.test_swap import PATH, dlrm_train, make_batch
    from torchrec_dimgrow.swap import export

    dims = {"t0": 3, "t1": 8, "t2": 0, "t3": 1}
    model = export(dlrm_train(), dims, align="project").eval()
    with pytest.raises(ValueError, match="stored at dim 8, dims says 4"):
        export(build_dlrm_copy(model, dims), {**dims, "t1": 4}, serving="int8")
    served = export(build_dlrm_copy(model, dims), dims, serving="int8")
    coll = served.get_submodule(PATH)
    assert [
        (t, c.embedding_dim) for t, c in zip(["t0", "t1", "t3"], coll.ebc.tables.embedding_bag_configs())
    ] == [
        ("t0", 4),
        ("t1", 8),
        ("t3", 2),
    ]
    batch = make_batch(3)
    with torch.no_grad():
        _, (_, want, _) = model(batch)
        _, (_, got, _) = served(batch)
    assert 0 < (got - want).abs().max() < 0.05  # int8 tables, float everything else
    fp32 = export(build_dlrm_copy(model, dims), dims, serving="fp32")
    with torch.no_grad():
        torch.testing.assert_close(fp32(batch)[1][1], want, rtol=0, atol=1e-6)


def build_dlrm_copy(model: torch.nn.Module, dims: dict[str, int]) -> torch.nn.Module:
    from tests.test_swap import dlrm_train
    from torchrec_dimgrow.swap import export

    copy = export(dlrm_train(), dims, align="project").eval()
    copy.load_state_dict(model.state_dict())
    return copy


def test_served_model_shards_over_two_cpu_ranks_with_shard_quant_model() -> None:
    from torchrec_dimgrow.serving import shard_for_inference

    spec = spec_for(FIELDS, VOCAB, DIMS)
    model = _spread_model(spec)
    served, _ = quantize_model(build_copy(model, spec), "int8")
    sharded, plan = shard_for_inference(served, world_size=2)
    placements = {
        name: [str(s.placement) for s in ps.sharding_spec.shards]  # type: ignore[union-attr]
        for ps in plan.plan.values()
        for name, ps in ps.items()  # type: ignore[union-attr]
    }
    assert set(placements) == {"a", "c", "d"}
    assert {p for ranks in placements.values() for p in ranks} == {"rank:0/cpu", "rank:1/cpu"}
    kjt = _kjt(seed=6)
    with torch.no_grad():
        assert torch.equal(sharded(kjt), served(kjt))


def test_cli_retrain_evaluate_export_chain_on_parquet(tmp_path: Path) -> None:
    from torchrec_dimgrow.data.synthetic import write_parquet

    prefix = tmp_path / "planted"
    write_parquet(planted(PlantedConfig(rows=3000, seed=4)), prefix)
    data = ["--data", str(prefix), "--format", "parquet"]
    dims = tmp_path / "dims.json"
    fields = ["pair0_a_r1", "pair0_b_r1", "pair1_a_r4", "pair1_b_r4", "bias0", "noise0", "noise1"]
    dims.write_text(json.dumps(dict(zip(fields, [3, 1, 4, 2, 1, 0, 0]))))
    run = tmp_path / "run"
    proc = _cli(
        "retrain",
        *data,
        "--dims",
        str(dims),
        "--out",
        str(run),
        "--epochs",
        "2",
        "--set",
        "train.max_steps=20",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((run / "metrics.json").read_text())
    proc = _cli("evaluate", "--model", str(run), *data)  # prepares the data afresh in a temp dir
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"test_auc {saved['test_auc']:.6f}" in proc.stdout
    proc = _cli("export", "--model", str(run), "--serving", "int4", "--out", str(tmp_path / "serve"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "serve" / "serving.json").read_text())
    assert meta["vocab"] == "vocab.json"  # retrain prepared the data (and its vocab) in run/data
    assert json.loads((tmp_path / "serve" / "vocab.json").read_text())["fields"] == fields
    assert [(t["name"], t["served_dim"]) for t in meta["tables"]] == [
        ("pair0_a_r1", 4),
        ("pair0_b_r1", 4),
        ("pair1_a_r4", 4),
        ("pair1_b_r4", 4),
        ("bias0", 4),
    ]
