"""Cold start on interaction-only data: does every search seed grow the signal fields?

    python benchmarks/coldstart.py --seeds 0,1,2,3,4                  # package defaults
    python benchmarks/coldstart.py --seeds 0,1,2,3,4 --set initial_dim=4 --label init4
    python benchmarks/coldstart.py --seeds 0,1,2 --rows 65000 --signal 6 --exponent 1.0 \
        --vocab 50,5000,120,800,2000,300,60,1500,400,3000,90,200 \
        --ranks 0,4,2,8,1,6,0,3,5,2,0,8 --label zipf        # Zipf ids, cheap noise fields

Runs the 1-rank DimGrow search recipe on :func:`~torchrec_dimgrow.data.synthetic.fm_interactions`
(a factorization-machine teacher over hidden per-field ranks 0,0,1,2,4,8, no main
effects) once per search seed and reports, per seed, the found dims, their Spearman
correlation with the hidden ranks, the epochs run, whether the search stalled (stopped
with every field at <= 1 logical dim) and whether it learned (``metrics["learned"]``: best
validation AUC 2 standard errors above its start). ``--vocab``/``--ranks``/``--exponent``/
``--signal`` shape the data (per-field rows, Zipf ids): the ``zipf`` line above is the shape on
which searches end at chance AUC. ``--set key=value`` overrides a ``DimGrowConfig`` field.
Writes ``<out>/coldstart[_<label>].{csv,json}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, quiet_logs, write_rows

COLUMNS = [
    "search_seed",
    "spearman",
    "stalled",
    "learned",
    "epochs",
    "learn_epochs",
    "best_epoch",
    "val_auc",
    "max_logical",
    "dims",
    "val_aucs",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2,3,4", help="search seeds")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--vocab", default="20", help="rows of every field, or one per field (comma-separated)")
    p.add_argument("--ranks", default="0,0,1,2,4,8", help="hidden rank per field")
    p.add_argument("--exponent", type=float, default=None, help="Zipf exponent of the ids (default uniform)")
    p.add_argument("--signal", type=float, default=3.0)
    p.add_argument("--set", action="append", default=[], help="DimGrowConfig override key=value")
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    quiet_logs()
    import torch
    from scipy.stats import spearmanr

    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.data.synthetic import FMConfig, fm_interactions
    from torchrec_dimgrow.distributed.env import init_distributed
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search
    from torchrec_dimgrow.runconfig import parse_overrides

    torch.set_num_threads(1)
    overrides = parse_overrides(args.set)
    dg = DimGrowConfig(**overrides)
    vocab = [int(v) for v in args.vocab.split(",")]
    data = fm_interactions(
        FMConfig(
            rows=args.rows,
            seed=args.data_seed,
            vocab=vocab[0] if len(vocab) == 1 else tuple(vocab),
            ranks=tuple(int(r) for r in args.ranks.split(",")),
            signal=args.signal,
            exponent=args.exponent,
        )
    )
    need = data.source["need"]
    env = init_distributed("gloo")
    rows: list[dict[str, Any]] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        tc = TrainConfig(epochs=args.epochs, seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            result = run_search(data, dg, tc, PlanningConfig(), env, SearchOptions(Path(tmp), quiet=True))
        dims, m = result["dims"], result["metrics"]
        peak = max(int(h["total_dim"]) for h in m["history"])
        rows.append(
            {
                "search_seed": seed,
                "spearman": round(
                    float(spearmanr([need[f] for f in need], [dims[f] for f in need]).statistic), 3
                ),
                "stalled": all(d <= 1 for d in dims.values()) and peak <= len(dims),
                "learned": m["learned"],
                "epochs": m["epochs"],
                "learn_epochs": m.get("learn_epochs", 0),
                "best_epoch": m["best_epoch"],
                "val_auc": round(m["val_auc"], 4),
                "max_logical": peak,
                "dims": " ".join(str(dims[f]) for f in need),
                "val_aucs": " ".join(f"{h['val_auc']:.3f}" for h in m["history"]),
            }
        )
        print(markdown_table(rows[-1:], COLUMNS), flush=True)
    print(markdown_table(rows, COLUMNS))
    stem = "coldstart" + (f"_{args.label}" if args.label else "")
    write_rows(rows, args.out, stem, {"argv": sys.argv, "need": need, "overrides": overrides})


if __name__ == "__main__":
    main()
