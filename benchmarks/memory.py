"""Peak search memory per method and D_max, on a Criteo-shaped table set.

For each method (DimGrow, AutoDim, OptEmbed-D, SSEDS, the full uniform model) and each
D_max, one search runs in a FRESH subprocess (``--worker``), so allocator caches of earlier
runs cannot hide or inflate anything. Inside it: imports, synthetic data (the 39 real Criteo
cardinalities divided by ``--scale``, Zipf ids, kept on the host), the 1-rank process group;
then the RSS baseline is taken (``/proc/self/clear_refs`` resets VmHWM), the search runs, and
the peak RSS delta is VmHWM minus that baseline. Every method runs the same way the DimGrow
search does: TorchRec planner + stock sharder inside ``DistributedModelParallel``, fused
in-backward Adagrad on the tables, Adam on the dense part, same batch, same steps.

Reported per run: peak embedding parameter bytes (fp32, stored widths), the tables'
optimizer-state bytes, the measured peak RSS delta (and CUDA peak when run on a GPU), the
dims found. After each DimGrow run the *floor* runs: a plain model at DimGrow's found dims
trained the same way (stored widths rounded up to 4 as the fused kernel needs); the exact
floor ``Σ vocab·d·4·2`` (weights + Adagrad) is reported next to it.

    python benchmarks/memory.py                 # full sweep, D_max 16/32/64 (< 10 min on 2 cores)
    python benchmarks/memory.py --quick         # CI smoke run (~1-2 min)
    python -m torchrec_dimgrow bench memory --d-max 16,32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MiB, hwm_bytes, markdown_table, peak_supported, quiet_logs, reset_peak, write_rows

METHODS = ["dimgrow", "autodim", "optembed", "sseds", "full"]
ALL_METHODS = [*METHODS, "dimreg"]


@dataclass
class MemoryConfig:
    """One sweep's data and training settings (identical for every method).

    Defaults follow the issue's reference measurement: Criteo cardinalities / 20, 200k rows
    in memory, 1 epoch, batch 2048. ``optembed_iterations``/``optembed_eval_rows`` shorten
    OptEmbed's evolution (inference only, so it never sets the peak) to keep the sweep short.
    ``threads``: intra-op threads per worker; 1 because OpenMP spin-waits collapse when the
    (2-core) box is shared, and memory does not depend on it.
    """

    scale: float = 20.0
    rows: int = 200_000
    batch_size: int = 2048
    epochs: int = 1
    max_steps: int | None = None
    exponent: float = 1.1
    seed: int = 0
    optembed_iterations: int = 3
    optembed_eval_rows: int = 8192
    threads: int = 1


def _train_config(cfg: MemoryConfig):  # type: ignore[no-untyped-def]
    from torchrec_dimgrow.config import TrainConfig

    return TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        max_steps=cfg.max_steps,
        early_stop_patience=cfg.epochs + 1,
        seed=cfg.seed,
    )


def _run_dimgrow(data: Any, d_max: int, cfg: MemoryConfig, env: Any, out_dir: Path) -> dict[str, Any]:
    from torchrec_dimgrow.config import DimGrowConfig
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes import search as search_recipe
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    tc = _train_config(cfg)
    # Note the peak when the first checkpoint save starts: what training itself needed, apart
    # from the end-of-epoch checkpoint (DCP save of tables + optimizer state).
    first: dict[str, int] = {}
    save = search_recipe.DimGrowSearch.save_checkpoint

    def noting_save(search: Any) -> None:
        first.setdefault("hwm", hwm_bytes())
        save(search)

    search_recipe.DimGrowSearch.save_checkpoint = noting_save  # type: ignore[method-assign]
    res = run_search(
        data,
        DimGrowConfig(d_max=d_max),
        tc,
        PlanningConfig(batch_size=tc.batch_size),
        env,
        SearchOptions(out_dir, log_every=10, quiet=True),
    )
    m = res["metrics"]
    return {
        "dims": res["dims"],
        "steps": m["steps"],
        "embedding_param_bytes": m["peak_embedding_bytes"],
        "optimizer_state_bytes": m["peak_rank_embedding_bytes"] - m["peak_embedding_bytes"],
        "trajectory": str(out_dir / "trajectory.csv"),
        "hwm_before_checkpoint": first.get("hwm"),
    }


def _run_baseline(
    name: str, data: Any, d_max: int, cfg: MemoryConfig, env: Any, dims: dict[str, int] | None
) -> dict[str, Any]:
    from torchrec_dimgrow.baselines import Placement, make_baseline
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.baseline import run_baseline

    tc = _train_config(cfg)
    per_method: dict[str, dict[str, Any]] = {
        "full": {"train": True},
        "floor": {"train": True, "dims": dims},
        "optembed": {
            "iterations": cfg.optembed_iterations,
            "max_eval_rows": cfg.optembed_eval_rows,
            "cache_lookups": False,
        },
    }
    overrides = per_method.get(name, {})
    search = make_baseline("uniform" if name in ("full", "floor") else name, d_max=d_max, **overrides)
    res = run_baseline(search, data, tc, placement=Placement(env, PlanningConfig(batch_size=tc.batch_size)))
    return {
        "dims": res.dims,
        "steps": res.steps,
        "embedding_param_bytes": res.embedding_param_bytes,
        "optimizer_state_bytes": res.embedding_state_bytes,
    }


def run_method(
    name: str, d_max: int, cfg: MemoryConfig, dims: dict[str, int] | None = None, out_dir: Path | None = None
) -> dict[str, Any]:
    """One search of ``name`` at ``d_max``, measured in this process (call it in a fresh one)."""
    import torch

    from torchrec_dimgrow.data.synthetic import CriteoLikeConfig, criteo_like
    from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed

    torch.set_num_threads(cfg.threads)
    data = criteo_like(CriteoLikeConfig(scale=cfg.scale, rows=cfg.rows, exponent=cfg.exponent, seed=cfg.seed))
    env = init_distributed()
    cuda = env.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(env.device)
    base_cuda = torch.cuda.memory_allocated(env.device) if cuda else 0
    baseline = reset_peak()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = out_dir or Path(tmp)
        if name == "dimgrow":
            res = _run_dimgrow(data, d_max, cfg, env, run_dir)
        else:
            res = _run_baseline(name, data, d_max, cfg, env, dims)
    wall = time.perf_counter() - start
    peak = hwm_bytes() - baseline
    cuda_peak = torch.cuda.max_memory_allocated(env.device) - base_cuda if cuda else None
    destroy_distributed()
    vocab = data.vocab()
    found = res["dims"]
    return {
        "method": name,
        "d_max": d_max,
        "peak_rss_delta_bytes": peak,
        "cuda_peak_bytes": cuda_peak,
        "baseline_rss_bytes": baseline,
        "embedding_param_bytes": res["embedding_param_bytes"],
        "optimizer_state_bytes": res["optimizer_state_bytes"],
        "steps": res["steps"],
        "search_wall_s": round(wall, 2),
        "found_total_dim": sum(found.values()),
        "found_embedding_bytes": sum(4 * vocab[f] * d for f, d in found.items()),
        "exact_floor_bytes": sum(4 * 2 * vocab[f] * d for f, d in found.items()),
        "dims": found,
        **({"trajectory": res["trajectory"]} if "trajectory" in res else {}),
        **(
            {"peak_before_checkpoint_bytes": res["hwm_before_checkpoint"] - baseline}
            if res.get("hwm_before_checkpoint")
            else {}
        ),
    }


# ----------------------------------------------------------------------------- the sweep
def _spawn(
    name: str, d_max: int, cfg: MemoryConfig, dims: dict[str, int] | None, keep_dir: Path | None
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", "--method", name, "--d-max", str(d_max)]
    cmd += ["--config-json", json.dumps(asdict(cfg))]
    if dims is not None:
        cmd += ["--dims-json", json.dumps(dims)]
    if keep_dir is not None:
        cmd += ["--keep-dir", str(keep_dir)]
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} d_max={d_max} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _mib(b: float | None) -> float | None:
    return None if b is None else round(b / MiB, 1)


def _display(row: dict[str, Any]) -> dict[str, Any]:
    out = {
        "method": row["method"],
        "D_max": row["d_max"],
        "peak RSS delta (MiB)": _mib(row["peak_rss_delta_bytes"]),
        "emb params (MiB)": _mib(row["embedding_param_bytes"]),
        "emb opt state (MiB)": _mib(row["optimizer_state_bytes"]),
        "found Σdim": row["found_total_dim"],
        "found emb (MiB)": _mib(row["found_embedding_bytes"]),
        "steps": row["steps"],
        "wall (s)": row["search_wall_s"],
    }
    out["exact floor w+state (MiB)"] = _mib(row["exact_floor_bytes"]) if row["method"] == "floor" else ""
    out["peak before 1st checkpoint (MiB)"] = _mib(row.get("peak_before_checkpoint_bytes"))
    if row.get("cuda_peak_bytes") is not None:
        out["CUDA peak (MiB)"] = _mib(row["cuda_peak_bytes"])
    return out


def ratios(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """DimGrow's peak RSS delta and tables+state bytes relative to every other method, per D_max."""
    out = []
    by = {(r["method"], r["d_max"]): r for r in rows}
    for d in sorted({r["d_max"] for r in rows}):
        dg = by.get(("dimgrow", d))
        if dg is None:
            continue
        for other in ("autodim", "optembed", "sseds", "full", "dimreg", "floor"):
            o = by.get((other, d))
            if o is None:
                continue
            tables = lambda r: r["embedding_param_bytes"] + r["optimizer_state_bytes"]  # noqa: E731
            out.append(
                {
                    "D_max": d,
                    "ratio": f"DimGrow/{other}",
                    "peak RSS delta": round(
                        dg["peak_rss_delta_bytes"] / max(1, o["peak_rss_delta_bytes"]), 3
                    ),
                    "tables + opt state": round(tables(dg) / max(1, tables(o)), 3),
                }
            )
    return out


def sweep(
    methods: Sequence[str], d_maxes: Sequence[int], cfg: MemoryConfig, out_dir: Path
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for d in d_maxes:
        for m in methods:
            keep = out_dir / f"dimgrow_d{d}" if m == "dimgrow" else None
            t = time.perf_counter()
            row = _spawn(m, d, cfg, None, keep)
            rows.append(row)
            if keep is not None:  # keep dims/metrics/trajectory, not the checkpoint
                shutil.rmtree(keep / "checkpoint", ignore_errors=True)
            print(
                f"  {m:9s} D_max={d:3d}  peak +{_mib(row['peak_rss_delta_bytes'])} MiB  ({time.perf_counter() - t:.0f}s)"
            )
            if m == "dimgrow" and any(v > 0 for v in row["dims"].values()):
                floor = _spawn("floor", d, cfg, row["dims"], None)
                rows.append(floor)
                print(f"  {'floor':9s} D_max={d:3d}  peak +{_mib(floor['peak_rss_delta_bytes'])} MiB")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {ALL_METHODS}")
    p.add_argument("--d-max", default="16,32,64", help="comma list of D_max values")
    p.add_argument("--scale", type=float, default=None, help="divide the Criteo cardinalities by this (20)")
    p.add_argument("--rows", type=int, default=None, help="rows held in memory (200000)")
    p.add_argument("--batch-size", type=int, default=None, help="2048")
    p.add_argument("--epochs", type=int, default=None, help="1")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per worker (1)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny tables, 10 steps, D_max 16,32")
    p.add_argument("--out", type=Path, default=Path("runs/bench/memory"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--config-json", help=argparse.SUPPRESS)
    p.add_argument("--dims-json", help=argparse.SUPPRESS)
    p.add_argument("--keep-dir", type=Path, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> MemoryConfig:
    cfg = (
        MemoryConfig(scale=2000.0, rows=20_000, batch_size=512, max_steps=10)
        if args.quick
        else MemoryConfig()
    )
    for key in ("scale", "rows", "batch_size", "epochs", "max_steps", "threads"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        quiet_logs()
        cfg = MemoryConfig(**json.loads(args.config_json))
        dims = json.loads(args.dims_json) if args.dims_json else None
        row = run_method(args.method, int(args.d_max), cfg, dims, args.keep_dir)
        print("RESULT " + json.dumps(row))
        return 0
    if not peak_supported():
        print("error: /proc/self/clear_refs is missing; peak RSS cannot be measured here", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        print(f"error: unknown methods {unknown}; known: {ALL_METHODS}", file=sys.stderr)
        return 2
    d_maxes = (
        [int(x) for x in args.d_max.split(",")] if not (args.quick and args.d_max == "16,32,64") else [16, 32]
    )
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"memory sweep: {methods} x D_max {d_maxes}; {asdict(cfg)}")
    start = time.perf_counter()
    rows = sweep(methods, d_maxes, cfg, args.out)
    table = [_display(r) for r in rows]
    ratio_rows = ratios(rows)
    from torchrec_dimgrow.config import DimGrowConfig

    meta = {
        "command": command.strip(),
        "config": asdict(cfg),
        "dimgrow_config": DimGrowConfig().to_dict(),
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_rows(rows, args.out, "memory", meta)
    write_rows(ratio_rows, args.out, "memory_ratios", meta)
    print()
    print(markdown_table(table, list(table[0].keys()) if table else [], digits=1))
    print()
    if ratio_rows:
        print(
            markdown_table(ratio_rows, ["D_max", "ratio", "peak RSS delta", "tables + opt state"], digits=3)
        )
    print(f"\n{meta['command']}  ({meta['wall_s']} s) -> {args.out}/memory.{{csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
