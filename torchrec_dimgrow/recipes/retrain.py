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
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from torchrec_dimgrow.artifacts import write_json_atomic
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
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


def retrain_spec(data: PreparedData, dims: Mapping[str, int], tc: TrainConfig) -> ModelSpec:
    """The saved-model spec of a retrain: every field's dim plus the backbone settings."""
    missing = [f for f in data.fields if f not in dims]
    if missing:
        raise ValueError(f"dims has no entry for fields {missing}")
    if not any(int(dims[f]) for f in data.fields):
        raise ValueError("every field has dim 0: nothing to retrain")
    return spec_for(
        data.fields,
        data.vocab_sizes,
        dims,
        adapter_dim=tc.adapter_dim,
        hidden=list(tc.hidden),
        dropout=tc.dropout,
    )


def build_retrain_model(
    data: PreparedData, dims: Mapping[str, int], tc: TrainConfig, init_std: float = 0.01
) -> CTRModel:
    return build_model(retrain_spec(data, dims, tc), init_std=init_std)


def retrain(
    dims: Mapping[str, int],
    data: PreparedData,
    tc: TrainConfig,
    out_dir: str | Path | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """Train from scratch at ``dims``; return (and write) test AUC / log loss and sizes.

    With ``out_dir`` the best-validation model is saved to ``out_dir/model`` (see
    :mod:`torchrec_dimgrow.saved_model`), so ``evaluate`` and ``export`` can reload it.
    """
    start = time.perf_counter()
    torch.manual_seed(tc.seed)
    model = build_retrain_model(data, dims, tc)
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
    test = evaluate(model, data.test, tc.batch_size)
    vocab = data.vocab()
    found = {f: int(dims[f]) for f in data.fields}
    metrics: dict[str, Any] = {
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "val_auc": early.best,
        "learned": early.learned,
        "embedding_params": field_params(vocab, found),
        "embedding_bytes": field_bytes(vocab, found),
        "total_dim": int(sum(int(dims[f]) for f in data.fields)),
        "dims": {f: int(dims[f]) for f in data.fields},
        "seed": tc.seed,
        "steps": steps,
        "wall_seconds": round(time.perf_counter() - start, 3),
        "history": [{k: v for k, v in h.items() if k != "step"} for h in history],
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        ids = vocab_fingerprint(data.directory) if data.directory is not None else None
        save_model(model, retrain_spec(data, dims, tc), out, vocab=ids)
        write_json_atomic(out / "metrics.json", metrics)
    return metrics


def retrain_main(cfg: RetrainRunConfig) -> int:
    """Run the ``retrain`` command: found dims (``run.dims``) or ``run.uniform_dim``."""
    cfg.data.require()
    dims_file = Path(cfg.run.dims) if cfg.run.dims is not None else None
    if dims_file is None and cfg.run.uniform_dim is None:
        raise UsageError("give --dims DIMS.json (a search's) or --uniform-dim D")
    out = _retrain_out(dims_file, cfg.run.out)
    if dims_file is not None:
        read_dims(dims_file, None)  # malformed/negative dims fail before any data is prepared
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
            if dims_file is not None:
                dims = read_dims(dims_file, data.fields)
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
