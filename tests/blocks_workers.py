"""Bodies of the frequency-block tests that run in spawned processes (``run_ranks``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.data.blocks import FieldBlocks
from torchrec_dimgrow.data.synthetic import from_arrays, zipf_ids

FIELDS = ["a", "b", "c"]
VOCAB = [400, 120, 8]
STARTS = [[0, 40, 150], [0, 30], [0]]


def zipf_data(rows: int = 3_000, seed: int = 0) -> PreparedData:
    """Zipf ids over three fields and a label driven by per-id weights of ``a`` and ``b``."""
    rng = np.random.default_rng(seed)
    ids = np.stack([zipf_ids(v, rows, 1.1, rng) for v in VOCAB], axis=1)
    w = [rng.normal(0.0, 1.5, v) for v in VOCAB]
    logit = w[0][ids[:, 0]] + w[1][ids[:, 1]] + 0.3 * w[2][ids[:, 2]]
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return from_arrays(list(FIELDS), list(VOCAB), ids, labels, (0.7, 0.15))


def _search(out: str, data: PreparedData, blocks: Any) -> dict[str, Any]:
    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.distributed.env import init_distributed
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    env = init_distributed("gloo")
    dg = DimGrowConfig(d_max=8, initial_dim=1, grow_threshold=0.45, gate_lr=0.05)
    tc = TrainConfig(epochs=2, batch_size=128, seed=0, hidden=[16], adapter_dim=8, early_stop_patience=2)
    opts = SearchOptions(Path(out), quiet=True, log_every=0, blocks=blocks)
    return run_search(data, dg, tc, PlanningConfig(), env, opts)


def one_block_search_pair(rank: int, world: int, out: str) -> dict[str, Any]:
    """The field-level search, then the block search where no field is split."""
    from torchrec_dimgrow.data.blocks import BlockConfig

    data = zipf_data()
    plain = _search(f"{out}/plain", data, None)
    one = _search(f"{out}/blocks", data, BlockConfig(enabled=True, min_rows=10**6))
    split = _search(f"{out}/split", data, BlockConfig(enabled=True, min_rows=16))
    return {"plain": plain, "one": one, "split": split}


def _global_batch(step: int, half: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A global batch whose two halves are the same rows (each rank of 2 sees one half)."""
    rng = np.random.default_rng(seed * 100_000 + step)
    ids = np.stack([zipf_ids(v, half, 1.1, rng) for v in VOCAB], axis=1)
    labels = (rng.random(half) < 0.5 + 0.4 * np.sign(np.cos(ids[:, 0] + 2 * ids[:, 1]))).astype(np.float32)
    return np.concatenate([ids, ids]), np.concatenate([labels, labels])


def _kjt(ids: np.ndarray) -> KeyedJaggedTensor:
    values = torch.from_numpy(np.ascontiguousarray(ids.T.reshape(-1))).long()
    return KeyedJaggedTensor(
        keys=list(FIELDS), values=values, lengths=torch.ones(values.numel(), dtype=torch.int64)
    )


def sharded_block_search(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Controller-driven search over frequency blocks on ``world`` ranks (same global batches).

    Deterministic: tables and new columns start at zero (``init_std`` 0: no rank-local
    draws), the projection starts from one seeded draw, the mixing is the batch mean and
    each rank's half of a global batch equals the other's.
    """
    from torchrec_dimgrow.config import DimGrowConfig
    from torchrec_dimgrow.controller import DimGrowController
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.distributed.runtime import shard_model
    from torchrec_dimgrow.modules.backbone import CTRModel
    from torchrec_dimgrow.modules.blocks import BlockDimGrowCollection
    from torchrec_dimgrow.optim import EmbeddingOptimizer

    torch.manual_seed(0)
    fb = FieldBlocks(list(FIELDS), list(VOCAB), [list(s) for s in STARTS])
    cfg = DimGrowConfig(
        d_max=8, init_std=0.0, grow_threshold=0.45, shrink_threshold=0.2,
        alpha=0.02, gate_lr=0.1, tau=5.0,
    )  # fmt: skip
    sparse = BlockDimGrowCollection(fb, 8, cfg, align="project", device="meta")
    with torch.no_grad():
        assert sparse.coll.post.projection is not None
        sparse.coll.post.projection.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(7))
    model = CTRModel(sparse, "sum", adapter_dim=8, hidden=(), dropout=0.0)
    sharded = shard_model(model, torch.device("cpu"), PlanningConfig(), EmbeddingOptimizer("adagrad", 0.2))
    store = next(iter(sharded.stores.values()))
    dmp = sharded.dmp
    dense = [p for n, p in dmp.named_parameters() if "embedding_bags" not in n and "gate" not in n]
    opt = torch.optim.SGD(dense, lr=0.05)
    ctrl = DimGrowController({"": sparse.coll}, stores={"": store}, dense_optimizers=[opt])
    half = 32
    lo, hi = (0, 2 * half) if world == 1 else (rank * half, rank * half + half)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    decisions: list[list[tuple[int, str, int, int]]] = []
    for step in range(steps):
        ids, labels = _global_batch(step, half, 0)
        vids, vlabels = _global_batch(step, half, 1)
        dmp.train()
        sparse.coll.post.train(False)  # batch-mean mixing: the same on a half as on the whole
        opt.zero_grad(set_to_none=True)
        bce(dmp(_kjt(ids[lo:hi])), torch.from_numpy(labels[lo:hi])).backward()
        opt.step()
        vb = (_kjt(vids[lo:hi]), torch.from_numpy(vlabels[lo:hi]))
        report = ctrl.step(lambda b: bce(dmp(b[0]), b[1]), vb)
        if report is not None and report.changed:
            decisions.append([(c.table, c.kind, c.old_dim, c.new_dim) for c in report.changes[""]])
    return {
        "dims": sparse.coll.dims(),
        "capacities": sparse.coll.capacities(),
        "found": sparse.coll.export_dims(),
        "decisions": decisions,
        "replans": ctrl.replans,
        "gates": sparse.coll.gate_values().tolist(),
    }
