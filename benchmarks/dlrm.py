"""TorchRec DLRM on Criteo-format data: DimGrow-found dims (retrained) vs uniform dims.

For every seed: search with the DimGrow swap inside a stock DLRM training setup
(``DistributedModelParallel`` + ``TrainPipelineSparseDist``, 1-rank gloo world), in both
gate modes (``darts``: gates updated on validation batches; ``single``: gates updated on
the training batches, no second loader), export the found dims (best-validation epoch)
and retrain a fresh DLRM at those dims from scratch (per-field projection or zero-pad to
the common width D, as DLRM needs one width). Uniform baselines are the stock DLRM at
D in ``--uniform``. Every retrain uses the same recipe (Adagrad tables, Adam dense,
early stopping on validation AUC, test metrics of the best epoch). The "keep fields" rows
retrain the same found dims with every dropped field put back at dim 1, which separates
DimGrow's dimension choice from its field selection.

Reported per method: Σdim over the sparse fields, embedding bytes ``Σ vocab_f·dim_f·4``,
projection parameters, test AUC / log loss mean ± std over seeds, search wall time.

    python benchmarks/dlrm.py                       # 5 seeds, both gate modes, alpha 0.5 and 0.1
    python benchmarks/dlrm.py --aligns project,pad  # also retrain with zero-padding
    python benchmarks/dlrm.py --quick               # 1 seed, 2+3 epochs (smoke)
    python benchmarks/dlrm.py --set initial_dim=None  # a DimGrowConfig override for every search
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from _common import REPO, markdown_table, mean_std, pm, quiet_logs, write_rows
from torch import nn

DEFAULT_DATA = REPO.parent / "shared" / "data" / "criteo" / "criteo_head8k"


@dataclass
class BenchConfig:
    """One benchmark run (all retrains share ``retrain_epochs``/``patience``)."""

    data: str = str(DEFAULT_DATA)
    cache_dir: str = ""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    dim: int = 16
    uniform: list[int] = field(default_factory=lambda: [4, 8, 16])
    modes: list[str] = field(default_factory=lambda: ["darts", "single"])
    aligns: list[str] = field(default_factory=lambda: ["project"])
    batch_size: int = 128
    search_epochs: int = 8
    retrain_epochs: int = 15
    patience: int = 2
    dense_lr: float = 3e-3
    embedding_lr: float = 0.05
    gate_lr: float = 5e-3
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.1])
    keep_fields: bool = True
    threads: int = 1
    dimgrow_set: dict[str, Any] = field(default_factory=dict)  # DimGrowConfig overrides


# ----------------------------------------------------------------------------- model
def sparse_tables(data: Any, dim: int) -> list[Any]:
    """One table per Criteo categorical field (the integer fields feed the dense tower)."""
    from torchrec import EmbeddingBagConfig

    return [
        EmbeddingBagConfig(name=f, embedding_dim=dim, num_embeddings=v, feature_names=[f])
        for f, v in data.vocab().items()
        if f.startswith("C")
    ]


def build_dlrm(data: Any, dim: int, device: str = "cpu") -> nn.Module:
    """The stock TorchRec DLRM used everywhere here (only D changes for the baselines)."""
    from torchrec import EmbeddingBagCollection
    from torchrec.models.dlrm import DLRM, DLRMTrain

    ebc = EmbeddingBagCollection(tables=sparse_tables(data, dim), device=torch.device(device))
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=data.num_dense,
            dense_arch_layer_sizes=[64, dim],
            over_arch_layer_sizes=[64, 32, 1],
        )
    )


def logits_of(model: nn.Module, batch: Any) -> torch.Tensor:
    return model(batch)[1][1]


def epoch_batches(split: Any, cfg: BenchConfig, seed: int, epoch: int) -> Iterator[Any]:
    return split.batches(cfg.batch_size, shuffle=True, seed=seed, epoch=epoch, drop_last=True)


def endless(split: Any, cfg: BenchConfig, seed: int) -> Iterator[Any]:
    for epoch in itertools.count():
        yield from epoch_batches(split, cfg, seed, epoch)


# ----------------------------------------------------------------------------- search
def search(data: Any, cfg: BenchConfig, mode: str, seed: int, alpha: float) -> dict[str, Any]:
    """DimGrow inside DLRM + DMP + TrainPipelineSparseDist; dims of the best-val epoch."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from torchrec_dimgrow import swap_in
    from torchrec_dimgrow.config import DimGrowConfig
    from torchrec_dimgrow.training import EarlyStopping, evaluate

    torch.manual_seed(seed)
    start = time.perf_counter()
    device = torch.device("cpu")
    model = build_dlrm(data, cfg.dim, device="meta")
    dg = DimGrowConfig(d_max=cfg.dim, gate_lr=cfg.gate_lr, alpha=alpha, **cfg.dimgrow_set)
    handle = swap_in(model, dg, align="project")
    apply_optimizer_in_backward(torch.optim.Adagrad, handle.embedding_parameters(), {"lr": cfg.embedding_lr})
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"),
        batch_size=cfg.batch_size,
        constraints=handle.constraints(),
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    plan = planner.plan(model, get_default_sharders())  # type: ignore[arg-type]
    dmp = DistributedModelParallel(module=model, device=device, plan=plan)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    handle.attach(dmp, pipeline=pipeline, optimizer=optimizer)
    val_stream = endless(data.val, cfg, seed + 7919)
    early, best_dims, steps, history = EarlyStopping(cfg.patience), handle.found_dims(), 0, []
    for epoch in range(cfg.search_epochs):
        dmp.train()
        it = epoch_batches(data.train, cfg, seed, epoch)
        while True:
            try:
                pipeline.progress(it)
            except StopIteration:
                break
            handle.step(next(val_stream) if mode == "darts" else None)
            steps += 1
        with handle.unpipelined() as plain:
            auc = evaluate(plain, data.val, cfg.batch_size, device, forward=logits_of)["auc"]
        history.append({"epoch": epoch, "val_auc": auc, "total_dim": sum(handle.dims().values())})
        if early.update(auc, epoch):
            best_dims = handle.found_dims()
        elif early.stop:
            break
    return {
        "dims": best_dims,
        "search_val_auc": early.best,
        "search_wall_s": round(time.perf_counter() - start, 2),
        "search_steps": steps,
        "replans": handle.replans,
        "history": history,
    }


# ----------------------------------------------------------------------------- retrain
def retrain(
    data: Any,
    cfg: BenchConfig,
    seed: int,
    dim: int,
    dims: dict[str, int] | None = None,
    align: str = "project",
) -> dict[str, Any]:
    """Fresh DLRM at width ``dim``; with ``dims``, the found dims exported into it. Early-stopped."""
    from torchrec_dimgrow import export
    from torchrec_dimgrow.training import EarlyStopping, evaluate

    torch.manual_seed(seed)
    model = build_dlrm(data, dim)
    if dims is not None:
        export(model, dims, align=align)  # type: ignore[arg-type]
    tables = [p for n, p in model.named_parameters() if ".embedding_bags." in n]
    table_ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    opts = [torch.optim.Adagrad(tables, lr=cfg.embedding_lr), torch.optim.Adam(dense, lr=cfg.dense_lr)]
    early, best_state = EarlyStopping(cfg.patience), copy.deepcopy(model.state_dict())
    for epoch in range(cfg.retrain_epochs):
        model.train()
        for batch in epoch_batches(data.train, cfg, seed, epoch):
            for o in opts:
                o.zero_grad(set_to_none=True)
            model(batch)[0].backward()
            for o in opts:
                o.step()
        auc = evaluate(model, data.val, cfg.batch_size, forward=logits_of)["auc"]
        if early.update(auc, epoch):
            best_state = copy.deepcopy(model.state_dict())
        elif early.stop:
            break
    model.load_state_dict(best_state)
    test = evaluate(model, data.test, cfg.batch_size, forward=logits_of)
    proj = sum(p.numel() for n, p in model.named_parameters() if ".align.projections." in n)
    return {
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "val_auc": early.best,
        "projection_params": proj,
    }


# ----------------------------------------------------------------------------- driver
def _row(method: str, seed: int, data: Any, dims: dict[str, int]) -> dict[str, Any]:
    vocab = data.vocab()
    params = sum(vocab[f] * d for f, d in dims.items())
    return {
        "method": method,
        "seed": seed,
        "total_dim": sum(dims.values()),
        "fields_kept": sum(1 for d in dims.values() if d > 0),
        "embedding_params": params,
        "embedding_bytes": 4 * params,
        "dims": dims,
    }


def run_seed(data: Any, cfg: BenchConfig, seed: int) -> list[dict[str, Any]]:
    rows = []
    fields = [t.name for t in sparse_tables(data, 1)]
    for d in cfg.uniform:
        row = _row(f"uniform D={d}", seed, data, dict.fromkeys(fields, d))
        rows.append({**row, **retrain(data, cfg, seed, d), "search_wall_s": 0.0})
        _progress(rows[-1])
    for mode, alpha in itertools.product(cfg.modes, cfg.alphas):
        found = search(data, cfg, mode, seed, alpha)
        variants = [("", found["dims"])]
        if cfg.keep_fields:  # the found dims without DimGrow's field selection (dropped -> 1)
            variants.append((", keep fields", {f: max(d, 1) for f, d in found["dims"].items()}))
        for (suffix, dims), align in itertools.product(variants, cfg.aligns):
            row = _row(f"dimgrow {mode} α={alpha:g} ({align}{suffix})", seed, data, dims)
            metrics = retrain(data, cfg, seed, cfg.dim, dims, align)
            rows.append({**row, **metrics, **{k: v for k, v in found.items() if k != "dims"}})
            _progress(rows[-1])
    return rows


def _progress(r: dict[str, Any]) -> None:
    print(
        f"  {r['method']:44s} seed {r['seed']}: Σdim {r['total_dim']:4d}  "
        f"emb {r['embedding_bytes'] / 1024:7.1f} KiB  test AUC {r['test_auc']:.4f}",
        flush=True,
    )


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: mean ± std over seeds."""
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        out.append(
            {
                "method": method,
                "seeds": len(rs),
                "Σdim (per seed)": "/".join(str(r["total_dim"]) for r in rs),
                "emb KiB": f"{mean_std(r['embedding_bytes'] for r in rs)[0] / 1024:.1f}",
                "proj params": f"{mean_std(r['projection_params'] for r in rs)[0]:.0f}",
                "test AUC": pm(r["test_auc"] for r in rs),
                "test logloss": pm(r["test_logloss"] for r in rs),
                "search val AUC": pm(r["search_val_auc"] for r in rs) if "search_val_auc" in rs[0] else "–",
                "search s": f"{mean_std(r['search_wall_s'] for r in rs)[0]:.1f}",
            }
        )
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/dlrm.py", description=__doc__.split("\n\n")[0])
    d = BenchConfig()
    p.add_argument("--data", default=d.data, help="Criteo TSV prefix or file (default: the 8k head sample)")
    p.add_argument("--cache-dir", default="")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--dim", type=int, default=d.dim, help="DLRM's common width D (the search's d_max)")
    p.add_argument("--uniform", default="4,8,16", help="uniform baselines (comma list of D)")
    p.add_argument("--modes", default="darts,single")
    p.add_argument("--aligns", default="project", help="export alignment(s): project,pad")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--search-epochs", type=int, default=d.search_epochs)
    p.add_argument("--retrain-epochs", type=int, default=d.retrain_epochs)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--gate-lr", type=float, default=d.gate_lr)
    p.add_argument("--alphas", default="0.5,0.1", help="DimGrow penalty knob(s) (auto mode)")
    p.add_argument(
        "--no-keep-fields", action="store_true", help="skip the rows that keep dropped fields at dim 1"
    )
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--set", action="append", default=[], help="DimGrowConfig override key=value")
    p.add_argument("--quick", action="store_true", help="seed 0, 2 search / 3 retrain epochs (smoke)")
    p.add_argument("--out", type=Path, default=Path("runs/bench/dlrm"))
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from torchrec_dimgrow.runconfig import parse_overrides

    def ints(s: str) -> list[int]:
        return [int(x) for x in s.split(",") if x]

    cfg = BenchConfig(
        data=args.data,
        cache_dir=args.cache_dir,
        seeds=ints(args.seeds),
        dim=args.dim,
        uniform=ints(args.uniform),
        modes=[m for m in args.modes.split(",") if m],
        aligns=[a for a in args.aligns.split(",") if a],
        batch_size=args.batch_size,
        search_epochs=args.search_epochs,
        retrain_epochs=args.retrain_epochs,
        patience=args.patience,
        gate_lr=args.gate_lr,
        alphas=[float(a) for a in args.alphas.split(",") if a],
        keep_fields=not args.no_keep_fields,
        threads=args.threads,
        dimgrow_set=parse_overrides(args.set),
    )
    if args.quick:
        cfg.seeds, cfg.search_epochs, cfg.retrain_epochs = cfg.seeds[:1], 2, 3
    bad = sorted(set(cfg.modes) - {"darts", "single"}) + sorted(set(cfg.aligns) - {"project", "pad"})
    if bad:
        raise SystemExit(f"error: unknown modes/aligns {bad}")
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    from torchrec_dimgrow.data import prepare
    from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed

    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    quiet_logs()
    torch.set_num_threads(cfg.threads)
    command = "python benchmarks/dlrm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    cache = Path(cfg.cache_dir or tempfile.gettempdir()) / "dimgrow_dlrm_cache"
    data = prepare(cfg.data, "criteo", cache)
    init_distributed("gloo")
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    try:
        for seed in cfg.seeds:
            runs += run_seed(data, cfg, seed)
    finally:
        destroy_distributed()
    table = summarise(runs)
    meta = {
        "command": command.strip(),
        "config": asdict(cfg),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_rows(runs, args.out, "dlrm_runs", meta)
    write_rows(table, args.out, "dlrm_summary", meta)
    md = markdown_table(table, list(table[0]))
    (args.out / "dlrm_summary.md").write_text(md + "\n")
    print(md)
    print(f"\n{len(runs)} runs in {meta['wall_s']} s; wrote {args.out}/dlrm_summary.{{md,csv,json}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
