"""Re-plan cost against the cost of a training step, on a Criteo-shaped sharded table set.

Run under torchrun (2 gloo ranks on CPU):

    PYTHONHASHSEED=0 .venv/bin/torchrun --nproc_per_node=2 benchmarks/replan.py --scale 50

For each scenario (how many of the 39 fields cross a capacity block at one check) it times the
re-plan (plan + shard + bit-exact copy of weights and fused Adagrad state + optimizer rebuild),
the bytes that went through the all-reduce, and the median training step of the same sharded
model, then prints a markdown table and writes benchmarks/results/replan.{csv,json}.
``--search-metrics`` adds rows for whole searches (their metrics.json): re-plans per search.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import markdown_table, quiet_logs, write_rows
from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.data.split import make_kjt
from torchrec_dimgrow.data.synthetic import CRITEO_CARDINALITIES, zipf_ids
from torchrec_dimgrow.distributed.env import init_distributed
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.distributed.runtime import shard_model
from torchrec_dimgrow.modules.backbone import CTRModel
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.optim import EmbeddingOptimizer
from torchrec_dimgrow.policy import DimChange
from torchrec_dimgrow.training import bce


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=50.0, help="divide the real Criteo cardinalities")
    p.add_argument("--batch-size", type=int, default=1024, help="per rank")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sharding", default="auto")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--search-metrics", type=Path, nargs="*", default=[])
    return p.parse_args(argv)


def build(scale: float, sharding: str) -> tuple[CTRModel, DimGrowEmbeddingBagCollection, object, list[int]]:
    from torchrec import EmbeddingBagConfig

    vocab = [max(1, round(v / scale)) for v in CRITEO_CARDINALITIES]
    tables = [
        EmbeddingBagConfig(name=f"f{i:02d}", embedding_dim=64, num_embeddings=v, feature_names=[f"f{i:02d}"])
        for i, v in enumerate(vocab)
    ]
    torch.manual_seed(0)
    coll = DimGrowEmbeddingBagCollection(tables, DimGrowConfig(d_max=16), align="project", device="meta")
    model = CTRModel(coll, "sum", 64)
    sharded = shard_model(
        model, torch.device("cpu"), PlanningConfig(sharding=sharding), EmbeddingOptimizer("adagrad", 0.05)
    )
    return model, coll, sharded, vocab


def step_time(sharded, coll, vocab: list[int], batch: int, steps: int, rank: int) -> float:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(rank)
    keys = coll.table_names
    dense = [p for n, p in sharded.dmp.named_parameters() if ".ebc." not in n]
    opt = torch.optim.Adam(dense, lr=1e-3)
    times = []
    for _ in range(steps):
        ids = np.stack([zipf_ids(v, batch, 1.1, rng) for v in vocab], axis=1)
        kjt = make_kjt(ids, keys)
        labels = torch.from_numpy(rng.integers(0, 2, batch).astype(np.float32))
        t = time.perf_counter()
        opt.zero_grad()
        bce(sharded.dmp(kjt), labels).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def grow_to(
    coll: DimGrowEmbeddingBagCollection, fields: list[int], target: int, store
) -> tuple[float, int, int]:  # type: ignore[no-untyped-def]
    """Grow ``fields`` one slot at a time up to ``target``; return re-plan seconds/bytes/count."""
    seconds, moved, replans = 0.0, 0, 0
    while True:
        dims = coll.post.dims_list()
        changes = [DimChange(t, "grow", dims[t], dims[t], dims[t] + 1) for t in fields if dims[t] < target]
        if not changes:
            return seconds, moved, replans
        report = coll.apply_changes(changes, store)
        if report.replanned:
            seconds += report.replan_seconds
            moved += report.bytes_moved
            replans += 1


def main(argv: list[str] | None = None) -> None:
    quiet_logs()
    args = parse(argv)
    env = init_distributed("gloo")
    torch.set_num_threads(1)
    _model, coll, sharded, vocab = build(args.scale, args.sharding)
    store = sharded.stores["sparse"]
    rows = []
    big = sorted(range(len(vocab)), key=lambda i: -vocab[i])
    scenarios = [
        ("1 largest field 4->8", big[:1]),
        ("5 largest fields 4->8", big[:5]),
        ("all 39 fields 4->8", list(range(len(vocab)))),
    ]
    base_step = step_time(sharded, coll, vocab, args.batch_size, args.steps, env.rank)
    done: set[int] = set()
    for name, fields in scenarios:
        todo = [f for f in fields if f not in done]
        seconds, moved, replans = grow_to(coll, todo, 5, store)
        done.update(todo)
        t = torch.tensor([seconds])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        step = step_time(sharded, coll, vocab, args.batch_size, args.steps, env.rank)
        rows.append(
            {
                "scenario": name,
                "fields_changed": len(todo),
                "replans": replans,
                "replan_s": round(float(t), 4),
                "bytes_moved_MiB": round(moved / 2**20, 2),
                "step_ms_before": round(base_step * 1e3, 2),
                "step_ms_after": round(step * 1e3, 2),
                "replan_in_steps": round(float(t) / step, 1),
                "table_MiB_total": round(coll.embedding_bytes() / 2**20, 2),
            }
        )
        base_step = step
    for path in args.search_metrics:
        m = json.loads(path.read_text())
        rows.append(
            {
                "scenario": f"whole search: {path.parent.name}",
                "replans": m["replans"],
                "replan_s": m["replan_seconds_total"],
                "bytes_moved_MiB": round(m["replan_bytes_moved"] / 2**20, 3),
                "steps": m["steps"],
                "world_size": m["world_size"],
            }
        )
    if env.is_main:
        cols = [
            "scenario",
            "fields_changed",
            "replans",
            "replan_s",
            "bytes_moved_MiB",
            "step_ms_before",
            "step_ms_after",
            "replan_in_steps",
            "table_MiB_total",
            "steps",
        ]
        print(
            f"Criteo cardinalities / {args.scale:g} ({sum(vocab):,} rows), {env.world_size} ranks, batch {args.batch_size}/rank, Adagrad"
        )
        print(markdown_table(rows, cols))
        write_rows(
            rows, args.out, "replan", {"argv": sys.argv, "world_size": env.world_size, "scale": args.scale}
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
