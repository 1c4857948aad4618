"""Frequency blocks: the cut rule, the id remap, the block lookup and the block search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests import blocks_workers as w
from tests.dist_utils import run_ranks
from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.data.blocks import BlockConfig, FieldBlocks, block_starts, field_blocks
from torchrec_dimgrow.modules.blocks import BlockDimGrowCollection, BlockRemap, remap_to_blocks


def test_cut_rule_follows_the_lookup_mass_and_keeps_small_fields_whole() -> None:
    counts = np.array([0] + [int(1e6 / (k + 1) ** 0.9) for k in range(20_000)])
    starts = block_starts(counts)
    assert starts[0] == 0 and len(starts) == 4 and starts == sorted(set(starts))
    cum = np.cumsum(counts) / counts.sum()
    for cut, mass in zip(starts[1:], (0.5, 0.9, 0.99)):
        assert cum[cut - 1] >= mass > cum[cut - 2]  # the blocks up to the cut hold the mass
    steep = np.array([0] + [int(1e6 / (k + 1) ** 1.1) for k in range(5_000)])
    head = block_starts(steep)  # half the mass sits in fewer than min_rows ids: no 50% cut
    assert len(head) == 3 and head[1] >= BlockConfig().min_rows
    assert block_starts(counts[:100]) == [0]  # < 2 * min_rows: one block
    rows = np.diff([*starts, len(counts)])
    assert rows.min() >= BlockConfig().min_rows
    assert block_starts(counts, BlockConfig(min_rows=10**6)) == [0]
    with pytest.raises(ValueError):
        BlockConfig(mass=(0.9, 0.5))


def _reference(kjt: KeyedJaggedTensor, fb: FieldBlocks) -> dict[str, list[list[int]]]:
    """Per block key, each example's local ids (in input order), computed row by row."""
    out: dict[str, list[list[int]]] = {}
    names = iter(fb.names())
    per_field = kjt.to_dict()
    for f, starts, n in zip(fb.fields, fb.starts, fb.vocab_sizes):
        jt = per_field[f]
        bounds = [*starts, n]
        for b in range(len(starts)):
            out[next(names)] = [
                [int(i) - bounds[b] for i in bag.tolist() if bounds[b] <= i < bounds[b + 1]]
                for bag in jt.to_dense()
            ]
    return out


def test_remap_is_exact_for_multi_id_bags_across_blocks() -> None:
    fb = FieldBlocks(["a", "b", "c"], [50, 20, 7], [[0, 5, 20], [0, 8], [0]])
    g = torch.Generator().manual_seed(3)
    batch = 9
    lengths = torch.randint(0, 5, (3 * batch,), generator=g)
    sizes = [50] * batch + [20] * batch + [7] * batch
    values = torch.cat([torch.randint(0, s, (int(n),), generator=g) for s, n in zip(sizes, lengths)])
    weights = torch.rand(values.numel(), generator=g)
    kjt = KeyedJaggedTensor(keys=fb.fields, values=values, lengths=lengths, weights=weights)
    out = BlockRemap(fb)(kjt)
    assert out.keys() == ["a__b0", "a__b1", "a__b2", "b__b0", "b__b1", "c"]
    assert int(out.lengths().sum()) == values.numel()  # every id lands in exactly one block
    got = {k: [bag.tolist() for bag in jt.to_dense()] for k, jt in out.to_dict().items()}
    assert got == _reference(kjt, fb)
    # round trip: local id + block start gives back the id, and each id keeps its weight
    starts = {n: s for n, s in zip(fb.names(), [0, 5, 20, 0, 8, 0])}
    back = {k: [[i + starts[k] for i in bag] for bag in bags] for k, bags in got.items()}
    for f in fb.fields:
        keys = [k for k in back if k == f or k.startswith(f + "__b")]
        merged = [sorted(i for k in keys for i in back[k][e]) for e in range(batch)]
        assert merged == [sorted(bag.tolist()) for bag in kjt.to_dict()[f].to_dense()]
    pairs = sorted(zip(values.tolist(), weights.tolist()))
    out_ids = []
    for k, jt in out.to_dict().items():
        out_ids += [i + starts[k] for i in jt.values().tolist()]
    assert sorted(zip(out_ids, out.weights().tolist())) == pairs


def test_remap_of_an_unsplit_configuration_returns_its_input() -> None:
    fb = FieldBlocks(["a", "b"], [10, 10])
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    assert BlockRemap(fb)(kjt) is kjt
    empty = remap_to_blocks(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), None,
                            torch.tensor([0, 10]), torch.tensor([0, 3, 10]), 3)  # fmt: skip
    assert empty[0].numel() == 0 and empty[1].numel() == 0


def test_block_lookup_sums_the_blocks_of_a_field() -> None:
    torch.manual_seed(0)
    fb = FieldBlocks(["a", "b"], [30, 12], [[0, 4, 15], [0]])
    cfg = DimGrowConfig(d_max=8)
    sparse = BlockDimGrowCollection(fb, 8, cfg, align="project").eval()
    sparse.coll.post.gates_bypassed = True  # the raw columns: what this test sums by hand
    kjt = KeyedJaggedTensor(
        keys=["a", "b"],
        values=torch.tensor([1, 20, 5, 29, 3, 0, 11]),
        lengths=torch.tensor([2, 1, 2, 1, 1, 0]),
    )
    out = sparse(kjt)
    assert out.keys() == ["a", "b"] and out.length_per_key() == [8, 8]
    block_out = sparse.coll(sparse.remap(kjt)).to_dict()
    want_a = block_out["a__b0"] + block_out["a__b1"] + block_out["a__b2"]
    torch.testing.assert_close(out.to_dict()["a"], want_a, rtol=0, atol=1e-7)
    assert torch.equal(out.to_dict()["b"], block_out["b"])
    summed = sparse.forward_summed(kjt)
    torch.testing.assert_close(summed, out.to_dict()["a"] + out.to_dict()["b"], rtol=1e-5, atol=1e-6)
    # example 0 of field a holds ids 1 (block 0) and 20 (block 2): both contribute
    assert bool(block_out["a__b0"][0].abs().sum() > 0) and bool(block_out["a__b2"][0].abs().sum() > 0)
    with pytest.raises(ValueError):
        BlockDimGrowCollection(fb, 8, cfg, align="raw")


def test_one_block_search_is_the_field_search_and_split_blocks_search_per_block(tmp_path: Path) -> None:
    data = w.zipf_data()
    assert field_blocks(data, BlockConfig(min_rows=16)).split  # the data could be split
    (r,) = run_ranks(w.one_block_search_pair, 1, str(tmp_path), timeout=600)
    plain, one, split = r["plain"], r["one"], r["split"]
    assert one["dims"] == plain["dims"]
    drop = ("wall_seconds", "replan_seconds_total")
    assert {k: v for k, v in one["metrics"].items() if k not in drop} == {
        k: v for k, v in plain["metrics"].items() if k not in drop
    }
    assert (tmp_path / "blocks" / "trajectory.csv").read_text() == (
        tmp_path / "plain" / "trajectory.csv"
    ).read_text()
    fb = field_blocks(data, BlockConfig(min_rows=16))
    assert list(split["dims"]) == fb.names() and len(fb.names()) > len(data.fields)
    saved = json.loads((tmp_path / "split" / "dims.json").read_text())
    assert saved == split["dims"]
    config = json.loads((tmp_path / "split" / "config.json").read_text())
    assert config["blocks"] == fb.to_dict()
    assert split["metrics"]["found_embedding_bytes"] == 4 * sum(
        n * split["dims"][b] for b, n in fb.vocab().items()
    )


def test_two_rank_block_search_with_replans_equals_one_process() -> None:
    (one,) = run_ranks(w.sharded_block_search, 1, 24)
    two = run_ranks(w.sharded_block_search, 2, 24)
    assert one["replans"] > 0 and one["decisions"], one
    for r in two:
        assert r["decisions"] == one["decisions"]
        assert r["dims"] == one["dims"] and r["capacities"] == one["capacities"]
        assert r["found"] == one["found"]
        np.testing.assert_allclose(r["gates"], one["gates"], atol=1e-4)


def test_prepare_stores_the_blocks_with_the_vocab_and_fingerprints_them(tmp_path: Path) -> None:
    from torchrec_dimgrow.data import load_vocab, prepare
    from torchrec_dimgrow.data.synthetic import write_parquet
    from torchrec_dimgrow.manifest import vocab_fingerprint

    write_parquet(w.zipf_data(rows=6_000), tmp_path / "z")
    data = prepare(tmp_path / "z", "parquet", tmp_path / "cache", min_count=1)
    assert data.blocks is not None and data.source["blocks"] == BlockConfig().rule()
    assert load_vocab(tmp_path / "cache")["blocks"] == data.blocks
    fb = field_blocks(data, BlockConfig(min_rows=10**6))  # stored boundaries win over the rule
    assert fb.starts == [data.blocks[f] for f in data.fields]
    assert len(data.blocks["a"]) > 1 and data.blocks["c"] == [0]
    # ids are numbered most frequent first: block 0 holds at least half the train lookups
    a = np.asarray(data.train.ids[:, 0])
    assert (a < data.blocks["a"][1]).mean() >= 0.5
    split = vocab_fingerprint(tmp_path / "cache")
    other = prepare(
        tmp_path / "z", "parquet", tmp_path / "other", min_count=1, blocks=BlockConfig(min_rows=10**6)
    )
    assert other.blocks == {f: [0] for f in other.fields}
    whole = vocab_fingerprint(tmp_path / "other")
    assert split is not None and whole is not None
    assert split["a"] != whole["a"] and split["c"] == whole["c"]  # only split fields hash their blocks
