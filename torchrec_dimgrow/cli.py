"""Command line: ``python -m torchrec_dimgrow {search,retrain,bench}``.

``search`` runs on 1 rank as a plain command and on N ranks under
``torchrun --nproc_per_node=N -m torchrec_dimgrow search ...`` (gloo on CPU, nccl on GPU,
``--backend`` overrides).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from torchrec_dimgrow.config import BudgetError, DimGrowConfig, TrainConfig, parse_budget
from torchrec_dimgrow.data import DataError, PreparedData, load_prepared, prepare
from torchrec_dimgrow.distributed.env import DistEnv, destroy_distributed, init_distributed
from torchrec_dimgrow.distributed.planning import PlanningConfig

FORMATS = ["criteo", "avazu", "movielens", "parquet", "csv"]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="file prefix, directory (movielens) or '{split}' pattern")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--label-col", default="label")
    p.add_argument("--drop-cols", default="", help="comma-separated columns to ignore (parquet/csv)")
    p.add_argument("--min-count", type=int, default=2, help="ids seen fewer times share bucket 0")
    p.add_argument("--cache-dir", type=Path, default=None, help="prepared data (default OUT/data)")


def _add_train_args(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=256, help="per-rank batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of dense layers")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--patience", type=int, default=2, help="early-stopping patience (epochs)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="intra-op CPU threads (default: $OMP_NUM_THREADS or 1; CTR-sized matmuls gain nothing "
        "from more, and on a busy machine spinning OpenMP threads cost 10-30x)",
    )


def _budget_arg(text: str) -> float:
    try:
        return parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrec_dimgrow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run a DimGrow search and export dims.json")
    _add_data_args(s)
    _add_train_args(s, epochs=10)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--d-max", type=int, default=16)
    s.add_argument("--alpha", type=float, default=None, help="penalty knob (default per --penalty-mode)")
    s.add_argument("--penalty-mode", choices=["auto", "fixed"], default="auto")
    s.add_argument(
        "--penalty-weighting",
        choices=["bytes", "uniform"],
        default="bytes",
        help="charge a slot by its table's bytes (default) or every slot the same (the paper)",
    )
    s.add_argument(
        "--budget",
        type=_budget_arg,
        default=None,
        help="embedding memory cap: bytes (48MiB, 2.5GB, 1000000) or a fraction of the d_max model (0.3)",
    )
    s.add_argument("--gate-lr", type=float, default=1e-3)
    s.add_argument("--check-interval", type=int, default=1)
    s.add_argument("--grow-threshold", type=float, default=0.6)
    s.add_argument("--shrink-threshold", type=float, default=0.01)
    s.add_argument("--grow-patience", type=int, default=1)
    s.add_argument("--shrink-patience", type=int, default=1)
    s.add_argument("--shrink-slot", choices=["lowest", "last"], default="lowest")
    s.add_argument(
        "--final-gates",
        choices=["epoch", "step"],
        default="step",
        help="export from the best epoch's last gates (step) or each slot's epoch-mean gate (epoch)",
    )
    s.add_argument(
        "--embedding-optimizer", choices=["adagrad", "rowwise_adagrad", "sgd", "adam"], default="adagrad"
    )
    s.add_argument("--embedding-lr", type=float, default=0.05)
    s.add_argument(
        "--sharding",
        choices=["auto", "table_wise", "column_wise", "table_column_wise", "row_wise"],
        default="auto",
    )
    s.add_argument("--backend", choices=["gloo", "nccl"], default=None)
    s.add_argument("--resume", type=Path, default=None, help="run dir (or its checkpoint/) to continue")
    s.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    s.add_argument("--log-every", type=int, default=50)

    r = sub.add_parser("retrain", help="train a plain TorchRec model with found or uniform dims")
    _add_data_args(r)
    _add_train_args(r, epochs=20)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--dims", type=Path, help="dims.json from a search")
    g.add_argument("--uniform-dim", type=int, help="same dim for every field")
    r.add_argument("--out", type=Path, required=True)

    ev = sub.add_parser("evaluate", help="test AUC of a model saved by retrain")
    ev.add_argument("--model", type=Path, required=True, help="retrain --out directory (or its model/)")
    _add_data_args(ev)
    ev.add_argument("--batch-size", type=int, default=256)

    x = sub.add_parser("export", help="write a TorchScript serving model on TorchRec's quantized tables")
    x.add_argument("--model", type=Path, required=True, help="retrain --out directory (or its model/)")
    x.add_argument("--serving", required=True, help="fp32, fp16, int8 or int4")
    x.add_argument("--out", type=Path, required=True)
    x.add_argument(
        "--row-alignment", type=int, default=1, help="bytes per row alignment (TorchRec: 1 CPU, 16 CUDA)"
    )

    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ (source checkout)")
    b.add_argument("name", choices=["memory", "quality", "overhead", "replan", "dlrm", "frontier"])
    b.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _prepare_on_rank0(args: argparse.Namespace, cache: Path, env: DistEnv) -> PreparedData:
    """Rank 0 prepares the data; every rank learns of a failure (no rank left waiting)."""
    error: list[str | None] = [None]
    if env.is_main:
        try:
            prepare(
                args.data,
                args.format,
                cache,
                label_col=args.label_col,
                drop_cols=[c for c in args.drop_cols.split(",") if c],
                min_count=args.min_count,
            )
        except (DataError, OSError, ValueError) as exc:
            error = [f"{type(exc).__name__}: {exc}"]
    if env.world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise DataError(str(error[0]).split(": ", 1)[-1])
    return load_prepared(cache)


def _cmd_search(args: argparse.Namespace) -> int:
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    alpha = args.alpha if args.alpha is not None else (0.1 if args.penalty_mode == "auto" else 0.01)
    dg = DimGrowConfig(
        d_max=args.d_max,
        alpha=alpha,
        penalty_mode=args.penalty_mode,
        penalty_weighting=args.penalty_weighting,
        gate_lr=args.gate_lr,
        check_interval=args.check_interval,
        grow_threshold=args.grow_threshold,
        shrink_threshold=args.shrink_threshold,
        grow_patience=args.grow_patience,
        shrink_patience=args.shrink_patience,
        shrink_slot=args.shrink_slot,
        final_gates=args.final_gates,
        budget=args.budget,
    )
    tc = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        embedding_optimizer=args.embedding_optimizer,
        embedding_lr=args.embedding_lr,
        early_stop_patience=args.patience,
        seed=args.seed,
        max_steps=args.max_steps,
    )
    env = init_distributed(args.backend)
    out: Path = args.out
    created = not out.exists()
    try:
        data = _prepare_on_rank0(args, args.cache_dir or out / "data", env)
        planning = PlanningConfig(sharding=args.sharding, batch_size=args.batch_size)
        opts = SearchOptions(
            out,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            quiet=args.quiet,
        )
        result = run_search(data, dg, tc, planning, env, opts)
    except (DataError, BudgetError):
        if created and env.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        destroy_distributed()
    if env.is_main:
        m = result["metrics"]
        print(
            f"dims: {json.dumps(result['dims'])}\n"
            f"val_auc {m['val_auc']:.4f}  total_dim {m['found_total_dim']}  replans {m['replans']}  "
            f"world_size {m['world_size']}  -> {out / 'dims.json'}"
        )
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from torchrec_dimgrow.export import read_dims_json
    from torchrec_dimgrow.recipes.retrain import retrain

    out: Path = args.out
    cache = args.cache_dir
    if cache is None and args.dims is not None and (args.dims.parent / "data" / "meta.json").is_file():
        cache = args.dims.parent / "data"  # reuse the search's vocab
    created = not out.exists()
    try:
        env = DistEnv(0, 1, 0, torch.device("cpu"), "none")
        data = _prepare_on_rank0(args, cache or out / "data", env)
        dims = (
            read_dims_json(args.dims, data.fields)
            if args.dims
            else {f: args.uniform_dim for f in data.fields}
        )
        tc = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            early_stop_patience=args.patience,
            seed=args.seed,
            max_steps=args.max_steps,
        )
        metrics = retrain(dims, data, tc, out, quiet=args.quiet)
    except (DataError, ValueError, FileNotFoundError):
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    print(
        f"test_auc {metrics['test_auc']:.4f}  test_logloss {metrics['test_logloss']:.4f}  embedding_bytes {metrics['embedding_bytes']}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from torchrec_dimgrow.recipes.evaluate import evaluate_saved
    from torchrec_dimgrow.saved_model import ModelError, read_spec

    try:
        read_spec(args.model)  # a bad model dir fails before the data is prepared
        with tempfile.TemporaryDirectory(prefix="dimgrow-eval-") as tmp:
            env = DistEnv(0, 1, 0, torch.device("cpu"), "none")
            data = _prepare_on_rank0(args, args.cache_dir or Path(tmp) / "data", env)
            metrics = evaluate_saved(args.model, data, args.batch_size)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"test_auc {metrics['test_auc']:.6f}  test_logloss {metrics['test_logloss']:.6f}  val_auc {metrics['val_auc']:.6f}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from torchrec_dimgrow.recipes.export import export_saved

    try:
        meta = export_saved(args.model, args.serving, args.out, args.row_alignment)
    except ValueError as exc:  # ModelError included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"serving {meta['serving']}  serving_bytes {meta['serving_bytes']}  padding_bytes {meta['padding_bytes']}  "
        f"dropped {meta['dropped_fields']}  -> {args.out / 'serving.pt'}"
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        print(f"benchmark {script} not found: 'bench' needs a source checkout", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("DIMGROW_LOG", "WARNING"))
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        if args.command == "search":
            return _cmd_search(args)
        if args.command == "retrain":
            return _cmd_retrain(args)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "export":
            return _cmd_export(args)
        return _cmd_bench(args)
    except (DataError, FileNotFoundError, BudgetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
