"""Found dims vs uniform dims: 1-rank and 2-rank DimGrow searches, each retrained over seeds.

    python benchmarks/ranks.py --data ../shared/data/movielens-100k --format movielens --uniform 4,8,16

The 2-rank search uses ``torchrun --nproc_per_node=2`` with half the per-rank batch, so both
runs see the same global batch of rows per step. Each found-dims file is retrained with the
shared ``retrain`` recipe over ``--seeds``. ``--search-seeds 0,1,2`` repeats every search
(the found dims vary with the search seed more than with anything else) and adds a mean row;
``--search-args`` passes extra flags to ``search`` (e.g. ``--set dimgrow.preset=paper``) and
``--label`` names that variant in the table. Prints a markdown table; writes
``benchmarks/results/ranks_<dataset>[_<label>].{csv,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, markdown_table, mean_std, pm, write_rows

COLUMNS = [
    "method",
    "auc_vs_best_uniform",
    "bytes_vs_best_uniform",
    "per_rank_batch",
    "total_dim",
    "embedding_bytes",
    "search_val_auc",
    "replans",
    "retrain_test_auc",
    "dims",
]


def run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def retrain_all(
    spec: list[str], data: list[str], out: Path, seeds: list[int], pool: ThreadPoolExecutor
) -> list[dict]:
    """Retrain ``spec`` (``--dims F`` or ``--uniform-dim D``) once per seed; metrics in seed order."""
    py = sys.executable

    def one(s: int) -> dict:
        rt = out / f"retrain-{s}"
        run([py, "-m", "torchrec_dimgrow", "retrain", *spec, *data, "--out", str(rt),
             "--set", f"data.cache_dir={out / 'data'}", "--seed", str(s), "--quiet", "--overwrite"])  # fmt: skip
        return json.loads((rt / "metrics.json").read_text())

    if (out / "data" / "meta.json").exists():
        return list(pool.map(one, seeds))
    first = one(seeds[0])  # prepares the data cache; parallel runs would race on it
    return [first, *pool.map(one, seeds[1:])]


def search_row(
    args: argparse.Namespace, ranks: int, seed: int, out: Path, pool: ThreadPoolExecutor
) -> dict[str, Any]:
    py = sys.executable
    data = ["--data", args.data, "--format", args.format]
    launcher = [py] if ranks == 1 else [py, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    run([*launcher, "-m", "torchrec_dimgrow", "search", *data, "--out", str(out), "--quiet", "--overwrite", "--seed", str(seed),
         "--batch-size", str(args.batch_size // ranks), *shlex.split(args.search_args)])  # fmt: skip
    dims = json.loads((out / "dims.json").read_text())
    search = json.loads((out / "metrics.json").read_text())
    metrics = retrain_all(["--dims", str(out / "dims.json")], data, out, args.retrain_seeds, pool)
    aucs = [m["test_auc"] for m in metrics]
    label = f" {args.label}" if args.label else ""
    return {
        "method": f"dimgrow{label} {ranks} rank{'s' if ranks > 1 else ''}"
        + (f" seed {seed}" if len(args.search_seed_list) > 1 else ""),
        "ranks": ranks,
        "search_seed": seed,
        "per_rank_batch": args.batch_size // ranks,
        "dims": " ".join(f"{k}:{v}" for k, v in dims.items()),
        "total_dim": sum(dims.values()),
        "embedding_bytes": metrics[0]["embedding_bytes"],
        "search_val_auc": round(search["val_auc"], 4),
        "replans": search["replans"],
        "retrain_test_auc": pm(aucs),
        "auc_mean": mean_std(aucs)[0],
    }


def mean_row(rows: list[dict[str, Any]], method: str) -> dict[str, Any]:
    """Mean over search seeds: retrain AUC means and bytes averaged (a search seed is one draw)."""
    aucs = [r["auc_mean"] for r in rows]
    return {
        "method": method,
        "per_rank_batch": rows[0]["per_rank_batch"],
        "total_dim": f"{mean_std(r['total_dim'] for r in rows)[0]:.1f}",
        "embedding_bytes": round(mean_std(r["embedding_bytes"] for r in rows)[0]),
        "retrain_test_auc": pm(aucs) + " (over search seeds)",
        "auc_mean": mean_std(aucs)[0],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--format", required=True)
    p.add_argument("--batch-size", type=int, default=256, help="global batch (split over the ranks)")
    p.add_argument("--search-seeds", default="0", help="search seeds, e.g. 0,1,2")
    p.add_argument("--seeds", default="0,1,2", help="retrain seeds")
    p.add_argument("--uniform", default="", help="also retrain uniform dims, e.g. 4,8,16")
    p.add_argument("--ranks", default="1,2", help="search world sizes")
    p.add_argument("--search-args", default="", help="extra flags for every search, one string")
    p.add_argument("--label", default="", help="names the search variant in rows and output files")
    p.add_argument("--jobs", type=int, default=1, help="retrains run in parallel (1 CPU each)")
    p.add_argument("--work", type=Path, default=Path("runs/bench/ranks"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    args.retrain_seeds = [int(x) for x in args.seeds.split(",")]
    args.search_seed_list = [int(x) for x in args.search_seeds.split(",")]
    data = ["--data", args.data, "--format", args.format]
    name = Path(args.data).name
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for dim in [int(x) for x in args.uniform.split(",") if x]:
            metrics = retrain_all(["--uniform-dim", str(dim)], data, args.work / f"{name}-uniform{dim}",
                                  args.retrain_seeds, pool)  # fmt: skip
            aucs = [m["test_auc"] for m in metrics]
            rows.append({"method": f"uniform {dim}", "total_dim": metrics[0]["total_dim"],
                         "embedding_bytes": metrics[0]["embedding_bytes"], "retrain_test_auc": pm(aucs),
                         "auc_mean": mean_std(aucs)[0]})  # fmt: skip
        suffix = f"-{args.label}" if args.label else ""
        for ranks in [int(x) for x in args.ranks.split(",")]:
            runs = [
                search_row(args, ranks, seed, args.work / f"{name}{suffix}-{ranks}rank-seed{seed}", pool)
                for seed in args.search_seed_list
            ]
            rows += runs
            if len(runs) > 1:
                rows.append(mean_row(runs, runs[0]["method"].rsplit(" seed", 1)[0] + " mean"))
    best = max(
        (r for r in rows if r["method"].startswith("uniform")), key=lambda r: r["auc_mean"], default=None
    )
    if best is not None:
        for r in rows:
            r["auc_vs_best_uniform"] = round(r["auc_mean"] - best["auc_mean"], 4)
            r["bytes_vs_best_uniform"] = round(r["embedding_bytes"] / best["embedding_bytes"], 3)
    print(markdown_table(rows, COLUMNS))
    write_rows(rows, args.out, f"ranks_{name}{'_' + args.label if args.label else ''}", {"argv": sys.argv})


if __name__ == "__main__":
    main()
