"""Retrain a plain TorchRec model from scratch with found (or uniform) dims.

The model is what a user ships after the search: a stock ``EmbeddingBagCollection`` at
the found per-field dims (dropped fields absent), concatenated, ``Linear(sum d, 64)`` with
bias, WideDeep, trained with Adam and early stopping on validation AUC; test metrics come
from the best-validation epoch (the reference protocol). :func:`retrain_main` runs the
``retrain`` command: output-directory rules, the lock, the data, then :func:`retrain`.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from torchrec_dimgrow.artifacts import write_json_atomic
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.data.blocks import FieldBlocks, field_blocks
from torchrec_dimgrow.errors import DimGrowError, DiskError, UsageError
from torchrec_dimgrow.manifest import vocab_fingerprint
from torchrec_dimgrow.modules.backbone import CTRModel
from torchrec_dimgrow.modules.tables import field_bytes, field_params
from torchrec_dimgrow.recipes.setup import (
    RETRAIN_OUTPUTS,
    OutputGuard,
    check_out_dir,
    clear_previous,
    local_env,
    prepare_on_rank0,
)
from torchrec_dimgrow.runconfig import RetrainRunConfig
from torchrec_dimgrow.runlock import run_lock
from torchrec_dimgrow.saved_model import ModelSpec, build_model, save_model, spec_for
from torchrec_dimgrow.training import EarlyStopping, bce, evaluate, fit


def dims_blocks(
    data: PreparedData, dims: Mapping[str, int], blocks: FieldBlocks | None = None
) -> FieldBlocks | None:
    """The frequency blocks ``dims`` is keyed by: ``None`` for per-field dims, else ``blocks``
    or the data's own (:func:`~torchrec_dimgrow.data.blocks.field_blocks`), whose names it must
    match (a block search's ``dims.json`` names its blocks)."""
    if blocks is None and set(dims) <= set(data.fields):
        return None
    fb = blocks if blocks is not None else field_blocks(data)
    if sorted(dims) != sorted(fb.names()):
        raise ValueError(
            f"dims names neither the fields {list(data.fields)} nor the data's blocks {fb.names()}"
        )
    return fb


def retrain_spec(
    data: PreparedData, dims: Mapping[str, int], tc: TrainConfig, blocks: FieldBlocks | None = None
) -> ModelSpec:
    """The saved-model spec of a retrain: every field's (or block's) dim plus the backbone settings."""
    names = blocks.names() if blocks is not None else list(data.fields)
    missing = [f for f in names if f not in dims]
    if missing:
        raise ValueError(f"dims has no entry for {'blocks' if blocks else 'fields'} {missing}")
    if not any(int(dims[f]) for f in names):
        raise ValueError("every field has dim 0: nothing to retrain")
    return spec_for(
        data.fields,
        data.vocab_sizes,
        dims,
        blocks,
        adapter_dim=tc.adapter_dim,
        hidden=list(tc.hidden),
        dropout=tc.dropout,
    )


def build_retrain_model(
    data: PreparedData,
    dims: Mapping[str, int],
    tc: TrainConfig,
    init_std: float = 0.01,
    blocks: FieldBlocks | None = None,
) -> CTRModel:
    return build_model(retrain_spec(data, dims, tc, dims_blocks(data, dims, blocks)), init_std=init_std)


def train_to_best(
    model: nn.Module, data: PreparedData, tc: TrainConfig, quiet: bool = True
) -> tuple[list[dict[str, float]], int, EarlyStopping]:
    """The retrain's loop from ``model``'s current weights: Adam on every parameter, ``tc``'s
    epochs and early stopping, then the best-validation epoch's weights loaded back.

    Returns the history, the steps taken and the early-stopping record (best validation AUC,
    learned). Shared by :func:`retrain` (from fresh weights) and anything that fine-tunes
    weights it already has.
    """
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    early = EarlyStopping(tc.early_stop_patience)
    best_state = copy.deepcopy(model.state_dict())

    def batches(epoch: int) -> Iterable[Batch]:
        split = data.train.batches(tc.batch_size, shuffle=True, seed=tc.seed, epoch=epoch, drop_last=True)
        return tqdm(split, disable=quiet or not sys.stderr.isatty(), desc=f"retrain epoch {epoch}")

    def step(batch: Batch, _: int) -> None:
        opt.zero_grad(set_to_none=True)
        bce(model(batch.sparse_features), batch.labels).backward()
        opt.step()

    def snapshot() -> None:
        nonlocal best_state
        best_state = copy.deepcopy(model.state_dict())

    history, steps = fit(
        model,
        tc.epochs,
        batches,
        step,
        lambda: evaluate(model, data.val, tc.batch_size),
        early,
        on_best=snapshot,
        max_steps=tc.max_steps,
    )
    model.load_state_dict(best_state)
    return history, steps, early


def retrain(
    dims: Mapping[str, int],
    data: PreparedData,
    tc: TrainConfig,
    out_dir: str | Path | None = None,
    quiet: bool = True,
    blocks: FieldBlocks | None = None,
) -> dict[str, Any]:
    """Train from scratch at ``dims``; return (and write) test AUC / log loss and sizes.

    ``dims`` per field, or per frequency block (a block search's ``dims.json``: the tables
    are then the blocks, behind the same id remap; ``blocks`` defaults to the data's).

    With ``out_dir`` the best-validation model is saved to ``out_dir/model`` (see
    :mod:`torchrec_dimgrow.saved_model`), so ``evaluate`` and ``export`` can reload it.
    """
    start = time.perf_counter()
    fb = dims_blocks(data, dims, blocks)
    torch.manual_seed(tc.seed)
    model = build_retrain_model(data, dims, tc, blocks=fb)
    history, steps, early = train_to_best(model, data, tc, quiet)
    test = evaluate(model, data.test, tc.batch_size)
    vocab = fb.vocab() if fb is not None else data.vocab()
    found = {f: int(dims[f]) for f in vocab}
    metrics: dict[str, Any] = {
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "val_auc": early.best,
        "learned": early.learned,
        "embedding_params": field_params(vocab, found),
        "embedding_bytes": field_bytes(vocab, found),
        "total_dim": int(sum(found.values())),
        "dims": found,
        "seed": tc.seed,
        "steps": steps,
        "wall_seconds": round(time.perf_counter() - start, 3),
        "history": [{k: v for k, v in h.items() if k != "step"} for h in history],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ids = vocab_fingerprint(data.directory) if data.directory is not None else None
        save_model(model, retrain_spec(data, dims, tc, fb), out, vocab=ids)
        write_json_atomic(out / "metrics.json", metrics)
    return metrics


def retrain_main(cfg: RetrainRunConfig) -> int:
    """Run the ``retrain`` command: found dims (``run.dims``) or ``run.uniform_dim``."""
    cfg.data.require()
    dims_file = Path(cfg.run.dims) if cfg.run.dims is not None else None
    if dims_file is None and cfg.run.uniform_dim is None:
        raise UsageError("give --dims DIMS.json (a search's) or --uniform-dim D")
    out = _retrain_out(dims_file, cfg.run.out)
    raw = read_dims(dims_file, None) if dims_file is not None else None  # fails before any data work
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else None
    if cache is None and dims_file is not None and (dims_file.parent / "data" / "meta.json").is_file():
        cache = dims_file.parent / "data"  # reuse the search's vocab
    guard = OutputGuard(out)
    with run_lock(out):  # a live run's directory is refused first, whatever it holds yet
        check_out_dir(out, RETRAIN_OUTPUTS, cfg.run.overwrite)
        if cfg.run.overwrite:
            clear_previous(out, RETRAIN_OUTPUTS)  # never a new metrics.json beside an old model/
        try:
            data = prepare_on_rank0(cfg.data, cache or out / "data", local_env(), cfg.train.batch_size)
            if dims_file is not None and raw is not None:  # per field, or per block (a block search's)
                names = data.fields if set(raw) <= set(data.fields) else field_blocks(data).names()
                dims = read_dims(dims_file, names)
            else:
                dims = {f: int(cfg.run.uniform_dim or 0) for f in data.fields}
            if not any(dims.values()):
                raise UsageError(f"--dims {dims_file}: every field has dim 0, nothing to retrain")
            metrics = retrain(dims, data, cfg.train, out, quiet=cfg.run.quiet)
        except DiskError:
            raise  # the partial model was removed; what was there before stays
        except DimGrowError:
            guard.discard_new()
            raise
    print(
        f"test_auc {metrics['test_auc']:.4f}  test_logloss {metrics['test_logloss']:.4f}  "
        f"embedding_bytes {metrics['embedding_bytes']}"
    )
    return 0


def _retrain_out(dims: Path | None, out: str | None) -> Path:
    """``--out``, by default ``DIMS_DIR/retrain``; never the search directory itself."""
    if out is None:
        if dims is None:
            raise UsageError("--out is required with --uniform-dim")
        return dims.parent / "retrain"
    if dims is not None and Path(out).resolve() == dims.parent.resolve():
        raise UsageError(
            f"--out {out} is the search directory of --dims; retrain would replace the search's "
            "metrics.json (leave --out out to write to DIMS_DIR/retrain)"
        )
    return Path(out)


def read_dims(path: Path, fields: Sequence[str] | None) -> dict[str, int]:
    from torchrec_dimgrow.artifacts import read_dims_json

    try:
        return read_dims_json(path, fields)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--dims: {exc}") from exc
