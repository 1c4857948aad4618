"""Frequency blocks after the search: retrain per block, evaluate, and the serving export."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests import blocks_workers as w
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data.blocks import BlockConfig, field_blocks
from torchrec_dimgrow.modules.blocks import BlockLookup
from torchrec_dimgrow.recipes.evaluate import evaluate_saved
from torchrec_dimgrow.recipes.export import export_saved
from torchrec_dimgrow.recipes.retrain import dims_blocks, retrain
from torchrec_dimgrow.saved_model import load_model, read_spec
from torchrec_dimgrow.serving import quantize_model

RULE = BlockConfig(enabled=True, min_rows=16)


def _request(seed: int, batch: int = 48) -> KeyedJaggedTensor:
    """Bags of 0-3 ids drawn over each field's whole vocab: most bags span several blocks."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(w.FIELDS) * batch,), generator=g)
    rows = [v for v in w.VOCAB for _ in range(batch)]
    values = torch.cat([torch.randint(0, r, (int(n),), generator=g) for r, n in zip(rows, lengths)])
    return KeyedJaggedTensor(keys=list(w.FIELDS), values=values, lengths=lengths)


def _serve(artifact: Path, kjt: KeyedJaggedTensor, tmp: Path) -> torch.Tensor:
    """Scores of the exported artifact, loaded in a fresh interpreter with torch + fbgemm_gpu only."""
    torch.save({"values": kjt.values(), "lengths": kjt.lengths()}, tmp / "batch.pt")
    loader = (
        "import sys, json, torch, fbgemm_gpu\n"
        f"m = torch.jit.load({str(artifact)!r})\n"
        f"out = m(torch.load({str(tmp / 'batch.pt')!r}))\n"
        "assert not any(k.startswith('torchrec_dimgrow') for k in sys.modules), 'package imported'\n"
        "print(json.dumps(out.tolist()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", loader], capture_output=True, text=True, cwd=tmp, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    data = w.zipf_data()
    fb = field_blocks(data, RULE)
    assert fb.split
    names = fb.names()
    dims = {n: [4, 3, 0, 2, 5, 1, 2][i % 7] for i, n in enumerate(names)}
    dims[names[-1]] = 0  # a whole 1-block field dropped
    out = tmp_path_factory.mktemp("retrain")
    tc = TrainConfig(epochs=2, batch_size=128, seed=5, max_steps=30, hidden=[16], adapter_dim=8)
    metrics = retrain(dims, data, tc, out, blocks=fb)
    return out, {"metrics": metrics, "dims": dims, "blocks": fb, "data": data, "tc": tc}


def test_retrain_builds_one_table_per_kept_block_and_evaluate_reproduces_it(
    retrained: tuple[Path, dict],
) -> None:
    out, r = retrained
    spec = read_spec(out)
    assert spec.blocks == r["blocks"].to_dict() and spec.dims == r["dims"]
    model, _ = load_model(out)
    assert isinstance(model.sparse, BlockLookup)
    kept = [n for n, d in r["dims"].items() if d > 0]
    assert [c.name for c in model.sparse.ebc.embedding_bag_configs()] == kept
    assert r["metrics"]["embedding_bytes"] == 4 * sum(
        n * r["dims"][b] for b, n in r["blocks"].vocab().items()
    )
    again = evaluate_saved(out, r["data"], r["tc"].batch_size)
    assert again["test_auc"] == r["metrics"]["test_auc"] and again["val_auc"] == r["metrics"]["val_auc"]
    # dims keyed by other blocks than the data's (here: cut by the default rule) are refused
    with pytest.raises(ValueError, match="nor the data's blocks"):
        dims_blocks(r["data"], r["dims"], None)
    assert dims_blocks(r["data"], dict.fromkeys(w.FIELDS, 2), None) is None


def test_serving_export_reproduces_the_block_model(retrained: tuple[Path, dict], tmp_path: Path) -> None:
    out, r = retrained
    model, _ = load_model(out)
    kjt = _request(seed=3)
    want = model(kjt).detach()
    meta = export_saved(out, "fp32", tmp_path / "fp32")
    assert meta["blocks"] == r["blocks"].to_dict() and meta["dropped_fields"] == ["c"]
    assert meta["rows"] == dict(zip(w.FIELDS, w.VOCAB))  # the request is checked per field
    got = _serve(tmp_path / "fp32" / "serving.pt", kjt, tmp_path)
    assert torch.equal(got, want)
    export_saved(out, "int8", tmp_path / "int8")
    got8 = _serve(tmp_path / "int8" / "serving.pt", kjt, tmp_path)
    served, _ = quantize_model(copy.deepcopy(model), "int8")
    torch.testing.assert_close(got8, served(kjt).detach(), rtol=0, atol=1e-6)  # the artifact is that model
    # Row-wise int8: per looked-up row at most half a step ((max - min) / 255) plus the fp16
    # rounding of scale and bias; a (block, example) bag sums at most 3 rows here.
    tables = torch.cat([p.flatten() for p in model.sparse.parameters()])
    step = (tables.max() - tables.min()) / 255
    bound = 3 * (0.5 * step + 2e-3 * tables.abs().max())
    err = (served.sparse(kjt).values() - model.sparse(kjt).values()).abs()
    assert 0 < err.max() <= bound
    assert (got8 - want).abs().max() < 0.05


def test_a_request_for_ids_outside_a_field_is_refused(retrained: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = retrained
    export_saved(out, "fp32", tmp_path / "s")
    m = torch.jit.load(str(tmp_path / "s" / "serving.pt"))
    lengths = torch.ones(3, dtype=torch.int64)
    with pytest.raises(torch.jit.Error, match="serving request"):
        m({"values": torch.tensor([w.VOCAB[0], 0, 0]), "lengths": lengths})


def test_evaluate_refuses_data_cut_into_other_blocks(retrained: tuple[Path, dict]) -> None:
    from dataclasses import replace

    from torchrec_dimgrow.errors import ModelError

    out, r = retrained
    same = replace(r["data"], blocks=r["blocks"].to_dict())
    assert evaluate_saved(out, same, r["tc"].batch_size)["test_auc"] == r["metrics"]["test_auc"]
    other = replace(r["data"], blocks={**r["blocks"].to_dict(), "a": [0, 41, 150]})
    with pytest.raises(ModelError, match="frequency blocks differ"):
        evaluate_saved(out, other, r["tc"].batch_size)


def test_the_command_line_runs_a_block_search_then_retrains_and_exports_its_dims(tmp_path: Path) -> None:
    """``--set blocks.enabled=true``: dims.json names blocks, retrain and export take it as is."""
    root = Path(__file__).resolve().parents[1]
    data = ["--data", str(root.parent / "shared" / "data" / "movielens-100k"), "--format", "movielens"]
    env = {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "torchrec_dimgrow", *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    out = tmp_path / "search"
    r = cli(
        "search", *data, "--out", str(out), "--epochs", "1", "--overwrite", "--quiet",
        "--set", "train.max_steps=30", "--set", "blocks.enabled=true",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    dims = json.loads((out / "dims.json").read_text())
    assert any("__b" in name for name in dims)  # the big id fields were cut into blocks
    assert json.loads((out / "config.json").read_text())["blocks"]["enabled"] is True
    r = cli(
        "retrain", "--dims", str(out / "dims.json"), *data, "--epochs", "1", "--set", "train.max_steps=10"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("export", "--model", str(out / "retrain"), "--serving", "fp32", "--out", str(tmp_path / "serve"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "serve" / "serving.pt").is_file()
