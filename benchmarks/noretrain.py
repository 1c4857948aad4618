"""Can a user skip the retrain? Serving the searched weights against retraining at the found dims.

    python -m torchrec_dimgrow bench noretrain --data movielens --seeds 0,1,2
    python -m torchrec_dimgrow bench noretrain --data planted --seeds 0
    python -m torchrec_dimgrow bench noretrain --data shaped --rows 200000 --seeds 0

For each seed ``s``: one batch DimGrow search (package defaults, one rank, in process,
``TrainConfig(seed=s)``), then four ways to get a plain TorchRec model:

(a) **retrain**: the ``retrain`` recipe from scratch at the found dims (``dims.json``; its
    default epochs and early stopping, seed ``s``);
(b) **fold**: the searched weights as they are at the end of the search, folded into the
    retrain model by :mod:`torchrec_dimgrow.online` (``kept_slots`` / ``fold`` /
    ``load_into_ctr``: the publish step of ``search --stream``), the noise of each active
    column fixed at its mean over the training split (one pass of lookups, timed with the
    fold); no training;
(c) **fold + fine-tune**: (b) trained ``--finetune-epochs`` more epochs with the retrain's
    optimiser (Adam, ``train.lr``) and early stopping (``training.fit``); the best validation
    epoch is kept, or (b)'s weights when no epoch beats them on validation;
(d) **uniform d_max**: the ``retrain`` recipe with ``d_max`` dims for every field.

The fold keeps the columns whose gate is above ``final_threshold`` *now* (the last step);
``dims.json`` reads the gates of the best-validation epoch. The two can differ: the table
reports both byte counts, and ``dims_match`` says on how many seeds they agreed.

Per row: test AUC (mean ± std over seeds), embedding bytes (4 x sum(vocab x dim)), and wall
seconds of the whole path: search + retrain (a), search + fold (b), search + fold +
fine-tune (c), the uniform retrain alone (d). ``fold_err`` is the largest |logit| difference
between the folded model and :func:`~torchrec_dimgrow.online.reference_logits` (the
trainer's network computing the published function) on the first test batch: float32
rounding when the fold is right. Each seed's result is cached under ``--work``; the table
goes to stdout and ``<out>/noretrain_<data>.{csv,json}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cached, embedding_bytes, markdown_table, mean_std, quiet_logs, write_rows

COLUMNS = ["path", "auc", "auc_std", "delta_vs_retrain", "bytes", "wall_s", "cost", "runs"]
PATHS = {
    "retrain": ("(a) search + retrain at found dims", "search + retrain"),
    "fold": ("(b) search + fold (no retrain)", "search + fold"),
    "finetune": ("(c) search + fold + fine-tune", "search + fold + fine-tune"),
    "uniform": ("(d) uniform d_max, no search", "one retrain"),
}


def load(args: argparse.Namespace) -> tuple[str, Any]:
    """(name, PreparedData); ``--data planted --rows N`` gives a smaller planted dataset."""
    if args.data == "planted" and args.rows:
        from torchrec_dimgrow.data.synthetic import HubConfig, planted_hub

        return "planted", planted_hub(HubConfig(rows=args.rows, seed=args.data_seed))
    from frontier import load as frontier_load

    return frontier_load(args)


def column_means(search: Any, batches: Iterable[Any]) -> Any:
    """Every active column's mean lookup over ``batches`` (what the stream's ColumnMeans holds)."""
    import torch

    from torchrec_dimgrow.online import ColumnMeans

    coll = search.coll
    means = ColumnMeans(len(coll.table_names), int(coll.gate_values().shape[1]))
    search.dmp.eval()
    with torch.no_grad():
        for batch in batches:
            pooled = coll.ebc(batch.sparse_features)
            if hasattr(pooled, "wait") and not hasattr(pooled, "values"):
                pooled = pooled.wait()
            means.add(coll, pooled)
    search.dmp.train()
    return means.mean()


def fold_search(search: Any, data: Any, tc: Any) -> tuple[Any, dict[str, int], float]:
    """(plain CTRModel, its dims, fold_err): the search's weights folded as ``search --stream`` publishes."""
    import torch
    from torchrec.distributed.model_parallel import get_unwrapped_module

    from torchrec_dimgrow.online import fold, gather_active_tables, load_into_ctr, reference_logits
    from torchrec_dimgrow.recipes.retrain import retrain_spec
    from torchrec_dimgrow.saved_model import build_model

    head = get_unwrapped_module(search.dmp).head
    active = gather_active_tables(search.coll, search.store)
    mu = column_means(search, data.train.batches(tc.batch_size))
    folded = fold(search.coll, active, mu)
    dims = {f: int(folded.dims[f]) for f in data.fields}
    plain = load_into_ctr(build_model(retrain_spec(data, dims, tc)), folded, head)
    feats = next(iter(data.test.batches(tc.batch_size))).sparse_features
    with torch.no_grad():
        err = float(
            (plain(feats).float() - reference_logits(search.coll, head, active, mu, feats)).abs().max()
        )
    return plain, dims, err


def finetune(model: Any, data: Any, tc: Any) -> dict[str, float]:
    """``tc.epochs`` of the retrain's loop from ``model``'s weights; test AUC of the best epoch by
    validation AUC, or of the starting weights when no epoch beats them (``kept_start``)."""
    import torch

    from torchrec_dimgrow.recipes.retrain import train_to_best
    from torchrec_dimgrow.training import evaluate

    torch.manual_seed(tc.seed)
    start = copy.deepcopy(model.state_dict())
    start_val = evaluate(model, data.val, tc.batch_size)["auc"]
    _, _, early = train_to_best(model, data, tc)
    kept_start = not early.best > start_val  # no epoch beat the folded weights on validation
    if kept_start:
        model.load_state_dict(start)
    return {**evaluate(model, data.test, tc.batch_size), "kept_start": float(kept_start)}


def one_seed(seed: int, data: Any, args: argparse.Namespace, env: Any) -> dict[str, Any]:
    """Every path of one seed: AUCs, dims and wall seconds."""
    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.retrain import retrain
    from torchrec_dimgrow.recipes.search import DimGrowSearch, SearchOptions
    from torchrec_dimgrow.training import evaluate

    bs = args.batch_size
    search_tc = TrainConfig(
        seed=seed, batch_size=bs, **({"epochs": args.search_epochs} if args.search_epochs else {})
    )
    retrain_tc = TrainConfig(
        seed=seed, batch_size=bs, **({"epochs": args.retrain_epochs} if args.retrain_epochs else {})
    )
    dg = DimGrowConfig(d_max=args.d_max)
    out: dict[str, Any] = {"seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        search = DimGrowSearch(
            data, dg, search_tc, PlanningConfig(), env, SearchOptions(Path(tmp), quiet=True)
        )
        result = search.run()
        out["search_s"] = time.perf_counter() - t0
        out["found_dims"] = {f: int(result["dims"][f]) for f in data.fields}
        out["search_test_auc"] = float(result["metrics"]["search_test_auc"])
        t0 = time.perf_counter()
        plain, out["fold_dims"], out["fold_err"] = fold_search(search, data, retrain_tc)
        out["fold_auc"] = float(evaluate(plain, data.test, retrain_tc.batch_size)["auc"])
        out["fold_s"] = time.perf_counter() - t0
        del search
    t0 = time.perf_counter()
    ft_tc = TrainConfig(seed=seed, batch_size=bs, epochs=args.finetune_epochs)
    tuned = finetune(plain, data, ft_tc)
    out["finetune_auc"], out["finetune_kept_start"] = float(tuned["auc"]), bool(tuned["kept_start"])
    out["finetune_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["retrain_auc"] = float(retrain(out["found_dims"], data, retrain_tc)["test_auc"])
    out["retrain_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = dict.fromkeys(data.fields, args.d_max)
    out["uniform_auc"] = float(retrain(full, data, retrain_tc)["test_auc"])
    out["uniform_s"] = time.perf_counter() - t0
    return out


def rows_of(runs: Sequence[dict[str, Any]], vocab: dict[str, int], d_max: int) -> list[dict[str, Any]]:
    """One table row per path over the seeds."""
    full = dict.fromkeys(vocab, d_max)
    per_path = {
        "retrain": [(r["retrain_auc"], r["found_dims"], r["search_s"] + r["retrain_s"]) for r in runs],
        "fold": [(r["fold_auc"], r["fold_dims"], r["search_s"] + r["fold_s"]) for r in runs],
        "finetune": [
            (r["finetune_auc"], r["fold_dims"], r["search_s"] + r["fold_s"] + r["finetune_s"]) for r in runs
        ],
        "uniform": [(r["uniform_auc"], full, r["uniform_s"]) for r in runs],
    }
    base = mean_std(r["retrain_auc"] for r in runs)[0]
    rows = []
    for key, points in per_path.items():
        auc, std = mean_std(p[0] for p in points)
        rows.append(
            {
                "path": PATHS[key][0],
                "auc": round(auc, 4),
                "auc_std": round(std, 4),
                "delta_vs_retrain": round(auc - base, 4),
                "bytes": round(mean_std(embedding_bytes(vocab, p[1]) for p in points)[0]),
                "wall_s": round(mean_std(p[2] for p in points)[0]),
                "cost": PATHS[key][1],
                "runs": len(points),
                "per_seed_auc": [round(p[0], 5) for p in points],
                "dims": [" ".join(str(p[1][f]) for f in vocab) for p in points],
            }
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrec_dimgrow bench noretrain",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="movielens|criteo|avazu|planted|fm|shaped or a path")
    p.add_argument("--format", default="", help="format of a --data path")
    p.add_argument("--rows", type=int, default=None, help="rows of a synthetic dataset")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1", help="one search (and one of each path) per seed")
    p.add_argument("--d-max", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256, help="of every path (256: the package default)")
    p.add_argument("--search-epochs", type=int, default=0, help="0: the package default")
    p.add_argument("--retrain-epochs", type=int, default=0, help="0: the package default")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("runs/bench/noretrain"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    quiet_logs()
    import torch

    from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed

    torch.set_num_threads(args.threads)
    name, data = load(args)
    vocab = data.vocab()
    settings = f"e{args.search_epochs}-{args.retrain_epochs}-{args.finetune_epochs}-d{args.d_max}"
    settings += f"-b{args.batch_size}" if args.batch_size != 256 else ""
    work = args.work / f"{name}{'-' + str(args.rows) if args.rows else ''}-{settings}"
    env = init_distributed("gloo")
    start = time.perf_counter()
    runs = []
    try:
        for seed in seeds:
            runs.append(cached(work / f"seed{seed}.json", lambda seed=seed: one_seed(seed, data, args, env)))  # type: ignore[misc]
            print(f"  seed {seed}: {runs[-1]}", flush=True)
    finally:
        destroy_distributed()
    rows = rows_of(runs, vocab, args.d_max)
    stem = f"noretrain_{name}"
    command = "python -m torchrec_dimgrow bench noretrain " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    meta = {
        "command": command,
        "fields": list(vocab),
        "rows": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
        "dims_match": sum(r["found_dims"] == r["fold_dims"] for r in runs),
        "finetune_kept_start": sum(bool(r.get("finetune_kept_start")) for r in runs),
        "fold_err_max": max(r["fold_err"] for r in runs),
        "search_test_auc": [r["search_test_auc"] for r in runs],
        "wall_s": round(time.perf_counter() - start, 1),
        "runs": runs,
    }
    print(markdown_table(rows, COLUMNS))
    print(
        f"\nfound dims = folded dims on {meta['dims_match']}/{len(runs)} seeds; fold_err max {meta['fold_err_max']:.2e}"
    )
    write_rows(rows, args.out, stem, meta)
    print(f"\n{command} -> {args.out}/{stem}.{{csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
