"""Training-step time of the DimGrow collection vs a plain TorchRec EBC with the same dims.

Both models are built in the same process on the same batches (pre-built, so no data
loading is timed) and timed in interleaved rounds (DimGrow block, plain block, repeat), so
machine noise hits both alike; the medians of the per-round step times give the ratio.
Three numbers per dims setting:

* ``plain``: a stock ``EmbeddingBagCollection`` at the dims -> concat -> Linear -> WideDeep;
  one forward/backward/optimizer step on a training batch.
* ``dimgrow train``: the same step with the DimGrow collection (tables at capacity, gates
  mixing shuffled columns, per-field projection to the adapter width, summed).
* ``dimgrow search``: the full search step: the train step plus the gate step on a
  validation batch plus one grow/shrink decision (no dim changes happen: thresholds are
  set out of reach so the dims stay the ones being compared).

Three paths, each a row per dim with its own interleaved plain baseline: ``summed`` (above),
``per-feature`` (the KeyedTensor a DLRM reads through ``swap_in``: every feature projected
to the common width ``dim``, into the plain model's concat adapter) and ``per-feature
blocks`` (the same over frequency blocks, each field the sum of its blocks' outputs).

Single process, plain torch optimizers (Adagrad on tables, Adam on the rest); the sharded
cost of re-planning is measured by the replan benchmark, not here.

Page faults: glibc returns freed heap tops to the kernel once they pass its (adaptive) trim
threshold, and a step that then allocates them again faults every page back in (~5 us a
page on a VM). Whether that happens depends on the process's allocation history, so the
count moves from run to run (0 to ~17k per step for the dim-16 DimGrow rows, 0 for plain);
``MALLOC_TRIM_THRESHOLD_=4000000000 MALLOC_MMAP_THRESHOLD_=1000000000`` in the environment
keeps every row's freed memory and measures the compute alone. Both are reported.

    python benchmarks/overhead.py                       # dims 1, 4, 8, 16 on a Criteo-shaped set
    python benchmarks/overhead.py --quick
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, quiet_logs, write_rows


@dataclass
class OverheadConfig:
    dims: list[int] = field(default_factory=lambda: [1, 4, 8, 16])
    scale: float = 200.0
    rows: int = 40_000
    batch_size: int = 2048
    steps: int = 10
    rounds: int = 5
    warmup: int = 3
    threads: int = 1
    seed: int = 0
    gate_every: int = 1
    device: str = "cpu"
    profile: Path | None = None


PATHS = ("summed", "per-feature", "per-feature blocks")


def _models(data: Any, dim: int, path: str = "summed", adapter: int = 64) -> tuple[Any, Any, Any]:
    """(dimgrow model, its DimGrow collection, plain model) with every field at ``dim``.

    ``path``: ``"summed"`` (the search's model: features projected to the adapter width and
    summed inside the collection), ``"per-feature"`` (the KeyedTensor a DLRM reads: every
    feature projected to the common width ``dim``, concatenated into the same adapter as the
    plain model) or ``"per-feature blocks"`` (the same over frequency blocks, summed per field).
    """
    import torch
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from torchrec_dimgrow.config import DimGrowConfig
    from torchrec_dimgrow.data.blocks import field_blocks
    from torchrec_dimgrow.modules.backbone import CTRModel
    from torchrec_dimgrow.modules.blocks import BlockDimGrowCollection
    from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection

    torch.manual_seed(0)
    cfg = DimGrowConfig(d_max=max(16, dim), initial_dim=dim, grow_threshold=1.0, shrink_threshold=0.0)
    in_dim = dim * len(data.fields)

    def tables(width: int) -> list[Any]:
        # Every field at ``dim`` in both models: a table has at least ``dim`` rows (ids never
        # reach the extra ones), so the row cap does not start a 2-row field at 2.
        return [replace(t, num_embeddings=max(t.num_embeddings, dim)) for t in data.table_configs(width)]

    if path == "summed":
        coll = DimGrowEmbeddingBagCollection(tables(adapter), cfg, align="project")
        dg = CTRModel(coll, "sum", adapter, hidden=(32, 16))
    elif path == "per-feature":
        coll = DimGrowEmbeddingBagCollection(tables(dim), cfg, align="project")
        dg = CTRModel(coll, "concat", adapter, in_dim=in_dim, hidden=(32, 16))
    elif path == "per-feature blocks":
        fb = field_blocks(data)
        fb = replace(fb, vocab_sizes=[max(v, dim) for v in fb.vocab_sizes])
        blocked = BlockDimGrowCollection(fb, dim, cfg, align="project")
        coll = blocked.coll
        dg = CTRModel(blocked, "concat", adapter, in_dim=in_dim, hidden=(32, 16))
    else:
        raise ValueError(f"unknown path {path!r}; one of {PATHS}")
    plain_ebc = EmbeddingBagCollection(tables=tables(dim))
    plain = CTRModel(plain_ebc, "concat", adapter, in_dim=in_dim, hidden=(32, 16))
    return dg, coll, plain


def _optimizers(model: Any, tables: Any, exclude: Sequence[Any] = ()) -> list[Any]:
    import torch

    table_ids = {id(p) for p in tables.parameters()} | {id(p) for p in exclude}
    dense = [p for p in model.parameters() if id(p) not in table_ids]
    return [torch.optim.Adagrad(list(tables.parameters()), lr=0.05), torch.optim.Adam(dense, lr=1e-3)]


def _step_fn(model: Any, opts: list[Any]) -> Callable[[Any], None]:
    from torchrec_dimgrow.training import bce

    def step(batch: Any) -> None:
        for o in opts:
            o.zero_grad(set_to_none=True)
        bce(model(batch.sparse_features), batch.labels).backward()
        for o in opts:
            o.step()

    return step


def _search_step_fn(
    model: Any, coll: Any, opts: list[Any], gate_opt: Any, gate_every: int = 1
) -> Callable[[Any, Any], None]:
    from torchrec_dimgrow.policy import PolicyState, decide
    from torchrec_dimgrow.training import bce

    train = _step_fn(model, opts)
    state = PolicyState(coll.post.dims_list())
    calls = 0

    def step(batch: Any, vbatch: Any) -> None:
        nonlocal state, calls
        train(batch)
        calls += 1
        if calls % gate_every:  # gate_every=k: the gate step and the check on every k-th step
            return
        gate_opt.zero_grad(set_to_none=True)
        with coll.gate_step():
            (bce(model(vbatch.sparse_features), vbatch.labels) + coll.penalty()).backward()
        gate_opt.step()
        gates = coll.gate_values()
        state, _ = decide(
            [gates[t].tolist() for t in range(gates.shape[0])], state, coll.config, coll.post.d_max
        )

    return step


def _time(fn: Callable[[], None]) -> tuple[float, float, int]:
    """(wall seconds, this thread's CPU seconds, minor page faults) of ``fn()``.

    With one intra-op thread all the work runs on the calling thread, so its CPU time is
    the step's own cost even when other processes share the cores (wall time then also
    counts the waits for a core; both are reported). Page faults: a step whose freed
    temporaries went back to the kernel pays to fault them in again on the next step.
    """
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu = time.perf_counter(), time.thread_time()
    fn()
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def measure(dim: int, data: Any, cfg: OverheadConfig, path: str = "summed") -> dict[str, Any]:
    import torch

    dev = torch.device(cfg.device)
    dg, coll, plain = _models(data, dim, path)
    dg, plain = dg.to(dev), plain.to(dev)
    theta = coll.post.gate.theta
    # What DimGrowController.step sets when driven with gate batches (the search's DARTS
    # mode): the training backward skips the gate gradient that the gate step would drop.
    coll.post.training_gate_grad = False
    dg_opts = _optimizers(dg, coll.ebc, exclude=[theta])
    plain_step = _step_fn(plain, _optimizers(plain, plain.sparse))
    dg_train = _step_fn(dg, dg_opts)
    dg_search = _search_step_fn(dg, coll, dg_opts, torch.optim.Adam([theta], lr=1e-3), cfg.gate_every)
    batches = [
        b.to(dev) for b in data.train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)
    ]
    vbatches = [b.to(dev) for b in data.val.batches(cfg.batch_size, shuffle=True, seed=cfg.seed + 1)]
    n = cfg.steps

    def run(fn: Callable[..., None], two: bool) -> tuple[float, float, float]:
        def go() -> None:
            for i in range(n):
                b = batches[i % len(batches)]
                fn(b, vbatches[i % len(vbatches)]) if two else fn(b)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        wall, cpu, faults = _time(go)
        return wall / n, cpu / n, faults / n

    names = ["plain", "dimgrow train", "dimgrow search"]
    fns: list[tuple[Callable[..., None], bool]] = [(plain_step, False), (dg_train, False), (dg_search, True)]
    for _ in range(cfg.warmup):
        for fn, two in fns:
            run(fn, two)
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    faults: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(cfg.rounds):
        for name, (fn, two) in zip(names, fns):
            w, c, f = run(fn, two)
            wall[name].append(w)
            cpu[name].append(c)
            faults[name].append(f)
    if set(coll.post.dims_list()) != {dim}:
        raise RuntimeError("dims changed during the overhead run; the comparison would be unequal")
    if cfg.profile:
        _profile(names, fns, run, cfg.profile / f"dim{dim}_{path.replace(' ', '_')}")
    med = {k: statistics.median(v) * 1000 for k, v in wall.items()}
    cmed = {k: statistics.median(v) * 1000 for k, v in cpu.items()}
    return {
        "dim": dim,
        "path": path,
        "tables": len(coll.table_names),
        "fields": len(data.fields),
        "batch": cfg.batch_size,
        "gate_every": cfg.gate_every,
        "plain ms/step": round(med["plain"], 2),
        "dimgrow train ms/step": round(med["dimgrow train"], 2),
        "dimgrow search ms/step": round(med["dimgrow search"], 2),
        "train ratio": round(med["dimgrow train"] / med["plain"], 2),
        "search ratio": round(med["dimgrow search"] / med["plain"], 2),
        "plain cpu ms": round(cmed["plain"], 2),
        "train cpu ratio": round(cmed["dimgrow train"] / cmed["plain"], 2),
        "search cpu ratio": round(cmed["dimgrow search"] / cmed["plain"], 2),
        **{f"{k} faults/step": round(statistics.median(v)) for k, v in faults.items()},
    }


def _profile(names: list[str], fns: list[tuple[Callable[..., None], bool]], run: Any, out: Path) -> None:
    """torch.profiler op breakdown (self CPU time) of one timed block of each step kind."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    for name, (fn, two) in zip(names, fns):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            run(fn, two)
        # By input shape: the batch-sized ops (B x C) stand apart from the per-table ones.
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40, max_shapes_column_width=60
        )
        (out / f"profile_{name.replace(' ', '_')}.txt").write_text(table)
        print(f"--- {name}\n{table}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="1,4,8,16")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {PATHS}")
    p.add_argument("--scale", type=float, default=200.0, help="Criteo cardinalities divided by this")
    p.add_argument("--rows", type=int, default=40_000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--gate-every", type=int, default=1, help="gate step on every k-th search step")
    p.add_argument("--device", default="cpu", help="cpu or cuda (scripts/gpu_check.sh)")
    p.add_argument("--profile", type=Path, default=None, help="also write torch.profiler op tables here")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=Path("runs/bench/overhead"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from torchrec_dimgrow.data.synthetic import CriteoLikeConfig, criteo_like

    args = build_parser().parse_args(argv)
    quiet_logs()
    cfg = OverheadConfig(
        dims=[int(d) for d in args.dims.split(",")],
        scale=args.scale,
        rows=args.rows,
        batch_size=args.batch_size,
        steps=args.steps,
        rounds=args.rounds,
        threads=args.threads,
        gate_every=args.gate_every,
        device=args.device,
        profile=args.profile,
    )
    if args.quick:
        cfg.dims, cfg.scale, cfg.rows, cfg.batch_size, cfg.steps, cfg.rounds, cfg.warmup = (
            [1, 8],
            2000,
            8000,
            512,
            3,
            3,
            1,
        )
    torch.set_num_threads(cfg.threads)
    data = criteo_like(CriteoLikeConfig(scale=cfg.scale, rows=cfg.rows, seed=cfg.seed))
    rows = [measure(d, data, cfg, path) for path in args.paths.split(",") for d in cfg.dims]
    command = "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_rows(rows, args.out, "overhead", {"command": command.strip(), "config": asdict(cfg)})
    print(markdown_table(rows, list(rows[0].keys()), digits=2))
    print(f"\n{command.strip()} -> {args.out}/overhead.{{csv,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
