"""Found dims and retrained quality per method and dataset.

For every dataset, method and seed: run the search (DimGrow with ``run_search``; the
baselines, each a :class:`~torchrec_dimgrow.baselines.BaselineSearch`, with ``run_baseline``), on the same
sharded 1-rank TorchRec path, same batch, same table optimizer), then retrain a fresh plain
model at the found dims with the shared ``retrain`` recipe (early stopping on validation
AUC, test metrics of the best epoch). "full" is every field at D_max, retrained the same way
(no search). Reported: Σdim, embedding bytes ``Σ vocab_f·dim_f·4``, test AUC / log loss
mean ± std over the seeds, search wall time.

    python benchmarks/quality.py                                 # all datasets, 3 seeds
    python benchmarks/quality.py --quick                         # smoke: planted + movielens, 1 seed
    python benchmarks/quality.py --datasets movielens --methods dimgrow,autodim --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, markdown_table, mean_std, pm, quiet_logs, write_rows

METHODS = ["dimgrow", "autodim", "optembed", "sseds", "full"]
ALL_METHODS = [*METHODS, "dimreg"]
DATA_ROOT = REPO.parent / "shared" / "data"
DATASETS: dict[str, tuple[str, str]] = {
    "movielens": ("movielens-100k", "movielens"),
    "criteo": ("criteo/criteo_head8k", "criteo"),
    "avazu": ("avazu/avazu_head9k", "avazu"),
    "planted": ("", "synthetic"),
}


@dataclass
class QualityConfig:
    """One benchmark run. ``search_epochs``/``retrain_epochs`` are caps: both stop early on
    validation AUC with ``patience``."""

    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    d_max: int = 16
    batch_size: int = 256
    search_epochs: int = 10
    retrain_epochs: int = 20
    patience: int = 2
    threads: int = 1
    dimgrow_alpha: float | None = None  # None: the package default (DimGrowConfig().alpha)
    data_root: str = str(DATA_ROOT)
    cache_dir: str = ""


def load_dataset(name: str, cfg: QualityConfig) -> Any:
    """A prepared real dataset (cached), or the planted synthetic one."""
    if name == "planted":
        from torchrec_dimgrow.data.synthetic import HubConfig, planted_hub

        # hidden ranks 0, 0, 1, 2, 4, 8 (+ the rank-8 hub); the test suite uses a smaller copy
        return planted_hub(HubConfig(rows=60_000, seed=0))
    from torchrec_dimgrow.data import prepare

    rel, fmt = DATASETS[name]
    cache = Path(cfg.cache_dir or tempfile.gettempdir()) / "dimgrow_quality_cache" / name
    return prepare(Path(cfg.data_root) / rel, fmt, cache)


def _train_cfg(cfg: QualityConfig, seed: int, epochs: int) -> Any:
    from torchrec_dimgrow.config import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, early_stop_patience=cfg.patience, seed=seed)


def search_dims(
    method: str, data: Any, cfg: QualityConfig, seed: int, env: Any
) -> tuple[dict[str, int], float]:
    """Found dims and search wall time of one (method, seed)."""
    if method == "full":
        return dict.fromkeys(data.fields, cfg.d_max), 0.0
    tc = _train_cfg(cfg, seed, cfg.search_epochs)
    from torchrec_dimgrow.distributed.planning import PlanningConfig

    planning = PlanningConfig(batch_size=cfg.batch_size)
    start = time.perf_counter()
    if method == "dimgrow":
        from torchrec_dimgrow.config import DimGrowConfig
        from torchrec_dimgrow.recipes.search import SearchOptions, run_search

        dg = DimGrowConfig(d_max=cfg.d_max)
        if cfg.dimgrow_alpha is not None:
            dg.alpha = cfg.dimgrow_alpha
        with tempfile.TemporaryDirectory() as tmp:
            res = run_search(data, dg, tc, planning, env, SearchOptions(Path(tmp), quiet=True))
        return res["dims"], time.perf_counter() - start
    from torchrec_dimgrow.baselines import Placement, make_baseline
    from torchrec_dimgrow.recipes.baseline import run_baseline

    result = run_baseline(
        make_baseline(method, d_max=cfg.d_max), data, tc, placement=Placement(env, planning)
    )
    return result.dims, time.perf_counter() - start


def run_one(method: str, data: Any, dataset: str, cfg: QualityConfig, seed: int, env: Any) -> dict[str, Any]:
    from torchrec_dimgrow.recipes.retrain import retrain

    dims, wall = search_dims(method, data, cfg, seed, env)
    vocab = data.vocab()
    row: dict[str, Any] = {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "search_wall_s": round(wall, 2),
        "total_dim": sum(dims.values()),
        "embedding_params": sum(vocab[f] * d for f, d in dims.items()),
        "dims": dims,
    }
    row["embedding_bytes"] = 4 * row["embedding_params"]
    if row["total_dim"] == 0:
        return {**row, "test_auc": float("nan"), "test_logloss": float("nan"), "note": "every field dropped"}
    metrics = retrain(dims, data, _train_cfg(cfg, seed, cfg.retrain_epochs))
    return {**row, "test_auc": metrics["test_auc"], "test_logloss": metrics["test_logloss"]}


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, method): mean ± std over seeds."""
    out = []
    keys = sorted({(r["dataset"], r["method"]) for r in runs}, key=lambda k: (k[0], ALL_METHODS.index(k[1])))
    for ds, m in keys:
        rs = [r for r in runs if r["dataset"] == ds and r["method"] == m]
        out.append(
            {
                "dataset": ds,
                "method": m,
                "seeds": len(rs),
                "Σdim (per seed)": "/".join(str(r["total_dim"]) for r in rs),
                "emb params": round(mean_std(r["embedding_params"] for r in rs)[0]),
                "emb KiB": f"{mean_std(r['embedding_bytes'] for r in rs)[0] / 1024:.1f}",
                "test AUC": pm(r["test_auc"] for r in rs),
                "test logloss": pm(r["test_logloss"] for r in rs),
                "search s": f"{mean_std(r['search_wall_s'] for r in rs)[0]:.1f}",
            }
        )
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {ALL_METHODS}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--d-max", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--search-epochs", type=int, default=10)
    p.add_argument("--retrain-epochs", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dimgrow-alpha", type=float, default=None, help="DimGrow penalty (package default)")
    p.add_argument("--data-root", default=str(DATA_ROOT))
    p.add_argument("--cache-dir", default="")
    p.add_argument("--quick", action="store_true", help="planted + movielens, seed 0, 2/3 epochs")
    p.add_argument("--out", type=Path, default=Path("runs/bench/quality"))
    return p


def config_from_args(args: argparse.Namespace) -> QualityConfig:
    cfg = QualityConfig(
        datasets=[d for d in args.datasets.split(",") if d],
        methods=[m for m in args.methods.split(",") if m],
        seeds=[int(s) for s in args.seeds.split(",") if s],
        d_max=args.d_max,
        batch_size=args.batch_size,
        search_epochs=args.search_epochs,
        retrain_epochs=args.retrain_epochs,
        threads=args.threads,
        dimgrow_alpha=args.dimgrow_alpha,
        data_root=args.data_root,
        cache_dir=args.cache_dir,
    )
    if args.quick:
        cfg.datasets, cfg.seeds, cfg.search_epochs, cfg.retrain_epochs = ["planted", "movielens"], [0], 2, 3
    bad = sorted(set(cfg.datasets) - set(DATASETS)) + sorted(set(cfg.methods) - set(ALL_METHODS))
    if bad:
        raise SystemExit(f"error: unknown datasets/methods {bad}")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    quiet_logs()
    torch.set_num_threads(cfg.threads)
    command = "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = init_distributed()
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for ds in cfg.datasets:
            data = load_dataset(ds, cfg)
            for m in cfg.methods:
                for seed in cfg.seeds:
                    t = time.perf_counter()
                    runs.append(run_one(m, data, ds, cfg, seed, env))
                    r = runs[-1]
                    print(
                        f"  {ds:9s} {m:9s} seed {seed}: Σdim {r['total_dim']:4d}  test AUC {r['test_auc']:.4f}"
                        f"  ({time.perf_counter() - t:.0f}s)",
                        flush=True,
                    )
    finally:
        destroy_distributed()
    table = summarise(runs)
    from torchrec_dimgrow.config import DimGrowConfig

    dimgrow = DimGrowConfig(d_max=cfg.d_max)
    if cfg.dimgrow_alpha is not None:
        dimgrow.alpha = cfg.dimgrow_alpha
    meta = {
        "command": command.strip(),
        "config": asdict(cfg),
        "dimgrow_config": dimgrow.to_dict(),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_rows(runs, args.out, "quality_runs", meta)
    write_rows(table, args.out, "quality", meta)
    print()
    print(markdown_table(table, list(table[0].keys()) if table else [], digits=1))
    print(f"\n{meta['command']}  ({meta['wall_s']} s) -> {args.out}/quality.{{csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
