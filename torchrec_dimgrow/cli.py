"""Command line: ``python -m torchrec_dimgrow {search,retrain,baseline,bench}``.

``search`` runs on 1 rank as a plain command and on N ranks under
``torchrun --nproc_per_node=N -m torchrec_dimgrow search ...`` (gloo on CPU, nccl on GPU,
``--backend`` overrides).

Exit codes: 0 success; 2 an expected failure (bad flag, data, output dir, checkpoint or saved
model, full disk, a live run on the same ``--out``, or a diverged run), reported as one
``error:`` line on stderr by rank 0 and with code 2 on every rank; 3 the search finished but
kept no field and ``--strict`` was given; 130 Ctrl-C (one line saying how to resume); 1 (with
a traceback) a bug.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import logging
import os
import runpy
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from torchrec_dimgrow.baselines import BASELINES
from torchrec_dimgrow.config import DimGrowConfig, TrainConfig, parse_budget
from torchrec_dimgrow.data import FORMATS, PreparedData, load_prepared, prepare
from torchrec_dimgrow.diskwrite import disk_errors
from torchrec_dimgrow.distributed.env import DistEnv, destroy_distributed, init_distributed
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.errors import (
    CheckpointError,
    DataError,
    DimGrowError,
    DirectoryInUse,
    DiskError,
    Interrupted,
    NonFiniteError,
    UsageError,
)
from torchrec_dimgrow.manifest import Verified, compare_data, data_fingerprint, peek, select
from torchrec_dimgrow.optim import EmbeddingOptimizer
from torchrec_dimgrow.runlock import run_lock, sibling_lock
from torchrec_dimgrow.validation import (
    RETRAIN_OUTPUTS,
    SEARCH_OUTPUTS,
    STREAM_OUTPUTS,
    OutputGuard,
    apply_saved_config,
    check_out_dir,
    check_ranges,
    clear_previous,
    explicit_dests,
    run_config,
)

log = logging.getLogger("torchrec_dimgrow")

EXIT_USAGE = 2
EXIT_STRICT = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C'd command
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, help="file prefix, directory (movielens: 100K or 1M) or '{split}' pattern"
    )
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--label-col", default="label", help="label column (parquet/csv only)")
    p.add_argument("--drop-cols", default="", help="comma-separated columns to ignore (parquet/csv only)")
    p.add_argument("--min-count", type=int, default=2, help="ids seen fewer times share bucket 0")
    p.add_argument("--cache-dir", type=Path, default=None, help="prepared data (default OUT/data)")


def _add_train_args(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=256, help="per-rank batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr of dense layers")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--patience", type=int, default=2, help="early-stopping patience (epochs)")
    p.add_argument("--quiet", action="store_true", help="only results, warnings and errors")
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="package log level (default INFO: one line per epoch; WARNING with --quiet; $DIMGROW_LOG)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
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


def _initial_dim_arg(text: str) -> int | None:
    if text == "block":
        return None
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an int or 'block', got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrec_dimgrow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="run a DimGrow search and export dims.json")
    _add_data_args(s)
    _add_train_args(s, epochs=10)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument(
        "--strict", action="store_true", help="exit 3 when the search keeps no field (default: warn)"
    )
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
    s.add_argument(
        "--votes",
        type=int,
        default=1,
        help="run K searches (seeds --seed .. --seed+K-1, each kept in OUT/votes/seed-N) and export "
        "their per-field median dims, within --budget: dims that move less between seeds, at K "
        "times the cost (default 1: one search)",
    )
    s.add_argument(
        "--budget-pressure",
        type=float,
        default=DimGrowConfig().budget_pressure,
        help="with --budget: scale the gate penalty by min(1, bytes/budget)**this, so the search "
        "grows toward the budget (default 0: the full penalty, the budget is only a cap)",
    )
    s.add_argument(
        "--initial-dim",
        type=_initial_dim_arg,
        default=DimGrowConfig().initial_dim,
        help="starting dim of every field: an int (default 1, the paper's), or 'block' = the 4 "
        "columns storage holds anyway",
    )
    s.add_argument("--gate-lr", type=float, default=1e-3)
    s.add_argument("--check-interval", type=int, default=1)
    s.add_argument("--gate-every", type=int, default=1, help="gate step on every k-th training step")
    s.add_argument("--grow-threshold", type=float, default=DimGrowConfig.grow_threshold)
    s.add_argument(
        "--grow-price-exponent",
        type=float,
        default=DimGrowConfig.grow_price_exponent,
        help="lower the growth bar of tables cheaper than the mean active slot: final_threshold + "
        "(grow_threshold - final_threshold) * min(1, bytes per dim / mean slot's) ** this; "
        "0: the paper's one bar (default 1)",
    )
    s.add_argument("--shrink-threshold", type=float, default=0.01)
    s.add_argument("--grow-patience", type=int, default=1)
    s.add_argument("--shrink-patience", type=int, default=1)
    s.add_argument("--shrink-slot", choices=["lowest", "last"], default="lowest")
    s.add_argument(
        "--cap-dims-at-rows",
        action=argparse.BooleanOptionalAction,
        default=DimGrowConfig.cap_dims_at_rows,
        help="a table never grows past its row count: an n-row table's columns span at most n "
        "dimensions (default on)",
    )
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
    # Online DimGrow (recipes/stream.py); its other settings are StreamConfig's defaults.
    s.add_argument(
        "--stream",
        action="store_true",
        help="online DimGrow: one in-order pass over the train split, publishing serving versions to "
        "OUT/versions (progressive validation, no epochs or early stopping)",
    )
    s.add_argument("--publish-every", type=int, default=None, help="with --stream: steps between versions")
    s.add_argument("--keep-versions", type=int, default=None, help="with --stream: versions kept on disk")
    s.add_argument(
        "--tensorboard", type=Path, default=None, help="also log to this TensorBoard dir (needs tensorboard)"
    )

    r = sub.add_parser("retrain", help="train a plain TorchRec model with found or uniform dims")
    _add_data_args(r)
    _add_train_args(r, epochs=20)
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--dims", type=Path, help="dims.json from a search")
    g.add_argument("--uniform-dim", type=int, help="same dim for every field")
    r.add_argument(
        "--out", type=Path, default=None, help="default: DIMS_DIR/retrain (required with --uniform-dim)"
    )

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
    x.add_argument(
        "--vocab",
        type=Path,
        default=None,
        help="prepared data's vocab.json (default: found beside the model)",
    )

    bl = sub.add_parser("baseline", help="run a SuperNet baseline search and write dims.json")
    _add_data_args(bl)
    _add_train_args(bl, epochs=10)
    bl.add_argument("--method", required=True, choices=sorted(BASELINES))
    bl.add_argument("--out", type=Path, required=True)
    bl.add_argument("--d-max", type=int, default=16)
    bl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="method config override")
    bl.add_argument("--local", action="store_true", help="plain modules instead of a 1-rank DMP")

    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ (source checkout)")
    b.add_argument("name", help=f"a script of benchmarks/: {', '.join(bench_names()) or '(none here)'}")
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
            error = [str(exc)]
    _agree(error, env)
    data = load_prepared(cache)
    _check_meaningful(
        data, args.batch_size if args.command in ("search", "retrain") else None, env.world_size
    )
    return data


def _agree(error: list[str | None], env: DistEnv, kind: type[DimGrowError] = DataError) -> None:
    """Share rank 0's error (or None) with every rank, so all stop together with one message."""
    if env.world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise kind(str(error[0]))


def _lock_out(stack: contextlib.ExitStack, out: Path, env: DistEnv) -> None:
    """Rank 0 locks ``out`` for the rest of the run (``runlock``); every rank learns a refusal."""
    error: list[str | None] = [None]
    if env.is_main:
        try:
            stack.enter_context(run_lock(out))
        except DirectoryInUse as exc:
            error = [str(exc)]
    _agree(error, env, DirectoryInUse)


def _check_meaningful(data: PreparedData, batch_size: int | None, world: int) -> None:
    """Refuse runs whose result would mean nothing: no training step, undefined AUC."""
    if batch_size is not None and data.train.num_batches(batch_size, world, drop_last=True) == 0:
        raise UsageError(
            f"--batch-size {batch_size} x {world} rank(s) exceeds the {len(data.train)} train rows: "
            "no training step would run"
        )
    for split in ("val", "test"):
        labels = getattr(data, split).labels
        rows, pos = len(labels), int(labels.sum())
        if pos in (0, rows):
            raise DataError(
                f"the {split} split has only label {0 if pos == 0 else 1} ({rows} rows): AUC is undefined, "
                "so no epoch could be judged"
            )


def _search_configs(args: argparse.Namespace) -> tuple[DimGrowConfig, TrainConfig]:
    if args.alpha is None:  # recorded resolved, so a resume compares the value actually used
        args.alpha = 0.1 if args.penalty_mode == "auto" else 0.01
    alpha = args.alpha
    try:
        return _dimgrow_config(args, alpha), _train_config(args)
    except ValueError as exc:  # a cross-field rule of the dataclasses the flag table cannot see
        raise UsageError(str(exc)) from exc


def _dimgrow_config(args: argparse.Namespace, alpha: float) -> DimGrowConfig:
    return DimGrowConfig(
        d_max=args.d_max,
        alpha=alpha,
        penalty_mode=args.penalty_mode,
        penalty_weighting=args.penalty_weighting,
        gate_lr=args.gate_lr,
        check_interval=args.check_interval,
        gate_every=args.gate_every,
        grow_threshold=args.grow_threshold,
        grow_price_exponent=args.grow_price_exponent,
        cap_dims_at_rows=args.cap_dims_at_rows,
        shrink_threshold=args.shrink_threshold,
        grow_patience=args.grow_patience,
        shrink_patience=args.shrink_patience,
        shrink_slot=args.shrink_slot,
        final_gates=args.final_gates,
        budget=args.budget,
        budget_pressure=args.budget_pressure,
        initial_dim=args.initial_dim,
    )


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of the training flags (one mapping for search, retrain, baseline)."""
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        embedding_optimizer=getattr(args, "embedding_optimizer", "adagrad"),
        embedding_lr=getattr(args, "embedding_lr", 0.05),
        early_stop_patience=args.patience,
        seed=args.seed,
        max_steps=args.max_steps,
    )


def _resume_preflight(args: argparse.Namespace, explicit: set[str]) -> Verified:
    """Adopt the checkpoint's settings before anything is written (every rank).

    Only its manifest is read here; the files are verified once the process group exists
    (:func:`_verified_resume`), each rank hashing a share.
    """
    found = peek(args.resume)
    apply_saved_config(args, found.config, explicit)
    return found


def _verified_resume(path: Path, env: DistEnv) -> Verified:
    """The checkpoint to resume from, verified by all ranks together (same choice on each)."""

    def agree(error: str | None) -> list[str | None]:
        if env.world_size == 1:
            return [error]
        verdicts: list[str | None] = [None] * env.world_size
        dist.all_gather_object(verdicts, error)
        return verdicts

    found = select(path, share=(env.rank, env.world_size), agree=agree)
    if found.world_size != env.world_size and env.is_main:
        log.warning(
            "resuming a %d-rank checkpoint on %d rank(s): the tables are re-planned and the data "
            "continues from the rows consumed so far, so the result will not match an "
            "uninterrupted %d-rank run exactly",
            found.world_size,
            env.world_size,
            found.world_size,
        )
    return found


def _cmd_search(args: argparse.Namespace, explicit: set[str]) -> int:
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    out: Path = args.out
    resumed = _resume_preflight(args, explicit) if args.resume is not None else None
    if resumed is not None and args.votes > 1:  # given now, or saved with the checkpoint
        raise UsageError(
            "--resume continues one search; a --votes run cannot be resumed (its finished "
            "searches stay in OUT/votes; start it again with --overwrite)"
        )
    check_ranges(args)  # again: the saved settings are now in args
    # resuming writes into the run it continues; any other --out must not hold a previous run
    continuing = resumed is not None and out.resolve() == resumed.path.parent.resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    _check_tensorboard(args)
    dg, tc = _search_configs(args)
    guard = OutputGuard(out)
    env = init_distributed(args.backend)
    finished = False
    lock = contextlib.ExitStack()
    try:
        _lock_out(lock, out, env)  # a live run's directory is refused first, whatever it holds yet
        outputs = (*SEARCH_OUTPUTS, *STREAM_OUTPUTS) if args.stream else SEARCH_OUTPUTS
        check_out_dir(out, outputs, args.overwrite, resuming=continuing)
        EmbeddingOptimizer(tc.embedding_optimizer, tc.embedding_lr).check_device(env.device)
        if resumed is not None:  # before any data work: a damaged checkpoint stops the run here
            resumed = _verified_resume(args.resume, env)
        cache = args.cache_dir or out / "data"
        data = _prepare_on_rank0(args, cache, env)
        fingerprint = data_fingerprint(data.source, cache)
        if resumed is not None:
            error: list[str | None] = [None]
            try:
                compare_data(resumed.manifest["data"], fingerprint)
            except CheckpointError as exc:
                error = [str(exc)]
            _agree(error, env)
        if args.overwrite and not continuing and env.is_main:
            clear_previous(out, outputs)
        planning = PlanningConfig(sharding=args.sharding, batch_size=args.batch_size)
        opts = SearchOptions(
            out,
            log_every=args.log_every,
            checkpoint_every=args.checkpoint_every,
            resume=resumed.path if resumed is not None else None,
            quiet=args.quiet,
            run_config=run_config(args),
            data_fingerprint=fingerprint,
            discard_latest=resumed is not None and resumed.fell_back,
            tensorboard=args.tensorboard,
            resave=resumed is not None and resumed.world_size != env.world_size,
        )
        if args.stream:
            result = _run_stream(args, data, dg, tc, planning, env, opts)
        else:
            result = run_search(data, dg, tc, planning, env, opts, votes=args.votes)
        finished = True
    except (NonFiniteError, DiskError, Interrupted):
        raise  # keeps the last good checkpoint for inspection or --resume
    except DimGrowError as exc:
        if env.is_main and not isinstance(exc, DirectoryInUse):  # another run's files stay
            guard.discard_new()
        raise
    finally:
        lock.close()
        destroy_distributed(synchronize=finished)
    if args.stream:
        if env.is_main:
            m = result["metrics"]
            print(
                f"dims: {json.dumps(result['dims'])}\n"
                f"steps {m['steps']}  rows {m['rows_consumed']}  versions {m['versions']}  "
                f"window_auc {m['window']['auc']:.4f}  replans {m['replans']}  -> {out / 'versions'}"
            )
        return 0
    if env.is_main:
        m = result["metrics"]
        print(
            f"dims: {json.dumps(result['dims'])}\n"
            f"val_auc {m['val_auc']:.4f}  total_dim {m['found_total_dim']}  replans {m['replans']}  "
            f"world_size {m['world_size']}  -> {out / 'dims.json'}"
        )
    if result["metrics"]["found_total_dim"] == 0:
        if env.is_main:
            log.warning(
                "the search kept no field (every dim is 0): the penalty won; lower --alpha or train longer%s",
                "" if args.strict else " (--strict makes this exit 3)",
            )
        if args.strict:
            return EXIT_STRICT
    return 0


def _run_stream(
    args: argparse.Namespace,
    data: PreparedData,
    dg: DimGrowConfig,
    tc: TrainConfig,
    planning: PlanningConfig,
    env: DistEnv,
    opts: Any,
) -> dict[str, Any]:
    """``search --stream``: the online recipe with StreamConfig's defaults (plus two flags)."""
    from dataclasses import fields as dataclass_fields

    from torchrec_dimgrow.recipes.stream import StreamConfig, StreamOptions, run_stream

    if args.votes > 1:
        raise UsageError("--stream publishes one run's versions; it does not take --votes")
    defaults = StreamConfig()
    stream = StreamConfig(
        publish_every=args.publish_every or defaults.publish_every,
        keep_versions=args.keep_versions or defaults.keep_versions,
        log_every=args.log_every,
        max_steps=args.max_steps,
    )
    base = {f.name: getattr(opts, f.name) for f in dataclass_fields(opts)}
    return run_stream(data, dg, tc, planning, env, StreamOptions(**base, stream=stream))


def _check_tensorboard(args: argparse.Namespace) -> None:
    if getattr(args, "tensorboard", None) is None:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            "--tensorboard needs the tensorboard package: pip install 'torchrec-dimgrow[tensorboard]'"
        ) from exc


def _cmd_retrain(args: argparse.Namespace) -> int:
    out = _retrain_out(args)
    if args.dims is not None:
        _read_dims(args.dims, None)  # malformed/negative dims fail before any data is prepared
    cache = args.cache_dir
    if cache is None and args.dims is not None and (args.dims.parent / "data" / "meta.json").is_file():
        cache = args.dims.parent / "data"  # reuse the search's vocab
    guard = OutputGuard(out)
    with run_lock(out):  # a live run's directory is refused first, whatever it holds yet
        check_out_dir(out, RETRAIN_OUTPUTS, args.overwrite)
        if args.overwrite:
            clear_previous(out, RETRAIN_OUTPUTS)  # never a new metrics.json beside an old model/
        return _retrain_locked(args, out, cache, guard)


def _retrain_locked(args: argparse.Namespace, out: Path, cache: Path | None, guard: OutputGuard) -> int:
    from torchrec_dimgrow.recipes.retrain import retrain

    try:
        env = DistEnv(0, 1, 0, torch.device("cpu"), "none")
        data = _prepare_on_rank0(args, cache or out / "data", env)
        dims = _read_dims(args.dims, data.fields) if args.dims else {f: args.uniform_dim for f in data.fields}
        if not any(dims.values()):
            raise UsageError(f"--dims {args.dims}: every field has dim 0, nothing to retrain")
        metrics = retrain(dims, data, _train_config(args), out, quiet=args.quiet)
    except DiskError:
        raise  # the partial model was removed; what was there before stays
    except DimGrowError:
        guard.discard_new()
        raise
    print(
        f"test_auc {metrics['test_auc']:.4f}  test_logloss {metrics['test_logloss']:.4f}  embedding_bytes {metrics['embedding_bytes']}"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import tempfile

    from torchrec_dimgrow.recipes.evaluate import evaluate_saved
    from torchrec_dimgrow.saved_model import read_spec, verify_model

    verified = verify_model(args.model)  # every file checked before the data is prepared (one line)
    read_spec(verified.path)
    with tempfile.TemporaryDirectory(prefix="dimgrow-eval-") as tmp:
        env = DistEnv(0, 1, 0, torch.device("cpu"), "none")
        data = _prepare_on_rank0(args, args.cache_dir or Path(tmp) / "data", env)
        metrics = evaluate_saved(args.model, data, args.batch_size, verified=verified)
    print(
        f"test_auc {metrics['test_auc']:.6f}  test_logloss {metrics['test_logloss']:.6f}  val_auc {metrics['val_auc']:.6f}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from torchrec_dimgrow.recipes.export import export_saved

    out: Path = args.out
    with (
        run_lock(out, lock_file=sibling_lock(out)),
        disk_errors(out, partial=[out.with_name(out.name + ".tmp")]),
    ):
        meta = export_saved(args.model, args.serving, out, args.row_alignment, args.vocab)
    print(
        f"serving {meta['serving']}  serving_bytes {meta['serving_bytes']}  padding_bytes {meta['padding_bytes']}  "
        f"dropped {meta['dropped_fields']}  -> {args.out / 'serving.pt'}"
    )
    return 0


def _retrain_out(args: argparse.Namespace) -> Path:
    """``--out``, by default ``DIMS_DIR/retrain``; never the search directory itself."""
    if args.out is None:
        if args.dims is None:
            raise UsageError("--out is required with --uniform-dim")
        return Path(args.dims).parent / "retrain"
    out: Path = args.out
    if args.dims is not None and out.resolve() == Path(args.dims).parent.resolve():
        raise UsageError(
            f"--out {out} is the search directory of --dims; retrain would replace the search's "
            "metrics.json (leave --out out to write to DIMS_DIR/retrain)"
        )
    return out


def _read_dims(path: Path, fields: Sequence[str] | None) -> dict[str, int]:
    from torchrec_dimgrow.artifacts import read_dims_json

    try:
        return read_dims_json(path, fields)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--dims: {exc}") from exc


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
    """``--set key=value`` items -> method config overrides."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def _cmd_baseline(args: argparse.Namespace) -> int:
    """A SuperNet baseline search (1-rank DMP, N ranks under torchrun, or ``--local``)."""
    from torchrec_dimgrow.baselines import Placement, make_baseline

    try:
        search = make_baseline(args.method, d_max=args.d_max, **parse_sets(args.set))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"baseline {args.method}: {exc}") from exc
    tc = _train_config(args)
    env = None if args.local else init_distributed()
    finished = False
    lock = contextlib.ExitStack()
    try:
        _lock_out(lock, args.out, env or DistEnv(0, 1, 0, torch.device("cpu"), "none"))
        cache = args.cache_dir or args.out / "data"
        data = _prepare_on_rank0(args, cache, env or DistEnv(0, 1, 0, torch.device("cpu"), "none"))
        result = search.search(data, tc, out_dir=args.out, placement=Placement(env))
        finished = True
    finally:
        lock.close()
        if env is not None:
            destroy_distributed(synchronize=finished)
    if env is None or env.is_main:
        total = sum(result.dims.values())
        print(f"dims: {json.dumps(result.dims)}\ntotal_dim {total}  -> {args.out / 'dims.json'}")
    return 0


BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def bench_names() -> list[str]:
    """Every runnable script of ``benchmarks/`` (helpers start with ``_``); none outside a checkout."""
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))


def _cmd_bench(args: argparse.Namespace) -> int:
    """Run ``benchmarks/NAME.py`` with the remaining arguments (the CLI only dispatches)."""
    if args.name not in bench_names():
        where = f"one of {', '.join(bench_names())}" if bench_names() else "a source checkout"
        print(f"error: no benchmark {args.name!r} in {BENCH_DIR}: 'bench' needs {where}", file=sys.stderr)
        return 2
    script = BENCH_DIR / f"{args.name}.py"
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


class _LineFormatter(logging.Formatter):
    """INFO lines as they are; warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def configure_logging(level: str | None, quiet: bool, rank: int) -> None:
    """Give the package logger its own stderr handler.

    Importing torchrec installs a handler on the root logger, which makes
    ``logging.basicConfig`` a no-op; so the package logger is configured directly and does
    not propagate. Ranks other than 0 only report errors (their warnings repeat rank 0's).
    """
    name = level or os.environ.get("DIMGROW_LOG") or ("WARNING" if quiet else "INFO")
    if name.upper() not in LOG_LEVELS:
        raise UsageError(f"--log-level / DIMGROW_LOG must be one of {LOG_LEVELS}, got {name!r}")
    value = getattr(logging, name.upper())
    pkg = logging.getLogger("torchrec_dimgrow")
    for handler in [h for h in pkg.handlers if getattr(h, "dimgrow_cli", False)]:
        pkg.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.dimgrow_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(_LineFormatter())
    pkg.addHandler(handler)
    pkg.propagate = False
    pkg.setLevel(value if rank == 0 else max(value, logging.ERROR))


KNOWN_WARNINGS: list[tuple[str, str]] = [
    # (message regex, module regex) of library warnings that say nothing a user can act on
    (".*", r"torchrec(\.|$)"),
    (".*", r"fbgemm_gpu(\.|$)"),
    (".*", r"torch\.distributed(\.|$)"),
    (".*TypedStorage is deprecated.*", ".*"),
    (".*Please use DTensor instead and we are deprecating ShardedTensor.*", ".*"),
]


def silence_library_warnings() -> None:
    """Drop the known, unactionable library warnings (once per process, every rank).

    Filters are process-wide, so they also cover the warnings a re-plan triggers later.
    ``PYTHONWARNINGS`` / ``-W`` still win for anyone debugging the stack.
    """
    if sys.warnoptions:
        return
    for message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run, and turn every expected failure into one ``error:`` line and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    silence_library_warnings()
    try:
        configure_logging(getattr(args, "log_level", None), getattr(args, "quiet", False), rank)
        if args.command == "bench":
            return _cmd_bench(args)
        check_ranges(args)
        if getattr(args, "threads", None) is not None:
            torch.set_num_threads(args.threads)
        if args.command == "search":
            return _cmd_search(args, explicit_dests(build_parser(), argv))
        if args.command == "retrain":
            return _cmd_retrain(args)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        if args.command == "baseline":
            return _cmd_baseline(args)
        return _cmd_export(args)
    except Interrupted as exc:
        if rank == 0:
            print(exc, file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if rank == 0:
            print(f"interrupted ({args.command})", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DimGrowError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
