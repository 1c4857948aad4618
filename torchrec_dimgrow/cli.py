"""Command line: ``python -m torchrec_dimgrow {search,retrain,baseline,evaluate,export,bench}``.

``search`` runs on 1 rank as a plain command and on N ranks under
``torchrun --nproc_per_node=N -m torchrec_dimgrow search ...`` (gloo on CPU, nccl on GPU,
``--set run.backend=...`` overrides). ``search --stream`` runs online DimGrow instead
(:mod:`torchrec_dimgrow.recipes.stream`; its settings are the ``stream`` section).

Settings: a few first-class flags; every other setting through a config file
(``--config run.toml`` or ``.json``, sections as in :mod:`torchrec_dimgrow.runconfig`) and
``--set section.key=value`` (repeatable; later wins over the file, flags over both).
``--print-config`` prints the resolved settings as a config file and exits. A run's
``config.json`` is such a file: ``search --config OUT/config.json --out OUT2`` reruns it.

Exit codes: 0 success; 2 an expected failure (bad flag or setting, data, output dir,
checkpoint or saved model, full disk, a live run on the same ``--out``, or a diverged run),
reported as one ``error:`` line on stderr by rank 0 and with code 2 on every rank; 3 the
search finished but kept no field and ``run.strict`` was set; 130 Ctrl-C (one line saying
how to resume); 1 (with a traceback) a bug.
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from torchrec_dimgrow.errors import DimGrowError, Interrupted, UsageError
from torchrec_dimgrow.runconfig import (
    BaselineRunConfig,
    EvaluateRunConfig,
    RetrainRunConfig,
    SearchRunConfig,
    build,
    default_of,
    dump,
    load_file,
    settings_from_sets,
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a Ctrl-C'd command
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]

DATA = [
    ("--data", "data.path", "file prefix, directory (movielens: 100K or 1M) or '{split}' pattern"),
    ("--format", "data.format", "criteo, avazu, aliccp, movielens, parquet or csv"),
]
TRAIN = [
    ("--epochs", "train.epochs", ""),
    ("--batch-size", "train.batch_size", "per-rank batch size"),
    ("--seed", "train.seed", ""),
]
OVERWRITE = ("--overwrite", "run.overwrite", "replace a previous run in --out")
QUIET = ("--quiet", "run.quiet", "only results, warnings and errors")
FLAGS: dict[str, tuple[type, list[tuple[str, str, str]], list[tuple[str, str, str]]]] = {
    # command: (config class, valued flags, switches); each flag sets one key
    "search": (
        SearchRunConfig,
        [
            *DATA,
            ("--out", "run.out", "output directory"),
            ("--d-max", "dimgrow.d_max", "most dims any field may reach"),
            ("--budget", "dimgrow.budget", "embedding memory cap: bytes (48MiB, 2.5GB) or a fraction of "
             "the d_max model (0.3)"),
            *TRAIN,
            ("--resume", "run.resume", "run dir (or its checkpoint/) to continue with its saved settings"),
        ],
        [OVERWRITE, QUIET, ("--stream", "stream.enabled", "online DimGrow: one in-order pass over the "
                            "train split, publishing serving versions to OUT/versions (stream.* settings)")],
    ),
    "retrain": (
        RetrainRunConfig,
        [*DATA, ("--dims", "run.dims", "dims.json from a search"),
         ("--uniform-dim", "run.uniform_dim", "same dim for every field (instead of --dims)"),
         ("--out", "run.out", "default: DIMS_DIR/retrain (required with --uniform-dim)"), *TRAIN],
        [OVERWRITE, QUIET],
    ),
    "baseline": (
        BaselineRunConfig,
        [*DATA, ("--method", "run.method", "the baseline method"), ("--out", "run.out", "output directory"),
         ("--d-max", "run.d_max", "SuperNet width"), *TRAIN],
        [QUIET],
    ),
    "evaluate": (
        EvaluateRunConfig,
        [("--model", "run.model", "retrain --out directory (or its model/)"), *DATA,
         ("--batch-size", "run.batch_size", "")],
        [],
    ),
}  # fmt: skip
HELP = {
    "search": "run a DimGrow search and export dims.json",
    "retrain": "train a plain TorchRec model with found or uniform dims",
    "baseline": "run a SuperNet baseline search and write dims.json",
    "evaluate": "test AUC of a model saved by retrain",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrec_dimgrow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (cls, valued, switches) in FLAGS.items():
        p = sub.add_parser(command, help=HELP[command])
        for flag, key, text in valued:
            default = default_of(cls, key)
            shown = f"{key}" if default in (None, "") else f"{key}; default {default}"
            p.add_argument(
                flag,
                dest=key,
                default=argparse.SUPPRESS,
                metavar=flag[2:].upper().replace("-", "_"),
                help=f"{text} ({shown})" if text else shown,
            )
        for flag, key, text in switches:
            p.add_argument(
                flag, dest=key, action="store_const", const=True, default=argparse.SUPPRESS, help=text
            )
        p.add_argument("--config", type=Path, default=None, help="settings file (.toml or .json)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="one setting (repeatable), e.g. dimgrow.gate_lr=0.01 or train.max_steps=100")  # fmt: skip
        if command != "evaluate":
            p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")

    x = sub.add_parser("export", help="write a TorchScript serving model on TorchRec's quantized tables")
    x.add_argument("--model", type=Path, required=True, help="retrain --out directory (or its model/)")
    x.add_argument("--serving", required=True, help="fp32, fp16, int8 or int4")
    x.add_argument("--out", type=Path, required=True)
    x.add_argument(
        "--row-alignment", type=int, default=1, help="bytes per row alignment (TorchRec: 1 CPU, 16 CUDA)"
    )
    x.add_argument(
        "--vocab", type=Path, default=None, help="prepared data's vocab.json (default: beside the model)"
    )

    b = sub.add_parser("bench", help="run a benchmark from benchmarks/ (source checkout)")
    b.add_argument("name", help=f"a script of benchmarks/: {', '.join(bench_names()) or '(none here)'}")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def settings(args: argparse.Namespace) -> dict[str, tuple[str, Any]]:
    """The settings the user gave: the config file, then ``--set``, then the flags."""
    out = load_file(args.config) if args.config is not None else {}
    out.update(settings_from_sets(args.set))
    _, valued, switches = FLAGS[args.command]
    for flag, key, _ in [*valued, *switches]:
        if key in vars(args):
            out[key] = (flag, getattr(args, key))
    return out


def run_command(args: argparse.Namespace, rank: int) -> int:
    """Build the command's config and hand it to its recipe."""
    given = settings(args)
    cfg = build(FLAGS[args.command][0], given)
    if args.command == "search":
        from torchrec_dimgrow.recipes.search import resolve, search_main

        if args.print_config:
            print(dump(resolve(cfg, given)[0]), end="")
            return 0
        _start(cfg, rank)
        return search_main(cfg, explicit=set(given))
    if getattr(args, "print_config", False):
        print(dump(cfg), end="")
        return 0
    _start(cfg, rank)
    if args.command == "retrain":
        from torchrec_dimgrow.recipes.retrain import retrain_main

        return retrain_main(cfg)
    if args.command == "baseline":
        from torchrec_dimgrow.recipes.baseline import baseline_main

        return baseline_main(cfg)
    from torchrec_dimgrow.recipes.evaluate import evaluate_main

    return evaluate_main(cfg)


def _start(cfg: Any, rank: int) -> None:
    """Logging and intra-op threads as the run's settings say."""
    configure_logging(getattr(cfg.run, "log_level", None), getattr(cfg.run, "quiet", False), rank)
    if hasattr(cfg.run, "threads"):
        torch.set_num_threads(cfg.run.threads or int(os.environ.get("OMP_NUM_THREADS", "1")))


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
        raise UsageError(f"run.log_level / DIMGROW_LOG must be one of {LOG_LEVELS}, got {name!r}")
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
        if args.command == "bench":
            configure_logging(None, False, rank)
            return _cmd_bench(args)
        if args.command == "export":
            from torchrec_dimgrow.recipes.export import export_main

            configure_logging(None, False, rank)
            return export_main(args.model, args.serving, args.out, args.row_alignment, args.vocab)
        return run_command(args, rank)
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
