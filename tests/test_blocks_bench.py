"""benchmarks/blocks.py: MDE's block rule at the block search's bytes, uniform curves, the run cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import blocks as blocks_bench

from torchrec_dimgrow.data.blocks import BlockConfig, field_blocks
from torchrec_dimgrow.data.synthetic import FMConfig, fm_interactions


def test_mde_block_rule_gives_hot_blocks_more_dims_within_the_bytes() -> None:
    data = fm_interactions(FMConfig(rows=6000, vocab=(20, 800, 1500), ranks=(1, 2, 4), exponent=1.1, seed=0))
    fb = field_blocks(data, BlockConfig(enabled=True))
    vocab = fb.vocab()
    n_bytes = 4 * sum(vocab.values()) * 3
    dims, _ = blocks_bench.mde_dims(data, blocks_bench.BlocksBenchConfig(d_max=16), n_bytes)
    assert 4 * sum(vocab[t] * d for t, d in dims.items()) <= n_bytes
    per_field = fb.field_dims(dims)
    split = [f for f, s in zip(fb.fields, fb.starts) if len(s) > 1]
    assert len(split) == 2, "the two big fields are cut into frequency blocks"
    for f in split:
        # block 0 holds the hot ids (the fewest rows): it gets the most dims, the tail the fewest
        assert per_field[f][0] > per_field[f][-1], (f, per_field[f])


def test_main_compares_methods_on_one_uniform_curve_and_reuses_its_cache(tmp_path: Path) -> None:
    argv = [
        "--datasets",
        "zipf",
        "--zipf-rows",
        "6000",
        "--methods",
        "field,blocks,mde,mde_field,uniform1,uniform2",
        "--seeds",
        "0",
        "--retrain-seeds",
        "0,1",
        "--search-epochs",
        "1",
        "--retrain-epochs",
        "1",
        "--budget",
        "0",
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "out"),
    ]
    assert blocks_bench.main(argv) == 0
    runs = json.loads((tmp_path / "out" / "blocks_runs.json").read_text())["rows"]
    by = {r["method"]: r for r in runs}
    assert by["mde"]["embedding_bytes"] <= by["blocks"]["embedding_bytes"]
    assert by["mde_field"]["embedding_bytes"] <= by["field"]["embedding_bytes"]
    assert (
        by["mde"]["tables"] == by["blocks"]["tables"] and by["mde_field"]["tables"] == by["field"]["tables"]
    )
    assert by["uniform2"]["embedding_bytes"] == 2 * by["uniform1"]["embedding_bytes"]
    assert all(len(r["test_aucs"]) == 2 and r["test_auc"] == sum(r["test_aucs"]) / 2 for r in runs)
    table = json.loads((tmp_path / "out" / "blocks.json").read_text())["rows"]
    assert all("margin" in row and "iso_ratio" in row for row in table)
    cache = sorted((tmp_path / "work").glob("*.json"))
    assert len(cache) == 6 + 6 * 2  # one allocation per method, one retrain per retrain seed
    stamps = [p.stat().st_mtime_ns for p in cache]
    assert blocks_bench.main(argv) == 0  # everything from the cache: no file rewritten
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    again = json.loads((tmp_path / "out" / "blocks_runs.json").read_text())["rows"]
    assert [r["test_auc"] for r in again] == [r["test_auc"] for r in runs]
