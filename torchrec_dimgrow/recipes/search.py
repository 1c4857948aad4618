"""The DimGrow search recipe: settings, output directory, resume and data, then the search.

:func:`search_main` runs a ``search`` command from its :class:`~torchrec_dimgrow.runconfig.SearchRunConfig`:
it adopts a checkpoint's settings (``--resume``), applies the output-directory rules, locks
the directory, prepares the data on rank 0, checks a resumed run's data, and runs
:func:`run_search` (one search, :mod:`~torchrec_dimgrow.recipes.search_loop`, or a vote of
several seeds), or with ``stream.enabled`` (``--stream``) online DimGrow
(:func:`~torchrec_dimgrow.recipes.stream.run_stream`). One code path for 1 or N ranks
(``torchrun``).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Collection
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.distributed.env import DistEnv, destroy_distributed, init_distributed
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.errors import (
    DimGrowError,
    DirectoryInUse,
    DiskError,
    Interrupted,
    NonFiniteError,
    UsageError,
)
from torchrec_dimgrow.manifest import Verified, data_fingerprint
from torchrec_dimgrow.optim import EmbeddingOptimizer
from torchrec_dimgrow.recipes.resume import check_same_data, preflight, saved_settings, verified_resume
from torchrec_dimgrow.recipes.search_loop import (
    TRAJECTORY_COLUMNS,
    DimGrowSearch,
    SearchOptions,
    SearchState,
    build_search_model,
)
from torchrec_dimgrow.recipes.setup import (
    SEARCH_OUTPUTS,
    STREAM_OUTPUTS,
    OutputGuard,
    check_out_dir,
    clear_previous,
    lock_out,
    prepare_on_rank0,
)
from torchrec_dimgrow.recipes.vote import publish_vote
from torchrec_dimgrow.runconfig import SearchRunConfig, to_nested

__all__ = [
    "TRAJECTORY_COLUMNS",
    "DimGrowSearch",
    "SearchOptions",
    "SearchState",
    "build_search_model",
    "resolve",
    "run_search",
    "search_main",
]

log = logging.getLogger(__name__)

EXIT_STRICT = 3


def run_search(
    data: PreparedData,
    dg: DimGrowConfig,
    tc: TrainConfig,
    planning: PlanningConfig,
    env: DistEnv,
    opts: SearchOptions,
    votes: int = 1,
) -> dict[str, Any]:
    """Run one DimGrow search and write dims.json / trajectory.csv / metrics.json (rank 0).

    With ``votes`` > 1: that many searches with seeds ``tc.seed`` .. ``tc.seed + votes - 1``,
    each a complete run in ``out_dir/votes/seed-N`` (its own dims, gates, trajectory and
    checkpoints, so any one can be inspected or retrained), and one exported vote in
    ``out_dir`` (:func:`~torchrec_dimgrow.policy.vote_dims`: the per-field median, within the
    budget). Why: the seed spread of one search's dims is larger than what the data can tell
    apart; the vote costs ``votes`` searches and moves far less from seed to seed
    (benchmarks/README.md, "Voting over several searches").
    """
    if votes < 1:
        raise ValueError(f"votes must be >= 1, got {votes}")
    if votes > 1 and opts.blocks is not None and opts.blocks.enabled:
        raise ValueError("a vote over several searches is per field; it does not take frequency blocks")
    if votes == 1:
        return DimGrowSearch(data, dg, tc, planning, env, opts).run()
    results = []
    for seed in range(tc.seed, tc.seed + votes):
        record = opts.config_file and {**opts.config_file}
        if record:  # each vote's config.json reruns that one search
            record.update(train={**record["train"], "seed": seed}, run={**record["run"], "votes": 1})
        sub = replace(
            opts, out_dir=opts.out_dir / "votes" / f"seed-{seed}", tensorboard=None, config_file=record
        )
        try:
            results.append(DimGrowSearch(data, dg, replace(tc, seed=seed), planning, env, sub).run())
        except Interrupted as exc:  # a vote's searches cannot be resumed one by one
            raise Interrupted(
                f"interrupted at step {exc.step} of the search with seed {seed}; a voting run (run.votes) "
                f"cannot be resumed (its finished searches stay in {opts.out_dir / 'votes'})",
                step=exc.step,
            ) from None
    return publish_vote(data, tc.seed, results, env, opts.out_dir)


def resolve(cfg: SearchRunConfig, explicit: Collection[str]) -> tuple[SearchRunConfig, Verified | None]:
    """``cfg`` with a resumed checkpoint's settings adopted (``run.resume``); nothing is written."""
    if cfg.run.resume is None:
        return cfg, None
    cfg, found = preflight(cfg, explicit)
    if cfg.run.votes > 1:  # given now, or saved with the checkpoint
        raise UsageError(
            "--resume continues one search; a voting run (run.votes > 1) cannot be resumed (its "
            "finished searches stay in OUT/votes; start it again with --overwrite)"
        )
    return cfg, found


def check_stream(cfg: SearchRunConfig) -> None:
    """Refuse settings an online run cannot honour."""
    if cfg.stream.enabled and cfg.run.votes > 1:
        raise UsageError("--stream publishes one run's versions; it does not take run.votes > 1")


def check_tensorboard(directory: str | None) -> None:
    if directory is None:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            "run.tensorboard needs the tensorboard package: pip install 'torchrec-dimgrow[tensorboard]'"
        ) from exc


def search_main(cfg: SearchRunConfig, explicit: Collection[str] = ()) -> int:
    """Run the ``search`` command; ``explicit``: the keys the user gave (a resume refuses a
    contradicting one). Returns the exit code (0, or 3 when ``run.strict`` and no field is kept)."""
    cfg.data.require()
    if cfg.run.out is None:
        raise UsageError("no output directory: pass --out (or run.out)")
    out = Path(cfg.run.out)
    cfg, resumed = resolve(cfg, explicit)
    check_stream(cfg)
    # resuming writes into the run it continues; any other --out must not hold a previous run
    continuing = resumed is not None and out.resolve() == resumed.path.parent.resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory")
    check_tensorboard(cfg.run.tensorboard)
    dg, tc = cfg.dimgrow, cfg.train
    outputs = (*SEARCH_OUTPUTS, *STREAM_OUTPUTS) if cfg.stream.enabled else SEARCH_OUTPUTS
    guard = OutputGuard(out)
    env = init_distributed(cfg.run.backend)
    finished = False
    lock = contextlib.ExitStack()
    try:
        lock_out(lock, out, env)  # a live run's directory is refused first, whatever it holds yet
        check_out_dir(out, outputs, cfg.run.overwrite, resuming=continuing)
        EmbeddingOptimizer(tc.embedding_optimizer, tc.embedding_lr).check_device(env.device)
        if resumed is not None:  # before any data work: a damaged checkpoint stops the run here
            assert cfg.run.resume is not None
            resumed = verified_resume(Path(cfg.run.resume), env)
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "data"
        data = prepare_on_rank0(cfg.data, cache, env, tc.batch_size, blocks=cfg.blocks)
        fingerprint = data_fingerprint(data.source, cache)
        if resumed is not None:
            check_same_data(resumed, fingerprint, env)
        if cfg.run.overwrite and not continuing and env.is_main:
            clear_previous(out, outputs)
        record = _record(cfg)
        opts = SearchOptions(
            out,
            log_every=cfg.run.log_every,
            checkpoint_every=cfg.run.checkpoint_every,
            resume=resumed.path if resumed is not None else None,
            quiet=cfg.run.quiet,
            run_config=saved_settings(cfg),
            data_fingerprint=fingerprint,
            discard_latest=resumed is not None and resumed.fell_back,
            tensorboard=Path(cfg.run.tensorboard) if cfg.run.tensorboard else None,
            resave=resumed is not None and resumed.world_size != env.world_size,
            config_file=record,
            blocks=cfg.blocks,
        )
        if cfg.blocks.enabled and (cfg.run.votes > 1 or cfg.stream.enabled):
            raise UsageError(
                "frequency blocks (blocks.enabled) take one batch search: run.votes > 1 votes per "
                "field, and the online mode (--stream) publishes per-field tables"
            )
        if cfg.stream.enabled:
            from torchrec_dimgrow.recipes.stream import StreamOptions, run_stream

            base = {f.name: getattr(opts, f.name) for f in fields(opts)}
            result = run_stream(data, dg, tc, cfg.planning, env, StreamOptions(**base, stream=cfg.stream))
        else:
            result = run_search(data, dg, tc, cfg.planning, env, opts, votes=cfg.run.votes)
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
    if cfg.stream.enabled:
        return _report_stream(result, out, env)
    return _report(result, out, env, cfg.run.strict)


def _record(cfg: SearchRunConfig) -> dict[str, Any]:
    """config.json: a config file that reruns this search from any directory (``--config``)."""
    record = to_nested(cfg)
    for section, name in (("data", "path"), ("data", "cache_dir"), ("run", "out"), ("run", "tensorboard")):
        if record[section][name]:
            record[section][name] = str(Path(record[section][name]).resolve())
    record["run"].update(resume=None, overwrite=False)
    return record


def _report(result: dict[str, Any], out: Path, env: DistEnv, strict: bool) -> int:
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
                "the search kept no field (every dim is 0): the penalty won; lower dimgrow.alpha or "
                "train longer%s",
                "" if strict else " (run.strict makes this exit 3)",
            )
        if strict:
            return EXIT_STRICT
    return 0


def _report_stream(result: dict[str, Any], out: Path, env: DistEnv) -> int:
    if env.is_main:
        m = result["metrics"]
        print(
            f"dims: {json.dumps(result['dims'])}\n"
            f"steps {m['steps']}  rows {m['rows_consumed']}  versions {m['versions']}  "
            f"window_auc {m['window']['auc']:.4f}  replans {m['replans']}  -> {out / 'versions'}"
        )
    return 0
