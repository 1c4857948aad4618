"""1-rank vs 2-rank DimGrow search on the same data and seed, against uniform dims.

    python benchmarks/ranks.py --data ../shared/data/movielens-100k --format movielens --uniform 4,8,16

The 2-rank search uses ``torchrun --nproc_per_node=2`` with half the per-rank batch, so both
runs see the same global batch of rows per step. Each found-dims file is retrained with the
shared ``retrain`` recipe over ``--seeds``. Prints a markdown table; writes
``benchmarks/results/ranks_<dataset>.{csv,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, markdown_table, mean_std, pm, write_rows


def run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--format", required=True)
    p.add_argument("--batch-size", type=int, default=256, help="global batch (split over the ranks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2", help="retrain seeds")
    p.add_argument("--uniform", default="", help="also retrain uniform dims, e.g. 4,8,16")
    p.add_argument("--ranks", default="1,2", help="search world sizes")
    p.add_argument("--work", type=Path, default=Path("runs/bench/ranks"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    py = sys.executable
    data = ["--data", args.data, "--format", args.format]
    name = Path(args.data).name
    rows = []
    seeds = [int(x) for x in args.seeds.split(",")]
    for dim in [int(x) for x in args.uniform.split(",") if x]:
        out = args.work / f"{name}-uniform{dim}"
        aucs = []
        for s in seeds:
            run([py, "-m", "torchrec_dimgrow", "retrain", "--uniform-dim", str(dim), *data,
                 "--out", str(out / f"retrain-{s}"), "--cache-dir", str(out / "data"), "--seed", str(s), "--quiet"])  # fmt: skip
            m = json.loads((out / f"retrain-{s}" / "metrics.json").read_text())
            aucs.append(m["test_auc"])
        rows.append({"method": f"uniform {dim}", "total_dim": m["total_dim"], "embedding_bytes": m["embedding_bytes"],
                     "retrain_test_auc": pm(aucs), "auc_mean": mean_std(aucs)[0]})  # fmt: skip
    for ranks in [int(x) for x in args.ranks.split(",")]:
        out = args.work / f"{name}-{ranks}rank"
        launcher = [py] if ranks == 1 else [py, "-m", "torch.distributed.run", "--nproc_per_node=2"]
        run([*launcher, "-m", "torchrec_dimgrow", "search", *data, "--out", str(out), "--quiet",
             "--seed", str(args.seed), "--batch-size", str(args.batch_size // ranks)])  # fmt: skip
        dims = json.loads((out / "dims.json").read_text())
        search = json.loads((out / "metrics.json").read_text())
        aucs, bytes_ = [], 0
        for s in seeds:
            rt = out / f"retrain-{s}"
            run([py, "-m", "torchrec_dimgrow", "retrain", "--dims", str(out / "dims.json"), *data,
                 "--out", str(rt), "--seed", str(s), "--quiet"])  # fmt: skip
            m = json.loads((rt / "metrics.json").read_text())
            aucs.append(m["test_auc"])
            bytes_ = m["embedding_bytes"]
        mean, _ = mean_std(aucs)
        rows.append(
            {
                "method": f"dimgrow {ranks} rank{'s' if ranks > 1 else ''}",
                "ranks": ranks,
                "per_rank_batch": args.batch_size // ranks,
                "dims": " ".join(f"{k}:{v}" for k, v in dims.items()),
                "total_dim": sum(dims.values()),
                "embedding_bytes": bytes_,
                "search_val_auc": round(search["val_auc"], 4),
                "replans": search["replans"],
                "retrain_test_auc": pm(aucs),
                "auc_mean": mean,
            }
        )
    best = max(
        (r for r in rows if r["method"].startswith("uniform")), key=lambda r: r["auc_mean"], default=None
    )
    if best is not None:
        for r in rows:
            r["auc_vs_best_uniform"] = round(r["auc_mean"] - best["auc_mean"], 4)
            r["bytes_vs_best_uniform"] = round(r["embedding_bytes"] / best["embedding_bytes"], 3)
    cols = [
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
    print(markdown_table(rows, cols))
    write_rows(rows, args.out, f"ranks_{name}", {"argv": sys.argv})


if __name__ == "__main__":
    main()
