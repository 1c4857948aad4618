"""The ``baseline`` command: a SuperNet baseline search (1-rank DMP, N ranks under torchrun,
or ``run.local`` plain modules) that writes dims.json. The method and its config overrides
(``--set method.KEY=VALUE``) go to :func:`~torchrec_dimgrow.baselines.make_baseline`."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed
from torchrec_dimgrow.errors import UsageError
from torchrec_dimgrow.recipes.setup import local_env, lock_out, prepare_on_rank0
from torchrec_dimgrow.runconfig import BaselineRunConfig


def baseline_main(cfg: BaselineRunConfig) -> int:
    from torchrec_dimgrow.baselines import BASELINES, Placement, make_baseline

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
        result = search.search(data, cfg.train, out_dir=Path(out), placement=Placement(env))
        finished = True
    finally:
        lock.close()
        if env is not None:
            destroy_distributed(synchronize=finished)
    if env is None or env.is_main:
        total = sum(result.dims.values())
        print(f"dims: {json.dumps(result.dims)}\ntotal_dim {total}  -> {Path(out) / 'dims.json'}")
    return 0
