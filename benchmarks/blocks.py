"""Frequency blocks: field-level DimGrow vs DimGrow per frequency block vs MDE vs uniform dims.

For every dataset and seed: the field-level search and the block search (one table per
frequency block, ``BlockConfig(enabled=True)``; the boundaries are the prepared data's, or
for the synthetic data cut by the same rule from its train counts) run under the same
byte budget (a fraction of the ``d_max`` model; ``--budget 0``: none, the package default),
then a fresh plain model is retrained at the found dims with the shared ``retrain`` recipe
(per block: the same id remap in front of one stock table per kept block). Other methods:

* ``mde``: Mixed-Dimension Embeddings' own block rule (Ginart et al.; ``md_solver``): the same
  frequency blocks, ``d = c * (rows_block / lookups_block)^-alpha`` (alpha 0.3) at the bytes the
  block search of the same seed found, so the two are compared at equal bytes;
* ``mde_field``: the same rule per field (``d = c * rows^-alpha``) at the field search's bytes;
* ``uniform``: every field at ``budget * d_max`` dims; ``uniformK``: every field at K dims.
  With two or more uniform points the summary adds each method's margin over the uniform curve
  (linear in log bytes) and its iso-AUC bytes ratio.

Reported: found embedding bytes ``4 * sum rows * dim`` (per table), test AUC / log loss of
the retrained model, search wall time. ``--work DIR`` caches every run as JSON, so processes
that split the methods or seeds share it and a last run with all of them only assembles.

    python benchmarks/blocks.py --quick --out /tmp/blocks       # zipf + movielens, 1 seed, short
    python benchmarks/blocks.py --datasets zipf --seeds 0,1,2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REPO,
    block_lookups,
    cached,
    iso_auc_bytes,
    markdown_table,
    mde_allocation,
    mean_std,
    pm,
    quiet_logs,
    uniform_reference,
    write_rows,
)

METHODS = ["field", "blocks", "uniform"]
MDE_ALPHA = 0.3  # md_solver's usual exponent (Ginart et al. report 0.1-0.4)
MDE_OF = {"mde": "blocks", "mde_field": "field"}  # an MDE method -> the search whose bytes it gets
DATA_ROOT = REPO.parent / "shared" / "data"


@dataclass
class BlocksBenchConfig:
    datasets: list[str] = field(default_factory=lambda: ["zipf", "movielens"])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    d_max: int = 16
    budget: float = 0.25  # 0: no budget (the package default); uniform then runs at d_max / 4
    batch_size: int = 256
    search_epochs: int = 6
    retrain_epochs: int = 10
    patience: int = 2
    zipf_rows: int = 60_000
    shaped_rows: int = 1_000_000
    data_root: str = str(DATA_ROOT)
    cache_dir: str = ""
    work: str = ""
    retrain_seeds: list[int] = field(default_factory=list)  # empty: each search's own seed


def load_dataset(name: str, cfg: BlocksBenchConfig) -> Any:
    if name == "zipf":
        from torchrec_dimgrow.data.synthetic import FMConfig, fm_interactions

        # an FM teacher over Zipf(1.1) ids: big tables whose head is seen often and tail rarely
        return fm_interactions(
            FMConfig(
                rows=cfg.zipf_rows,
                vocab=(50, 300, 2_000, 5_000, 5_000, 2_000),
                ranks=(0, 1, 2, 4, 8, 8),
                exponent=1.1,
                seed=0,
            )
        )
    if name == "shaped":
        from torchrec_dimgrow.data.synthetic import ShapedConfig, criteo_shaped

        # Criteo's 39 fields (cardinalities / 200, Zipf ids), hidden needs 0-16: big tables
        # whose few hot ids carry most lookups
        return criteo_shaped(ShapedConfig(rows=cfg.shaped_rows, seed=0))
    if name == "movielens":
        from torchrec_dimgrow.data import prepare

        cache = Path(cfg.cache_dir or tempfile.gettempdir()) / "dimgrow_blocks_cache" / name
        return prepare(Path(cfg.data_root) / "movielens-100k", "movielens", cache)
    raise ValueError(f"unknown dataset {name!r}")


def _train_cfg(cfg: BlocksBenchConfig, seed: int, epochs: int) -> Any:
    from torchrec_dimgrow.config import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=cfg.batch_size, early_stop_patience=cfg.patience, seed=seed)


def search(
    method: str, data: Any, cfg: BlocksBenchConfig, seed: int, env: Any
) -> tuple[dict[str, int], Any, float]:
    """Found dims (per field or per block), the blocks they are keyed by, and the search wall time."""
    from torchrec_dimgrow.data.blocks import BlockConfig, field_blocks

    if method.startswith("uniform"):
        dim = int(method[len("uniform") :] or round((cfg.budget or 0.25) * cfg.d_max))
        return dict.fromkeys(data.fields, dim), None, 0.0
    from torchrec_dimgrow.config import DimGrowConfig
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    blocks = BlockConfig(enabled=True) if method == "blocks" else None
    dg = DimGrowConfig(d_max=cfg.d_max, budget=cfg.budget or None)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        opts = SearchOptions(Path(tmp), quiet=True, log_every=0, blocks=blocks)
        res = run_search(
            data,
            dg,
            _train_cfg(cfg, seed, cfg.search_epochs),
            PlanningConfig(batch_size=cfg.batch_size),
            env,
            opts,
        )
    fb = field_blocks(data, blocks) if blocks is not None else None
    return res["dims"], fb, time.perf_counter() - start


def mde_dims(
    data: Any, cfg: BlocksBenchConfig, n_bytes: float, per_block: bool = True
) -> tuple[dict[str, int], Any]:
    """MDE's block rule at ``n_bytes``: the search's frequency blocks, each block's dims by how
    often its rows are read in training (``md_solver`` with ``k`` = the block's lookups)."""
    from torchrec_dimgrow.data.blocks import BlockConfig, field_blocks

    if not per_block:
        return mde_allocation(data.vocab(), n_bytes, cfg.d_max, MDE_ALPHA), None
    fb = field_blocks(data, BlockConfig(enabled=True))
    return mde_allocation(fb.vocab(), n_bytes, cfg.d_max, MDE_ALPHA, block_lookups(data, fb)), fb


def allocate(
    method: str, data: Any, cfg: BlocksBenchConfig, seed: int, env: Any, ref_bytes: float | None
) -> dict[str, Any]:
    """One method's dims (per field or per block) and what they cost, before any retrain.
    ``ref_bytes``: for an MDE method, the bytes of the search it is compared with."""
    if method in MDE_OF:
        if ref_bytes is None:
            raise ValueError(
                f"method {method!r} needs the {MDE_OF[method]!r} search of the same seed listed first"
            )
        dims, fb = mde_dims(data, cfg, ref_bytes, per_block=method == "mde")
        wall = 0.0
    else:
        dims, fb, wall = search(method, data, cfg, seed, env)
    vocab = fb.vocab() if fb is not None else data.vocab()
    alloc: dict[str, Any] = {
        "tables": len(vocab),
        "search_wall_s": round(wall, 2),
        "embedding_bytes": 4 * sum(vocab[t] * d for t, d in dims.items()),
        "dims": dims,
    }
    if fb is not None:
        alloc["blocks"] = fb.to_dict()
    return alloc


def retrain_alloc(alloc: dict[str, Any], data: Any, cfg: BlocksBenchConfig, seed: int) -> dict[str, float]:
    """Test AUC / log loss of a fresh plain model at ``alloc``'s dims (retrain seed ``seed``)."""
    from torchrec_dimgrow.data.blocks import FieldBlocks
    from torchrec_dimgrow.recipes.retrain import retrain

    if not any(alloc["dims"].values()):
        return {"test_auc": float("nan"), "test_logloss": float("nan")}
    fb = None
    if "blocks" in alloc:
        fb = FieldBlocks(list(data.fields), list(data.vocab_sizes), [alloc["blocks"][f] for f in data.fields])
    metrics = retrain(alloc["dims"], data, _train_cfg(cfg, seed, cfg.retrain_epochs), blocks=fb)
    return {"test_auc": metrics["test_auc"], "test_logloss": metrics["test_logloss"]}


def run_one(
    method: str,
    data: Any,
    dataset: str,
    cfg: BlocksBenchConfig,
    seed: int,
    env: Any,
    ref_bytes: float | None = None,
) -> dict[str, Any]:
    """One search seed of one method: its dims, retrained once per retrain seed (cached under
    ``cfg.work``); ``test_auc`` is the mean over the retrain seeds."""
    tag = run_tag(dataset, method, seed, cfg)
    alloc = cached_in(cfg, tag, lambda: allocate(method, data, cfg, seed, env, ref_bytes))
    seeds = cfg.retrain_seeds or [seed]
    scores = [cached_in(cfg, f"{tag}-r{r}", partial(retrain_alloc, alloc, data, cfg, r)) for r in seeds]
    keep = ("tables", "search_wall_s", "embedding_bytes", "dims", "blocks")
    return {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        **{k: alloc[k] for k in keep if k in alloc},
        "retrain_seeds": seeds,
        "test_aucs": [x["test_auc"] for x in scores],
        "test_auc": float(np.mean([x["test_auc"] for x in scores])),
        "test_logloss": float(np.mean([x["test_logloss"] for x in scores])),
    }


def uniform_curve(runs: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(bytes, mean test AUC) of every uniform method in ``runs`` (one dataset)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["method"].startswith("uniform"):
            by.setdefault(r["method"], []).append(r)
    return [
        (mean_std(r["embedding_bytes"] for r in rs)[0], mean_std(r["test_auc"] for r in rs)[0])
        for rs in by.values()
    ]


def summarise(runs: Sequence[dict[str, Any]], budgets: dict[str, int]) -> list[dict[str, Any]]:
    out = []
    for ds in dict.fromkeys(r["dataset"] for r in runs):
        curve = uniform_curve([r for r in runs if r["dataset"] == ds])
        for m in dict.fromkeys(r["method"] for r in runs if r["dataset"] == ds):
            rs = [r for r in runs if r["dataset"] == ds and r["method"] == m]
            b, _ = mean_std(r["embedding_bytes"] for r in rs)
            auc, _ = mean_std(r["test_auc"] for r in rs)
            versus: dict[str, Any] = {}
            if len(curve) >= 2:
                iso, where = iso_auc_bytes(curve, auc)
                versus = {
                    "margin": round(auc - uniform_reference(curve, b), 4),
                    "iso_ratio": round(iso / b, 2),
                    "iso": where,
                }
            out.append(
                {
                    "dataset": ds,
                    "method": m,
                    "runs": f"{len(rs)}x{len(rs[0]['retrain_seeds'])}",
                    "tables": rs[0]["tables"],
                    "budget_KiB": round(budgets[ds] / 1024, 1) if budgets[ds] else "none",
                    "found_KiB": round(b / 1024, 1),
                    # mean +- std over every (search seed, retrain seed) run
                    "test_auc": pm(a for r in rs for a in r["test_aucs"]),
                    "test_logloss": pm(r["test_logloss"] for r in rs),
                    "search_s": round(mean_std(r["search_wall_s"] for r in rs)[0], 1),
                    **versus,
                }
            )
    return out


def run_tag(dataset: str, method: str, seed: int, cfg: BlocksBenchConfig) -> str:
    """A run's cache name: what it is, and a hash of every setting its result depends on."""
    skip = ("datasets", "methods", "seeds", "retrain_seeds", "data_root", "cache_dir", "work")
    key = {k: v for k, v in asdict(cfg).items() if k not in skip}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return f"{dataset}-{method}-s{seed}-{digest}"


def cached_in(cfg: BlocksBenchConfig, tag: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``, cached as ``cfg.work/tag.json`` when ``cfg.work`` is set."""
    return cached(Path(cfg.work) / f"{tag}.json", compute) if cfg.work else compute()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="zipf,movielens")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0")
    p.add_argument("--d-max", type=int, default=16)
    p.add_argument(
        "--budget",
        type=float,
        default=0.25,
        help="fraction of the d_max model's bytes (0: none, the package default)",
    )
    p.add_argument("--search-epochs", type=int, default=6)
    p.add_argument("--retrain-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--zipf-rows", type=int, default=60_000)
    p.add_argument("--shaped-rows", type=int, default=1_000_000, help="rows of the Criteo-shaped data")
    p.add_argument(
        "--retrain-seeds", default="", help="retrain every allocation with each (default: its search seed)"
    )
    p.add_argument("--work", default="", help="cache every run here (a rerun or a second process reuses it)")
    p.add_argument("--data-root", default=str(DATA_ROOT))
    p.add_argument("--cache-dir", default="")
    p.add_argument("--quick", action="store_true", help="1 seed, 3 search / 5 retrain epochs, 30k Zipf rows")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return p


def config_from_args(args: argparse.Namespace) -> BlocksBenchConfig:
    cfg = BlocksBenchConfig(
        datasets=args.datasets.split(","),
        methods=args.methods.split(","),
        seeds=[int(s) for s in args.seeds.split(",")],
        d_max=args.d_max,
        budget=args.budget,
        search_epochs=args.search_epochs,
        retrain_epochs=args.retrain_epochs,
        batch_size=args.batch_size,
        zipf_rows=args.zipf_rows,
        shaped_rows=args.shaped_rows,
        work=args.work,
        retrain_seeds=[int(s) for s in args.retrain_seeds.split(",") if s],
        data_root=args.data_root,
        cache_dir=args.cache_dir,
    )
    if args.quick:
        cfg.seeds, cfg.search_epochs, cfg.retrain_epochs, cfg.zipf_rows = [0], 3, 5, 30_000
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    quiet_logs()
    torch.set_num_threads(1)
    command = "python benchmarks/blocks.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = init_distributed()
    runs: list[dict[str, Any]] = []
    budgets: dict[str, int] = {}
    start = time.perf_counter()
    try:
        for ds in cfg.datasets:
            data = load_dataset(ds, cfg)
            budgets[ds] = round(cfg.budget * 4 * cfg.d_max * sum(data.vocab_sizes))
            found: dict[tuple[str, int], float] = {}  # (method, seed) -> bytes, for the MDE rows
            for m in cfg.methods:
                for seed in cfg.seeds:
                    t = time.perf_counter()
                    if m.startswith("uniform") and cfg.retrain_seeds and seed != cfg.seeds[0]:
                        continue  # its dims do not depend on the search seed: once per retrain seed
                    r = run_one(m, data, ds, cfg, seed, env, found.get((MDE_OF.get(m, ""), seed)))
                    runs.append(r)
                    found[m, seed] = r["embedding_bytes"]
                    print(
                        f"  {ds:9s} {m:7s} seed {seed}: {r['embedding_bytes'] / 1024:8.1f} KiB  "
                        f"test AUC {r['test_auc']:.4f}  ({time.perf_counter() - t:.0f}s)",
                        flush=True,
                    )
    finally:
        destroy_distributed()
    table = summarise(runs, budgets)
    meta = {
        "command": command.strip(),
        "config": asdict(cfg),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_rows(runs, args.out, "blocks_runs", meta)
    write_rows(table, args.out, "blocks", meta)
    print()
    print(markdown_table(table, list(table[0].keys()) if table else []))
    print(f"\n{meta['command']}  ({meta['wall_s']} s) -> {args.out}/blocks.{{csv,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
