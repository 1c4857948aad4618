"""A re-plan frees the tables it replaces before it allocates the new ones (2 real ranks)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.dist_utils import run_ranks
from torchrec_dimgrow.distributed import shard_io

ROWS = 2_000_000  # one table per rank: 2M rows x 4 cols x fp32 x (weight + Adagrad) = 64 MB


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _sharded_tables(rows: list[int]) -> tuple[Any, Any]:
    """A pad-aligned DimGrow collection of one table per entry of ``rows`` (8 columns of
    capacity, logical dim 4), sharded table-wise with fused Adagrad: (collection, store)."""
    from torchrec import EmbeddingBagConfig

    from torchrec_dimgrow.config import DimGrowConfig
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.distributed.runtime import shard_model
    from torchrec_dimgrow.modules.backbone import CTRModel
    from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
    from torchrec_dimgrow.optim import EmbeddingOptimizer

    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate(rows)
    ]
    coll = DimGrowEmbeddingBagCollection(
        tables, DimGrowConfig(d_max=8, initial_dim=4), align="pad", device="meta"
    )
    sharded = shard_model(
        CTRModel(coll, "concat", 8, in_dim=8 * len(rows)), torch.device("cpu"),
        PlanningConfig(sharding="table_wise"), EmbeddingOptimizer("adagrad", 0.05),
    )  # fmt: skip
    return coll, sharded.store_for(coll)


def _grow_worker(rank: int, world: int, in_place: bool) -> dict[str, Any]:
    import ctypes
    import gc

    from torchrec_dimgrow.policy import DimChange

    shard_io.CHUNK_BYTES = 1 << 20  # small chunks: the transient must not scale with the table
    coll, store = _sharded_tables([ROWS] * world)
    store.rewidth_in_place = in_place
    before_w = {t: v.pieces[0].tensor.clone() for t, v in store.views()[0].items() if v.pieces}
    old_bytes = store.local_bytes()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    changes = [DimChange(t, "grow", 0, 4, 5) for t in range(world)]
    report = coll.apply_changes(changes, store)
    peak = _status_kib("VmHWM") - base
    after_w = {t: v.pieces[0].tensor for t, v in store.views()[0].items() if v.pieces}
    kept = all(torch.equal(after_w[t][:, :4], w) for t, w in before_w.items())
    return {
        "replanned": report.replanned,
        "old": old_bytes,
        "new": store.local_bytes(),
        "peak": peak,
        "kept": kept,
        "spilled": store.spilled_bytes,
        "in_place": store.last_in_place,
    }


@pytest.mark.parametrize("in_place", [False, True], ids=["spill", "in_place"])
def test_replan_peak_stays_below_old_plus_new_tables(in_place: bool) -> None:
    for r in run_ranks(_grow_worker, 2, in_place):
        assert r["replanned"] and r["kept"], r
        assert r["new"] == 2 * r["old"] >= 64_000_000, r
        if in_place:  # both tables keep their rank: rewidthed in memory, nothing spilled
            assert r["in_place"] == ["t0", "t1"] and r["spilled"] == 0, r
        else:
            assert r["in_place"] == [] and r["spilled"] >= r["old"], r
        # The baseline RSS holds the old tables. Building the new ones next to them would
        # raise the peak by all of ``new``; freeing first (spill) or giving the old pages
        # back behind the copy (in place) raises it by ``new - old`` plus chunks and
        # allocator noise.
        assert r["peak"] < r["new"] - r["old"] // 2, r


def _grow_one_worker(rank: int, world: int) -> dict[str, Any]:
    from torchrec_dimgrow.policy import DimChange

    coll, store = _sharded_tables([500 + i for i in range(2)])
    store.rewidth_in_place = False  # this test is about the spill path
    weights, states = store.views()
    before = {
        t: (
            v.pieces[0].tensor.data_ptr(),
            v.pieces[0].tensor.clone(),
            states[t]["momentum1"].pieces[0].tensor.data_ptr(),
        )
        for t, v in weights.items()
        if v.pieces
    }
    coll.apply_changes([DimChange(0, "grow", 0, 4, 5)], store)  # only t0 crosses a block
    weights, states = store.views()
    out: dict[str, Any] = {"spilled": store.spilled_bytes, "local": sorted(before)}
    for t, (ptr, values, mom) in before.items():
        if not weights[t].pieces:
            continue  # a changed table may move to another rank
        piece = weights[t].pieces[0].tensor
        out[t] = {
            "same_storage": piece.data_ptr() == ptr
            and states[t]["momentum1"].pieces[0].tensor.data_ptr() == mom,
            "kept": torch.equal(piece[:, :4], values),
            "width": piece.shape[1],
        }
    return out


def test_replan_hands_unchanged_tables_over_and_spills_only_the_changed_one() -> None:
    results = run_ranks(_grow_one_worker, 2)
    owners = {t: r for r in results for t in r["local"]}
    assert set(owners) == {"t0", "t1"}, "table-wise: each table on one rank"
    t1 = owners["t1"]["t1"]
    assert t1["width"] == 4 and t1["same_storage"] and t1["kept"], "the unchanged table was reallocated"
    assert owners["t0"]["spilled"] == 500 * 4 * 4 * 2  # t0's 4 kept columns: weight + Adagrad state
    if owners["t1"] is not owners["t0"]:
        assert owners["t1"]["spilled"] == 0


def _handed_over_then_changed_worker(rank: int, world: int) -> dict[str, Any]:
    import ctypes
    import gc

    from torchrec_dimgrow.policy import DimChange

    coll, store = _sharded_tables([ROWS] * 2)
    store.rewidth_in_place = False  # in place, the copy gives the old pages back whoever holds them
    coll.apply_changes([DimChange(0, "grow", 0, 4, 5)], store)  # t1 is handed over untouched
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    coll.apply_changes([DimChange(1, "grow", 0, 4, 5)], store)  # now t1 itself widens
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return {"delta": _status_kib("VmRSS") - before}


def test_replan_frees_a_table_that_an_earlier_replan_handed_over() -> None:
    # t1's old storage (2M x 4 x fp32, weight + Adagrad = 64 MB) went into the first
    # re-plan's handover; the second re-plan replaces it by 128 MB. Over both ranks (t1
    # may change owner) RSS must grow by about new - old = 64 MB, not by all 128 MB.
    deltas = [r["delta"] for r in run_ranks(_handed_over_then_changed_worker, 2)]
    assert sum(deltas) < 96_000_000, deltas


def _old_module_worker(rank: int, world: int, in_place: bool) -> dict[str, Any]:
    import gc
    import weakref

    from torchrec_dimgrow.policy import DimChange

    coll, store = _sharded_tables([5_000, 7_000])
    store.rewidth_in_place = in_place
    gc.collect()
    gc.disable()  # what is left to the cycle collector stays until a full collection
    try:
        old = store.sharded
        tbes = [m for lookup in old._lookups for m in lookup.modules()]
        refs = [weakref.ref(old), *(weakref.ref(m) for m in tbes)]
        del old, tbes
        coll.apply_changes([DimChange(0, "grow", 0, 4, 5)], store)
        alive = sum(r() is not None for r in refs)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = [o for o in gc.garbage if type(o) in (torch.Tensor, torch.nn.Parameter)]
        cyclic_bytes = sum(t.untyped_storage().nbytes() for t in garbage)
        gc.set_debug(0)
        gc.garbage.clear()
    finally:
        gc.enable()
    return {"modules": len(refs), "alive": alive, "cyclic_tensor_bytes": cyclic_bytes}


@pytest.mark.parametrize("in_place", [False, True], ids=["spill", "in_place"])
def test_replan_frees_the_old_module_without_the_cycle_collector(in_place: bool) -> None:
    # The old sharded EBC, its lookups and TBEs refer back to themselves (TorchRec's
    # state-dict hooks, FBGEMM's closures over the TBE): left to the cycle collector, every
    # re-plan's old module would stay until a full collection, often the end of the run.
    (r,) = run_ranks(_old_module_worker, 1, in_place)
    assert r["modules"] > 2 and r["alive"] == 0, r
    assert r["cyclic_tensor_bytes"] == 0, r
