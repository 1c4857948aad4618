"""A DimGrow search at Criteo-Terabyte table sizes on one machine: 2 gloo ranks, D_max 64.

Data: Criteo Terabyte's 26 categorical cardinalities (TorchRec's DLRM default list in
``torchrec/inference/dlrm_packager.py``, 177.9M rows in all; ``--scale N`` divides them) plus
13 dense features. Ids are bounded-Zipf; a *teacher* (hashed per-id vectors, so it needs no
table of its own) makes the label depend on low-rank interactions between some fields, so
those fields earn dims and grow through capacity blocks (each crossing is a re-plan). The
rows are written to Parquet row group by row group (``generate``) and every rank streams its
share of each global batch back from disk (``pyarrow.parquet.ParquetFile.iter_batches``): no
split is ever held whole in memory.

    python benchmarks/scale.py --scale 100              # ~3 min: generate, search on 2 ranks, report
    python benchmarks/scale.py --scale 1                # full size (177.9M rows); check `free -g` first
    python benchmarks/scale.py --quick                  # the test suite's small run
    python benchmarks/scale.py generate --out DIR --scale 100 --train-rows 2000000

The parent process generates the data, launches ``torchrun --nproc_per_node=2`` on this file
(``--worker``), watches the machine's available memory (the run is killed, and reported as
aborted, if ``MemAvailable`` falls under ``--min-available-gib``), then prints one markdown
table per rank (peak RSS, init time, step time, every re-plan in seconds and in steps) and
the estimator table: the bytes TorchRec's planner storage estimator gives for full-64,
AutoDim-64, OptEmbed-64, uniform-16 and the found dims, and whether each fits this machine.
Results go to ``benchmarks/results/scale.{csv,json}`` (``--quick``: ``scale_quick``).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import MiB, hwm_bytes, markdown_table, quiet_logs, rss_bytes, write_rows

GiB = 1 << 30
NUM_DENSE = 13
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- cardinalities
def criteo_terabyte_cardinalities() -> list[int]:
    """The 26 Criteo Terabyte cardinalities TorchRec's DLRM packager defaults to.

    Read from the installed ``torchrec/inference/dlrm_packager.py`` source (its argparse
    default) rather than imported: the module imports an example package that is not
    installed with torchrec.
    """
    spec = importlib.util.find_spec("torchrec")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torchrec is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "inference" / "dlrm_packager.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "--num_embeddings_per_feature"
        ):
            for kw in node.keywords:
                if kw.arg == "default":
                    return [int(v) for v in ast.literal_eval(kw.value).split(",")]
    raise RuntimeError(f"{path}: no --num_embeddings_per_feature default found")


def scaled_vocab(scale: float) -> list[int]:
    if scale < 1:
        raise SystemExit(f"--scale must be >= 1, got {scale}")
    return [max(1, round(c / scale)) for c in criteo_terabyte_cardinalities()]


def field_names(n: int) -> list[str]:
    return [f"c{i:02d}" for i in range(n)]


def dense_names() -> list[str]:
    return [f"d{i:02d}" for i in range(NUM_DENSE)]


# ----------------------------------------------------------------------------- teacher
@dataclass
class Teacher:
    """What the label depends on (field indices into the 26 categorical fields).

    ``pairs``: (a, b, rank): ``logit += signal * <u_a[id_a], v_b[id_b]> / sqrt(rank)`` with
    hashed N(0, 1) vectors, so each side is best served by about ``rank`` dims. Ranks above
    4 and 8 push a field through one and two capacity blocks (two re-plans). ``bias``:
    fields with a scalar per-id effect. The remaining fields are noise. As on real Criteo,
    every large id field carries signal (the largest pair and the biases); the noise fields
    are small ones. Which tables carry signal decides how far the floor (the found dims)
    sits below the search's start, where every field holds one 4-column block.
    """

    pairs: tuple[tuple[int, int, int], ...] = ((10, 11, 12), (2, 4, 6), (0, 19, 4))
    bias: tuple[int, ...] = (1, 5, 9, 13, 20, 21, 22)
    signal: float = 1.0
    dense_signal: float = 0.3


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a stateless per-id random stream (uint64 -> uint64)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _M1
        x = x ^ (x >> np.uint64(27))
        x = x * _M2
        return x ^ (x >> np.uint64(31))


def hashed_normal(ids: np.ndarray, salt: int, k: int) -> np.ndarray:
    """(n, k) N(0, 1) values that depend only on (salt, id, column): a table-free teacher."""
    base = ids.astype(np.uint64)[:, None] * np.uint64(2 * k + 1) + np.arange(2 * k, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        bits = _mix(base + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15))
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u1, u2 = u[:, :k], u[:, k:]
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def zipf_ids(vocab: int, n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Bounded Zipf ids by the inverse of the continuous CDF: O(n) time, no O(vocab) table."""
    if vocab == 1:
        return np.zeros(n, dtype=np.int64)
    u = rng.random(n)
    s = exponent
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * math.log(vocab + 1.0))
    else:
        top = (vocab + 1.0) ** (1.0 - s)
        x = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - s))
    return np.minimum(np.floor(x).astype(np.int64) - 1, vocab - 1).clip(0)


def teacher_logit(ids: np.ndarray, dense: np.ndarray, teacher: Teacher, seed: int) -> np.ndarray:
    logit = np.zeros(ids.shape[0])
    for p, (a, b, r) in enumerate(teacher.pairs):
        u = hashed_normal(ids[:, a], seed * 1000 + 2 * p, r)
        v = hashed_normal(ids[:, b], seed * 1000 + 2 * p + 1, r)
        logit += teacher.signal * (u * v).sum(axis=1) / math.sqrt(r)
    for f in teacher.bias:
        logit += teacher.signal * hashed_normal(ids[:, f], seed * 1000 + 500 + f, 1)[:, 0]
    w = hashed_normal(np.arange(NUM_DENSE), seed * 1000 + 999, 1)[:, 0]
    logit += teacher.dense_signal * (dense @ w)
    return logit


# ----------------------------------------------------------------------------- generate
@dataclass
class DataConfig:
    scale: float = 100.0
    train_rows: int = 2_000_000
    val_rows: int = 200_000
    row_group: int = 65_536
    exponent: float = 1.1
    seed: int = 0
    teacher: Teacher = field(default_factory=Teacher)


def generate(out: Path, cfg: DataConfig) -> dict[str, Any]:
    """Write ``train.parquet``/``val.parquet`` + ``meta.json``, one row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vocab = scaled_vocab(cfg.scale)
    names = field_names(len(vocab))
    for f in (*cfg.teacher.bias, *(i for a, b, _ in cfg.teacher.pairs for i in (a, b))):
        if not 0 <= f < len(vocab):
            raise SystemExit(f"teacher field index {f} outside 0..{len(vocab) - 1}")
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [("label", pa.float32())]
        + [(d, pa.float32()) for d in dense_names()]
        + [(c, pa.int64()) for c in names]
    )
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    rows: dict[str, int] = {}
    positives = 0
    for split, total in (("train", cfg.train_rows), ("val", cfg.val_rows)):
        tmp = out / f"{split}.parquet.tmp"
        with pq.ParquetWriter(tmp, schema, compression="snappy") as writer:
            done = 0
            while done < total:
                n = min(cfg.row_group, total - done)
                ids = np.stack([zipf_ids(v, n, cfg.exponent, rng) for v in vocab], axis=1)
                dense = np.log1p(rng.exponential(3.0, size=(n, NUM_DENSE))).astype(np.float32)
                dense_c = dense - dense.mean(axis=0, keepdims=True)
                logit = teacher_logit(ids, dense_c, cfg.teacher, cfg.seed)
                labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
                positives += int(labels.sum())
                cols = [pa.array(labels)] + [pa.array(dense[:, j]) for j in range(NUM_DENSE)]
                cols += [pa.array(ids[:, j]) for j in range(len(vocab))]
                writer.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=n)
                done += n
        tmp.replace(out / f"{split}.parquet")
        rows[split] = total
    meta = {
        "fields": names,
        "vocab": vocab,
        "num_dense": NUM_DENSE,
        "rows": rows,
        "positive_rate": positives / max(1, sum(rows.values())),
        "generate_seconds": round(time.perf_counter() - start, 2),
        "config": asdict(cfg),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


# ----------------------------------------------------------------------------- streaming
class ParquetStream:
    """This rank's share of each global batch, read from Parquet row group by row group.

    Every rank reads the same record batches of ``batch_size * world_size`` rows (so the
    global batch plan is identical everywhere) and keeps its contiguous slice; a short tail
    is dropped. pyarrow holds at most the row group being decoded; the peak of its memory
    pool is reported as the pipeline's buffer.
    """

    def __init__(self, path: Path, fields: list[str], batch_size: int, rank: int, world: int) -> None:
        self.path, self.fields, self.batch_size, self.rank, self.world = path, fields, batch_size, rank, world
        self.rows = 0
        self.passes = 0

    def __iter__(self) -> Iterator[Any]:
        import pyarrow.parquet as pq
        import torch
        from torchrec.datasets.utils import Batch

        from torchrec_dimgrow.data.split import make_kjt

        global_size = self.batch_size * self.world
        lo = self.rank * self.batch_size
        while True:
            pf = pq.ParquetFile(self.path, memory_map=False)
            for rb in pf.iter_batches(batch_size=global_size, use_threads=False):
                if rb.num_rows < global_size:
                    continue
                part = rb.slice(lo, self.batch_size)
                ids = np.stack([part.column(f).to_numpy() for f in self.fields], axis=1)
                dense = np.stack([part.column(d).to_numpy() for d in dense_names()], axis=1)
                labels = part.column("label").to_numpy()
                self.rows += part.num_rows
                yield Batch(
                    dense_features=torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
                    sparse_features=make_kjt(ids, self.fields),
                    labels=torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32)),
                )
            self.passes += 1
            pf.close()


# ----------------------------------------------------------------------------- worker
@dataclass
class RunConfig:
    d_max: int = 64
    batch_size: int = 4096
    steps: int = 600
    lr: float = 1e-3
    embedding_lr: float = 0.05
    gate_lr: float = 1e-2
    alpha: float = 0.1
    check_interval: int = 1
    hidden: tuple[int, ...] = (64, 32)
    seed: int = 0
    sharding: str = "auto"


def build_model(fields: list[str], vocab: list[int], rc: RunConfig) -> tuple[Any, Any]:
    """DimGrow tables (align="project" to D_max) summed with a dense projection into WideDeep."""
    import torch
    from torch import nn
    from torchrec import EmbeddingBagConfig

    from torchrec_dimgrow.config import DimGrowConfig
    from torchrec_dimgrow.modules.backbone import WideDeep
    from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection

    class ScaleModel(nn.Module):
        """Sum of the projected fields plus a projection of the 13 dense features."""

        def __init__(self, sparse: nn.Module) -> None:
            super().__init__()
            self.sparse = sparse
            self.dense = nn.Linear(NUM_DENSE, rc.d_max)
            self.head = WideDeep(rc.d_max, rc.hidden, 0.0)

        def forward(self, dense: torch.Tensor, kjt: Any) -> torch.Tensor:
            v = self.sparse(kjt).values()
            return self.head(v.view(v.shape[0], -1, rc.d_max).sum(dim=1) + self.dense(dense))

    tables = [
        EmbeddingBagConfig(name=f, embedding_dim=rc.d_max, num_embeddings=v, feature_names=[f])
        for f, v in zip(fields, vocab)
    ]
    dg = DimGrowConfig(d_max=rc.d_max, gate_lr=rc.gate_lr, alpha=rc.alpha, check_interval=rc.check_interval)
    coll = DimGrowEmbeddingBagCollection(tables, dg, align="project", device="meta")
    return ScaleModel(coll), coll


def _allmax(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def worker(data_dir: Path, out: Path, rc: RunConfig) -> None:
    """One rank of the search (under torchrun); writes ``out/rank{r}.json``."""
    quiet_logs()
    import torch
    import torch.distributed as dist
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from torchrec_dimgrow.controller import DimGrowController
    from torchrec_dimgrow.distributed.env import init_distributed
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.distributed.runtime import shard_model
    from torchrec_dimgrow.optim import EmbeddingOptimizer
    from torchrec_dimgrow.training import bce

    torch.set_num_threads(1)
    env = init_distributed("gloo")
    meta = json.loads((data_dir / "meta.json").read_text())
    fields, vocab = list(meta["fields"]), [int(v) for v in meta["vocab"]]
    rank, world = env.rank, env.world_size
    train = ParquetStream(data_dir / "train.parquet", fields, rc.batch_size, rank, world)
    val = ParquetStream(data_dir / "val.parquet", fields, rc.batch_size, rank, world)
    train_it, val_it = iter(train), iter(val)
    pending = (next(train_it), next(val_it))  # open the readers: their buffers belong to the baseline
    rss_runtime = rss_bytes()

    torch.manual_seed(rc.seed)
    t0 = time.perf_counter()
    model, coll = build_model(fields, vocab, rc)
    sharded = shard_model(
        model,
        env.device,
        PlanningConfig(sharding=rc.sharding, batch_size=rc.batch_size),  # type: ignore[arg-type]
        EmbeddingOptimizer("adagrad", rc.embedding_lr),
    )
    dist.barrier()
    init_seconds = time.perf_counter() - t0
    rss_after_init = rss_bytes()
    dmp, store = sharded.dmp, sharded.store_for(coll)
    theta = coll.post.gate.theta
    dense_params = [p for _, p in in_backward_optimizer_filter(dmp.named_parameters()) if p is not theta]
    dense_opt = torch.optim.Adam(dense_params, lr=rc.lr)
    controller = DimGrowController({"": coll}, stores={"": store}, dense_optimizers=[dense_opt])
    torch.manual_seed(rc.seed * 1000 + rank)

    step_times: list[float] = []
    replans: list[dict[str, Any]] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, rc.steps + 1):
        batch, vbatch = pending if step == 1 else (next(train_it), next(val_it))
        t = time.perf_counter()
        dmp.train()
        dense_opt.zero_grad(set_to_none=True)
        loss = bce(dmp(batch.dense_features, batch.sparse_features), batch.labels)
        loss.backward()
        dense_opt.step()
        controller.clear_gate_grads()
        with coll.gate_step():
            vloss = bce(dmp(vbatch.dense_features, vbatch.sparse_features), vbatch.labels) + coll.penalty()
            vloss.backward()
        controller.update_gates(add_penalty=False)
        dense_opt.zero_grad(set_to_none=True)
        train_seconds = time.perf_counter() - t
        losses.append(float(loss.detach()))
        # The step's autograd graph holds the TBE buffers (the fused backward writes them):
        # drop it before a re-plan may free the old tables.
        del loss, vloss
        report = controller.end_step()
        if report is not None and report.replanned:
            r = report.reports[""]
            replans.append(
                {
                    "step": step,
                    "seconds": r.replan_seconds,
                    "capacity_changes": {k: list(v) for k, v in r.capacity_changes.items()},
                    "bytes_moved": r.bytes_moved,
                    "phases": dict(store.last_phases),
                    "in_place": list(store.last_in_place),
                    "rss_after": rss_bytes(),
                }
            )
        else:
            step_times.append(train_seconds)
    wall = time.perf_counter() - start
    step_median = statistics.median(step_times[5:] or step_times)
    # every rank waits for the slowest one at the next collective: report the max over ranks
    replan_max = _allmax([r["seconds"] for r in replans]) if replans else []
    for r, s in zip(replans, replan_max):
        r["seconds_max_rank"] = s
        r["in_steps"] = s / step_median
    result = {
        "rank": rank,
        "world_size": world,
        "rss_runtime": rss_runtime,
        "rss_after_init": rss_after_init,
        "peak_rss": hwm_bytes(),
        "init_seconds": init_seconds,
        "local_table_bytes": store.local_bytes(),
        "step_median_s": step_median,
        "steps": rc.steps,
        "wall_seconds": wall,
        "replans": replans,
        "rows_streamed_train": train.rows,
        "rows_streamed_val": val.rows,
        "train_passes": train.passes,
        "arrow_pool_peak": _arrow_peak(),
        "dims": coll.dims(),
        "capacities": coll.capacities(),
        "found_dims": coll.export_dims(),
        "loss_first_50": statistics.fmean(losses[:50]),
        "loss_last_50": statistics.fmean(losses[-50:]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()


def _arrow_peak() -> int:
    import pyarrow as pa

    return int(pa.default_memory_pool().max_memory() or 0)


# ----------------------------------------------------------------------------- estimator
def estimate_bytes(tables: list[Any], world: int, batch_size: int) -> int:
    """Total storage (all ranks) TorchRec's planner estimator gives for ``tables``.

    Tables on the meta device with fused in-backward Adagrad (its state is counted), every
    table placed table-wise: the estimator's own per-shard ``storage`` is summed.
    """
    import torch
    from torch import nn
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import ParameterConstraints, Topology
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.Adagrad, ebc.parameters(), {"lr": 0.05})
    holder = nn.Module()
    holder.add_module("ebc", ebc)
    topology = Topology(world_size=world, compute_device="cpu", ddr_cap=1 << 50, hbm_cap=1 << 50)
    constraints = {
        t.name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"]) for t in tables
    }
    enumerator = EmbeddingEnumerator(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        estimator=[EmbeddingStorageEstimator(topology=topology, constraints=constraints)],
    )
    options = enumerator.enumerate(holder, [EmbeddingBagCollectionSharder()])  # type: ignore[list-item]
    total = 0
    seen: set[str] = set()
    for opt in options:
        if opt.name in seen:
            continue
        seen.add(opt.name)
        for shard in opt.shards:
            assert shard.storage is not None
            total += int(shard.storage.ddr) + int(shard.storage.hbm)
    return total


def _tables(fields: list[str], vocab: list[int], widths: dict[str, int]) -> list[Any]:
    from torchrec import EmbeddingBagConfig

    return [
        EmbeddingBagConfig(name=f, embedding_dim=widths[f], num_embeddings=v, feature_names=[f])
        for f, v in zip(fields, vocab)
        if widths[f] > 0
    ]


def estimator_rows(
    fields: list[str], vocab: list[int], found: dict[str, int], world: int, batch: int, runtime: int
) -> list[dict[str, Any]]:
    """full-64, AutoDim-64, OptEmbed-64, uniform-16 and the found dims, from the estimator.

    ``runtime``: one rank's RSS before any table exists (Python, torch, the readers); the
    "with runtime" column adds it once per rank, which is what fitting on the machine needs.
    """
    import torch

    from torchrec_dimgrow.baselines.autodim import AutoDimConfig, AutoDimSearch
    from torchrec_dimgrow.baselines.optembed import OptEmbedConfig, OptEmbedSearch

    vmap = dict(zip(fields, vocab))
    meta = torch.device("meta")
    autodim = AutoDimSearch(AutoDimConfig(d_max=64)).build_sparse(fields, vmap, meta)
    optembed = OptEmbedSearch(OptEmbedConfig(d_max=64)).build_sparse(fields, vmap, meta)
    floor = {f: -(-found.get(f, 0) // 4) * 4 for f in fields}  # fused TBE widths: multiples of 4
    methods: list[tuple[str, list[Any]]] = [
        ("full-64 (uniform 64)", _tables(fields, vocab, dict.fromkeys(fields, 64))),
        ("AutoDim-64 (SuperNet)", list(autodim.ebc.embedding_bag_configs())),  # type: ignore[operator]
        ("OptEmbed-64 (SuperNet)", list(optembed.ebc.embedding_bag_configs())),  # type: ignore[operator]
        ("uniform-16", _tables(fields, vocab, dict.fromkeys(fields, 16))),
        ("DimGrow found dims (floor, widths rounded to 4)", _tables(fields, vocab, floor)),
    ]
    rows = []
    for name, tables in methods:
        est = estimate_bytes(tables, world, batch) if tables else 0
        need = est + world * runtime
        rows.append(
            {
                "method": name,
                "embedding_rows": sum(t.num_embeddings for t in tables),
                "sum_of_widths": sum(t.embedding_dim for t in tables),
                "estimator_GiB": round(est / GiB, 3),
                "with_runtime_GiB": round(need / GiB, 3),
                "fits_24GiB": need < 24 * GiB,
            }
        )
    return rows


# ----------------------------------------------------------------------------- parent
def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def launch(data_dir: Path, out: Path, rc: RunConfig, world: int, min_available: int, timeout: float) -> str:
    """Run the ranks under torchrun; kill them if the machine runs low on memory.

    Returns "ok", "aborted: ..." or "failed: ...". The ranks run in their own session so the
    whole group can be stopped at once without touching any other process.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
        str(Path(__file__).resolve()), "--worker", "--data", str(data_dir), "--rank-out", str(out),
        "--run-config", json.dumps(asdict(rc)),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    log = (out / "ranks.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    start, lowest = time.monotonic(), mem_available()
    status = "ok"
    while proc.poll() is None:
        avail = mem_available()
        lowest = min(lowest, avail)
        if avail < min_available:
            status = f"aborted: MemAvailable {avail / GiB:.2f} GiB < {min_available / GiB:.2f} GiB"
        elif time.monotonic() - start > timeout:
            status = f"aborted: over --timeout {timeout:.0f} s"
        if status != "ok":
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.5)
    log.close()
    if status == "ok" and proc.returncode != 0:
        status = f"failed: torchrun exit {proc.returncode} (see {out / 'ranks.log'})"
    print(f"ranks: {status}; lowest MemAvailable during the run {lowest / GiB:.2f} GiB", flush=True)
    return status


def rank_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        rp = r["replans"]
        rows.append(
            {
                "rank": r["rank"],
                "peak_rss_MiB": round(r["peak_rss"] / MiB, 1),
                "runtime_rss_MiB": round(r["rss_runtime"] / MiB, 1),
                "tables_final_MiB": round(r["local_table_bytes"] / MiB, 1),
                "init_s": round(r["init_seconds"], 2),
                "step_ms": round(r["step_median_s"] * 1e3, 1),
                "replans": len(rp),
                "replan_s": " / ".join(f"{x['seconds_max_rank']:.2f}" for x in rp),
                "replan_steps": " / ".join(f"{x['in_steps']:.1f}" for x in rp),
                "max_replan_steps": round(max((x["in_steps"] for x in rp), default=0.0), 1),
                "rows_streamed": r["rows_streamed_train"] + r["rows_streamed_val"],
                "arrow_peak_MiB": round(r["arrow_pool_peak"] / MiB, 1),
                "peak_over_floor": round(r["peak_rss"] / (r["rss_runtime"] + r["local_table_bytes"]), 3),
            }
        )
    return rows


RANK_COLS = [
    "rank", "peak_rss_MiB", "runtime_rss_MiB", "tables_final_MiB", "peak_over_floor", "init_s", "step_ms",
    "replans", "replan_s", "replan_steps", "rows_streamed", "arrow_peak_MiB",
]  # fmt: skip
EST_COLS = ["method", "embedding_rows", "sum_of_widths", "estimator_GiB", "with_runtime_GiB", "fits_24GiB"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["run", "generate"], default="run")
    p.add_argument(
        "--scale", type=float, default=None, help="divide the cardinalities (default 100; --quick 2000)"
    )
    p.add_argument("--quick", action="store_true", help="small run for the test suite")
    p.add_argument(
        "--data", type=Path, default=None, help="data dir (reused when it matches; default: a temp dir)"
    )
    p.add_argument("--out", type=Path, default=None, help="generate: where to write the Parquet files")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--train-rows", type=int, default=None)
    p.add_argument("--val-rows", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per rank")
    p.add_argument("--gate-lr", type=float, default=RunConfig.gate_lr)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument(
        "--min-available-gib", type=float, default=1.5, help="kill the ranks below this MemAvailable"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="kill the ranks after this many seconds")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rank-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-config", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def data_config(args: argparse.Namespace) -> DataConfig:
    quick = args.quick
    scale = args.scale if args.scale is not None else (2000.0 if quick else 100.0)
    train = args.train_rows if args.train_rows is not None else (60_000 if quick else 2_600_000)
    val = args.val_rows if args.val_rows is not None else (20_000 if quick else 300_000)
    return DataConfig(scale=scale, train_rows=train, val_rows=val, row_group=8192 if quick else 65_536)


def run_config(args: argparse.Namespace) -> RunConfig:
    steps = args.steps if args.steps is not None else (60 if args.quick else 300)
    batch = args.batch_size if args.batch_size is not None else (256 if args.quick else 4096)
    return RunConfig(steps=steps, batch_size=batch, gate_lr=args.gate_lr)


def prepare_data(args: argparse.Namespace, cfg: DataConfig) -> tuple[Path, dict[str, Any], bool]:
    """Reuse ``--data`` when its meta.json was written with the same config, else generate."""
    temp = args.data is None
    data_dir = Path(tempfile.mkdtemp(prefix="dimgrow-scale-")) if temp else args.data
    meta_file = data_dir / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("config") == json.loads(json.dumps(asdict(cfg))):
            print(f"reusing {data_dir}", flush=True)
            return data_dir, meta, temp
    print(f"generating {cfg.train_rows:,} + {cfg.val_rows:,} rows into {data_dir} ...", flush=True)
    return data_dir, generate(data_dir, cfg), temp


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        rc = RunConfig(**json.loads(args.run_config))
        rc.hidden = tuple(rc.hidden)
        worker(args.data, args.rank_out, rc)
        return 0
    cfg = data_config(args)
    if args.command == "generate":
        if args.out is None:
            raise SystemExit("generate needs --out DIR")
        meta = generate(args.out, cfg)
        print(json.dumps({k: meta[k] for k in ("rows", "positive_rate", "generate_seconds")}))
        return 0
    quiet_logs()
    rc = run_config(args)
    total_start = time.perf_counter()
    data_dir, meta, temp = prepare_data(args, cfg)
    rank_out = Path(tempfile.mkdtemp(prefix="dimgrow-scale-ranks-"))
    try:
        status = launch(
            data_dir, rank_out, rc, args.world_size, int(args.min_available_gib * GiB), args.timeout
        )
        results = [json.loads((rank_out / f"rank{r}.json").read_text()) for r in range(args.world_size)]
        if status != "ok" or len(results) != args.world_size:
            print((rank_out / "ranks.log").read_text()[-4000:])
            return 1
    except FileNotFoundError:
        print((rank_out / "ranks.log").read_text()[-4000:])
        return 1
    finally:
        if temp:
            shutil.rmtree(data_dir, ignore_errors=True)
    fields, vocab = list(meta["fields"]), [int(v) for v in meta["vocab"]]
    found = results[0]["found_dims"]
    runtime = max(r["rss_runtime"] for r in results)
    est = estimator_rows(fields, vocab, found, args.world_size, rc.batch_size, runtime)
    ranks = rank_rows(results)
    floor_total = est[-1]["with_runtime_GiB"] * GiB
    peak_total = sum(r["peak_rss"] for r in results)
    summary = {
        "scale": cfg.scale,
        "embedding_rows": sum(vocab),
        "train_rows": cfg.train_rows,
        "world_size": args.world_size,
        "steps": rc.steps,
        "batch_size_per_rank": rc.batch_size,
        "replans": len(results[0]["replans"]),
        "max_replan_steps": max(r["max_replan_steps"] for r in ranks),
        "peak_rss_sum_GiB": round(peak_total / GiB, 3),
        "floor_with_runtime_GiB": est[-1]["with_runtime_GiB"],
        "peak_over_floor_total": round(peak_total / floor_total, 3) if floor_total else float("nan"),
        "generate_seconds": meta.get("generate_seconds"),
        "total_seconds": round(time.perf_counter() - total_start, 1),
        "found_total_dim": sum(found.values()),
        "found_dims": found,
        "loss_first_50": results[0]["loss_first_50"],
        "loss_last_50": results[0]["loss_last_50"],
    }
    print(
        f"\nCriteo Terabyte cardinalities / {cfg.scale:g}: {sum(vocab):,} embedding rows, "
        f"{cfg.train_rows:,} train rows streamed from Parquet, {args.world_size} gloo ranks, D_max {rc.d_max}, "
        f"fused Adagrad, batch {rc.batch_size}/rank, {rc.steps} steps"
    )
    print(markdown_table(ranks, RANK_COLS))
    print()
    print(markdown_table(est, EST_COLS))
    print()
    print(json.dumps({k: v for k, v in summary.items() if k != "found_dims"}))
    stem = "scale_quick" if args.quick else "scale"
    rows = [{"kind": "rank", **r} for r in ranks] + [{"kind": "estimator", **e} for e in est]
    write_rows(rows, args.results, stem, {"argv": sys.argv, "summary": summary, "ranks": results})
    shutil.rmtree(rank_out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
