"""Run one SuperNet baseline search and write ``dims.json`` (the DimGrow search's format).

    python -m torchrec_dimgrow.baselines --method autodim --data ../shared/data/movielens-100k \\
        --format movielens --out runs/ml_autodim
    python -m torchrec_dimgrow retrain --dims runs/ml_autodim/dims.json \\
        --data ../shared/data/movielens-100k --format movielens --out runs/ml_autodim/retrain

Method knobs go through ``--set key=value`` (e.g. ``--set keep_ratio=0.2`` for SSEDS,
``--set candidates=2,4,8`` for AutoDim); the search runs sharded on a 1-rank TorchRec
``DistributedModelParallel`` like the DimGrow search (``--local`` for plain modules).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchrec_dimgrow.baselines import BASELINES, Placement, make_baseline
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData, prepare
from torchrec_dimgrow.distributed.env import DistEnv, destroy_distributed, init_distributed


def parse_value(text: str) -> Any:
    """``3`` -> 3, ``0.1`` -> 0.1, ``true`` -> True, ``2,4,8`` -> (2, 4, 8), else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "," in text:
        return tuple(parse_value(t) for t in text.split(",") if t)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"error: --set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m torchrec_dimgrow.baselines", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--method", required=True, choices=sorted(BASELINES))
    p.add_argument("--data", required=True)
    p.add_argument("--format", required=True, choices=["criteo", "avazu", "movielens", "parquet", "csv"])
    p.add_argument("--label-col", default="label")
    p.add_argument("--min-count", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=None, help="prepared data (default OUT/data)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--d-max", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--patience", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config override")
    p.add_argument("--local", action="store_true", help="plain modules instead of a 1-rank DMP")
    return p


def _prepare(args: argparse.Namespace, env: DistEnv | None) -> PreparedData:
    """Rank 0 prepares (or reuses) the cache first; the other ranks then reuse it."""
    import torch.distributed as dist

    def run() -> PreparedData:
        cache = args.cache_dir or args.out / "data"
        return prepare(args.data, args.format, cache, label_col=args.label_col, min_count=args.min_count)

    if env is None or env.world_size == 1:
        return run()
    data = run() if env.rank == 0 else None
    dist.barrier()
    return data if data is not None else run()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    search = make_baseline(args.method, d_max=args.d_max, **parse_sets(args.set))
    tc = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        max_steps=args.max_steps,
        early_stop_patience=args.patience,
    )
    env = None if args.local else init_distributed()
    try:
        data = _prepare(args, env)
        result = search.search(data, tc, out_dir=args.out, placement=Placement(env))
    finally:
        if env is not None:
            destroy_distributed()
    if env is None or env.rank == 0:
        total = sum(result.dims.values())
        print(f"dims: {json.dumps(result.dims)}\ntotal_dim {total}  -> {args.out / 'dims.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
