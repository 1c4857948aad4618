"""Run one SuperNet baseline search: build, train with ``training.fit``, export, write results.

The method (which tables, which dense module, which parameters are gates, how dims are read
off) is a :class:`~torchrec_dimgrow.baselines.base.BaselineSearch`; this recipe owns the run
around it, the same way ``recipes/search.py`` owns a DimGrow search and ``recipes/retrain.py``
a retrain:

* the epoch loop is :func:`~torchrec_dimgrow.training.fit`, the one the retrain uses: the
  method's weight step is ``fit``'s ``step``, its gate (architecture) step on a validation
  batch every ``gate_every`` steps and its per-step schedule (:meth:`on_step`) hang on
  ``after_step``; early stopping is :class:`~torchrec_dimgrow.training.EarlyStopping` with
  the learned floor, and the best epoch's state is restored before the export;
* the output (rank 0) is ``dims.json`` (what the shared retrain reads), ``metrics.json`` with
  the DimGrow search's keys (``val_auc``, ``learned``, ``val_auc_floor``, ``found_total_dim``,
  ...; the re-plan and budget keys are 0 / null: a SuperNet never re-plans and has no
  budget) plus the baseline's own (``method``, the byte counts, ``extra``), and
  ``search.json`` (the :class:`SearchResult`, with the method's ``extra_info``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

from torchrec_dimgrow.artifacts import write_dims_json, write_json_atomic
from torchrec_dimgrow.baselines.base import BaselineSearch, Placement, Trained
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed
from torchrec_dimgrow.errors import UsageError
from torchrec_dimgrow.modules.tables import field_bytes
from torchrec_dimgrow.optim import state_bytes, tensor_bytes
from torchrec_dimgrow.recipes.setup import local_env, lock_out, prepare_on_rank0
from torchrec_dimgrow.runconfig import BaselineRunConfig
from torchrec_dimgrow.training import EarlyStopping, ValStream, fit

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What a baseline run returns (and what the benchmarks record).

    ``metrics`` is what ``metrics.json`` holds; ``trained`` the trained SuperNet (not
    serialised).
    """

    method: str
    dims: dict[str, int]
    wall_s: float
    steps: int
    embedding_param_bytes: int
    embedding_state_bytes: int
    optimizer_state_bytes: int
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    trained: Trained | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("trained", "metrics")}
        return json.loads(json.dumps(out, default=str))


def write_dims(path: str | Path, dims: dict[str, int]) -> Path:
    """``dims.json`` in the DimGrow search's format (flat ``{field: dim}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dims_json(path, {f: int(d) for f, d in dims.items()})
    return path


def train_supernet(
    search: BaselineSearch,
    trained: Trained,
    data: PreparedData,
    train_cfg: TrainConfig,
    step_hook: Callable[[int], None] | None = None,
    early: EarlyStopping | None = None,
) -> tuple[list[dict[str, float]], int]:
    """Train the SuperNet: weights on train batches, gates on validation batches.

    Early stopping on validation AUC (patience ``train_cfg.early_stop_patience``, the learned
    floor of :func:`~torchrec_dimgrow.training.fit`); with more than one epoch the best
    epoch's weights are restored (unsharded path) or the best epoch's dense ``post`` is kept
    (sharded path: only the small dense state is copied). ``train_cfg.max_steps`` caps the
    total step count; ``step_hook(index)`` runs after every step (benchmarks sample memory).
    """
    p, opts = trained.placement, trained.opts
    early = early if early is not None else EarlyStopping(train_cfg.early_stop_patience)
    val_stream = None
    if opts.gate is not None:
        val_stream = ValStream(data.val, train_cfg.batch_size, train_cfg.seed, p.rank, p.world_size)
    best_state: dict[str, torch.Tensor] | None = None
    gate_every = search.config.gate_every

    def batches(epoch: int) -> Iterable[Batch]:
        return data.train.batches(
            train_cfg.batch_size,
            shuffle=True,
            seed=train_cfg.seed,
            epoch=epoch,
            rank=p.rank,
            world_size=p.world_size,
            drop_last=True,
        )

    def step(batch: Batch, _: int) -> None:
        search.weight_step(trained, batch.to(p.device))

    def after_step(_: Batch, index: int) -> None:
        if val_stream is not None and index % gate_every == 0:
            search.gate_step(trained, next(val_stream).to(p.device))
        search.on_step(trained.sparse, index)
        if step_hook is not None:
            step_hook(index)

    def snapshot() -> None:
        nonlocal best_state
        best_state = search.snapshot(trained)

    def epoch_line(row: dict[str, float]) -> None:
        if p.rank == 0:
            log.info(
                "%s epoch %d  step %d  val_auc %.4f  logloss %.4f",
                search.name,
                row["epoch"],
                row["step"],
                row["val_auc"],
                row["val_logloss"],
            )

    history, steps = fit(
        trained.runner,
        train_cfg.epochs,
        batches,
        step,
        lambda: search.evaluate(trained, data.val, train_cfg.batch_size),
        early,
        on_best=snapshot if train_cfg.epochs > 1 else None,
        max_steps=train_cfg.max_steps,
        after_step=after_step,
        on_epoch_end=epoch_line,
    )
    if best_state is not None:
        search.restore(trained, best_state)
    return history, steps


def _max_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def baseline_metrics(
    search: BaselineSearch,
    trained: Trained,
    data: PreparedData,
    train_cfg: TrainConfig,
    found: dict[str, int],
    early: EarlyStopping | None,
    result: SearchResult,
) -> dict[str, Any]:
    """``metrics.json``: the DimGrow search's keys, then the baseline's own.

    Without training (``uniform`` unless ``train=True``) the validation and test keys are
    null (an untrained model's AUC says nothing). The test metrics are those of the trained SuperNet after the export (OptEmbed: at its found
    prefixes), as the search reports its own SuperNet's.
    """
    sparse, opts = trained.sparse, trained.opts
    table_local = sum(tensor_bytes(v) for v in sparse.ebc.state_dict().values())
    rank_bytes = _max_over_ranks(table_local + state_bytes([opts.embedding]))
    ran = early is not None and early.best_epoch >= 0
    val: dict[str, Any] = dict.fromkeys(("val_auc", "best_epoch", "learned", "val_auc_floor"))
    test: dict[str, Any] = {"auc": None, "logloss": None}
    if ran:
        assert early is not None
        val = {
            "val_auc": _nan_to_none(early.best),
            "best_epoch": early.best_epoch,
            "learned": early.learned,
            "val_auc_floor": _nan_to_none(early.floor),
        }
        test = search.evaluate(trained, data.test, train_cfg.batch_size)
    return {
        **val,
        "search_test_auc": test["auc"],
        "search_test_logloss": test["logloss"],
        "steps": result.steps,
        "epochs": len(result.history),
        "learn_epochs": 0,  # a SuperNet trains every column from the start: no learn-first epochs
        "wall_seconds": round(result.wall_s, 3),
        "world_size": trained.placement.world_size,
        "replans": 0,
        "replan_seconds_total": 0.0,
        "replan_bytes_moved": 0,
        "peak_embedding_bytes": sparse.table_bytes,
        "peak_rank_embedding_bytes": rank_bytes,
        "found_total_dim": sum(found.values()),
        "found_embedding_bytes": field_bytes(data.vocab(), found),
        "budget_bytes": None,
        "dropped_fields": sorted(f for f, d in found.items() if d == 0),
        "history": result.history,
        "method": search.name,
        "embedding_param_bytes": result.embedding_param_bytes,
        "embedding_state_bytes": result.embedding_state_bytes,
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "extra": result.to_dict()["extra"],
    }


def run_baseline(
    search: BaselineSearch,
    data: PreparedData,
    train_cfg: TrainConfig,
    out_dir: str | Path | None = None,
    placement: Placement | None = None,
    step_hook: Callable[[int], None] | None = None,
) -> SearchResult:
    """Build, train, export; writes ``dims.json``, ``metrics.json`` and ``search.json`` into
    ``out_dir`` (rank 0). Every rank must call it (the sharded path runs collectives)."""
    start = time.perf_counter()
    trained = search.build(data, train_cfg, placement)
    early: EarlyStopping | None = None
    history: list[dict[str, float]] = []
    steps = 0
    if search.trains():
        early = EarlyStopping(train_cfg.early_stop_patience)
        history, steps = train_supernet(search, trained, data, train_cfg, step_hook, early)
    dims = search.export_dims(trained, data, train_cfg)
    result = SearchResult(
        method=search.name,
        dims=dims,
        wall_s=time.perf_counter() - start,
        steps=steps,
        embedding_param_bytes=trained.sparse.table_bytes,
        embedding_state_bytes=state_bytes([trained.opts.embedding]),
        optimizer_state_bytes=state_bytes(trained.opts.all()),
        history=history,
        extra={"config": asdict(search.config), **search.extra_info(trained)},
        trained=trained,
    )
    if out_dir is not None:
        result.metrics = baseline_metrics(search, trained, data, train_cfg, dims, early, result)
        if trained.placement.rank == 0:
            if early is not None and not early.learned:
                log.warning(
                    "validation AUC never rose clearly above its start (best %.4f, needed > %.4f) "
                    "in %d epochs: these dims are not a search result; train longer (--epochs) "
                    "or check that the label depends on the fields",
                    early.best,
                    early.floor,
                    len(history),
                )
            out = Path(out_dir)
            write_dims(out / "dims.json", dims)
            write_json_atomic(out / "metrics.json", result.metrics)
            write_json_atomic(out / "search.json", result.to_dict())
    return result


def baseline_main(cfg: BaselineRunConfig) -> int:
    """The ``baseline`` command: a SuperNet baseline search (1-rank DMP, N ranks under torchrun,
    or ``run.local`` plain modules) that writes dims.json. The method and its config overrides
    (``--set method.KEY=VALUE``) go to :func:`~torchrec_dimgrow.baselines.make_baseline`."""
    from torchrec_dimgrow.baselines import BASELINES, make_baseline

    cfg.data.require()
    method, out = cfg.run.method, cfg.run.out
    if method not in BASELINES:
        raise UsageError(f"run.method must be one of {sorted(BASELINES)}, got {method!r} (--method)")
    if out is None:
        raise UsageError("no output directory: pass --out (or run.out)")
    try:
        search = make_baseline(method, d_max=cfg.run.d_max, **cfg.method)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"baseline {method}: {exc}") from exc
    env = None if cfg.run.local else init_distributed()
    finished = False
    lock = contextlib.ExitStack()
    try:
        lock_out(lock, Path(out), env or local_env())
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(out) / "data"
        data = prepare_on_rank0(cfg.data, cache, env or local_env())
        result = run_baseline(search, data, cfg.train, out_dir=Path(out), placement=Placement(env))
        finished = True
    finally:
        lock.close()
        if env is not None:
            destroy_distributed(synchronize=finished)
    if env is None or env.is_main:
        total = sum(result.dims.values())
        print(f"dims: {json.dumps(result.dims)}\ntotal_dim {total}  -> {Path(out) / 'dims.json'}")
    return 0
