"""Drift: online DimGrow against a model whose dims were frozen after the first part of a stream.

    python benchmarks/drift.py                      # 3 phases of 20k rows, 1 rank
    python benchmarks/drift.py --rows 90000 --window 3072

A synthetic time-ordered stream (:func:`drift_stream`) in three equal phases, every field
20 ids. A ``hub`` field carries a 4-d latent vector; the label's logit is a per-id ``bias``
effect plus interactions with the hub whose weights change at the phase edges:

* ``fading``: rank-4 interaction with the hub at full strength in phase 1, fading linearly
  to zero over phase 2, absent in phase 3;
* ``rising``: absent in phase 1, rising over phase 2, at full strength in phase 3;
* ``new``: always id 0 (no information) in phases 1 and 2; switches on in phase 3 with
  random ids and a rank-2 interaction with the hub;
* ``noise``: ids independent of the label throughout.

Three learners see the stream once, in order, each batch scored before it is trained on
(progressive validation, windows of ``--window`` rows):

* **online**: ``recipes/stream.py`` (DimGrow keeps growing/shrinking, versions published);
* **frozen**: the retrain model (stock tables, concat, adapter, WideDeep) at the dims the
  online run had found at the end of phase 1 (a 1-phase stream, ``max_steps``), trained
  continually over the whole stream with the search's optimizers (Adagrad on the tables,
  Adam on the dense layers): the dims stay, the weights keep learning;
* **uniform**: the same continual training with every field at one dim, the smallest whose
  bytes are at least the online run's mean published bytes over phase 3 (so online is
  compared at no more bytes).

Reports, per window: the phase, the three progressive AUCs, the online run's logical dims per
field (its storage), the dims a version published at that window would keep (``found_*``:
gates over ``final_threshold``) and the faded field's active gates; writes
``<out>/drift.{csv,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, quiet_logs, write_rows

FIELDS = ["hub", "fading", "rising", "new", "bias", "noise"]
VOCAB = 20


def drift_stream(rows: int, signal: float, seed: int) -> Any:
    """The 3-phase stream as a ``PreparedData`` (train = the stream, in order)."""
    from torchrec_dimgrow.data.synthetic import from_arrays

    rng = np.random.default_rng(seed)
    t = np.arange(rows) / rows  # position in the stream, 0..1
    phase2 = np.clip((t - 1 / 3) * 3, 0.0, 1.0)  # 0 in phase 1, 0 -> 1 over phase 2, 1 after
    fade, rise = 1.0 - phase2, phase2
    on = (t >= 2 / 3).astype(float)
    ids = {f: rng.integers(0, VOCAB, rows) for f in FIELDS}
    ids["new"] = np.where(on > 0, ids["new"], 0)
    hub = rng.normal(size=(VOCAB, 4))

    def interaction(field: str, rank: int) -> np.ndarray:
        u = rng.normal(size=(VOCAB, rank)) / np.sqrt(rank)
        proj = rng.normal(size=(4, rank)) / 2.0
        return np.asarray(((hub[ids["hub"]] @ proj) * u[ids[field]]).sum(axis=1))

    logit = (
        signal * fade * interaction("fading", 4)
        + signal * rise * interaction("rising", 4)
        + signal * on * interaction("new", 2)
        + rng.normal(size=VOCAB)[ids["bias"]]
    )
    labels = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    matrix = np.stack([ids[f] for f in FIELDS], axis=1).astype(np.int64)
    # the val/test splits only exist because PreparedData wants them (1% each, after the stream)
    return from_arrays(FIELDS, [VOCAB] * len(FIELDS), matrix, labels, (0.98, 0.01), kind="drift")


def frozen_run(data: Any, dims: dict[str, int], tc: Any, window_batches: int) -> list[dict[str, float]]:
    """The retrain model at ``dims``, trained over the stream once, scored before each batch."""
    import torch

    from torchrec_dimgrow.recipes.retrain import build_retrain_model
    from torchrec_dimgrow.training import auc_logloss, bce

    torch.manual_seed(tc.seed)
    model = build_retrain_model(data, dims, tc)
    tables = list(model.sparse.parameters())
    ids = {id(p) for p in tables}
    dense = [p for p in model.parameters() if id(p) not in ids]
    opts = [torch.optim.Adagrad(tables, lr=tc.embedding_lr), torch.optim.Adam(dense, lr=tc.lr)]
    windows: list[dict[str, float]] = []
    scores, labels = [], []
    for step, batch in enumerate(data.train.batches(tc.batch_size, drop_last=True), start=1):
        model.eval()
        with torch.no_grad():
            scores.append(model(batch.sparse_features).float())
            labels.append(batch.labels.float())
        model.train()
        for o in opts:
            o.zero_grad(set_to_none=True)
        bce(model(batch.sparse_features), batch.labels).backward()
        for o in opts:
            o.step()
        if step % window_batches == 0:
            m = auc_logloss(torch.cat(scores), torch.cat(labels))
            windows.append({"step": step, "auc": m["auc"], "logloss": m["logloss"]})
            scores, labels = [], []
    return windows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=60_000, help="stream length (3 equal phases)")
    p.add_argument("--window", type=int, default=2048, help="rows per progressive-validation window")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--signal", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--d-max", type=int, default=8)
    p.add_argument("--gate-lr", type=float, default=0.02)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.window % args.batch_size:
        p.error("--window must be a multiple of --batch-size")
    quiet_logs()
    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.stream import STREAM_LOG, StreamConfig, StreamOptions, run_stream

    data = drift_stream(int(args.rows / 0.98) + 1, args.signal, args.seed)
    env = init_distributed("gloo")
    dg = DimGrowConfig(d_max=args.d_max, gate_lr=args.gate_lr)
    tc = TrainConfig(batch_size=args.batch_size, seed=args.seed)
    planning = PlanningConfig(batch_size=args.batch_size)
    window_batches = args.window // args.batch_size
    steps = data.train.num_batches(args.batch_size, drop_last=True)
    phase_steps = steps // 3
    stream = StreamConfig(enabled=True, window_rows=args.window, publish_every=10**9, keep_versions=1)
    with tempfile.TemporaryDirectory() as tmp:
        first = run_stream(
            data,
            dg,
            replace(tc, max_steps=phase_steps),
            planning,
            env,
            StreamOptions(Path(tmp) / "phase1", log_every=window_batches, quiet=True, stream=stream),
        )
        online_dir = Path(tmp) / "online"
        online = run_stream(
            data,
            dg,
            tc,
            planning,
            env,
            StreamOptions(online_dir, log_every=window_batches, quiet=True, stream=stream),
        )
        log_lines = [json.loads(line) for line in (online_dir / STREAM_LOG).read_text().splitlines()]
    destroy_distributed()
    frozen_dims = {f: max(0, int(first["dims"][f])) for f in FIELDS}
    if not any(frozen_dims.values()):
        frozen_dims["bias"] = 1
    frozen = frozen_run(data, frozen_dims, tc, window_batches)
    from torchrec_dimgrow.policy import final_dims

    # what a version published at each window would keep (gates over final_threshold)
    found_at = [final_dims(line["gates"], dg) for line in log_lines]
    last = [sum(f) for line, f in zip(log_lines, found_at) if line["step"] > 2 * phase_steps]
    # uniform: every field at the dim that gives at least the online run's mean phase-3 bytes
    uniform_dim = max(1, math.ceil(float(np.mean(last)) / len(FIELDS))) if last else 1
    uniform = frozen_run(data, dict.fromkeys(FIELDS, uniform_dim), tc, window_batches)
    rows: list[dict[str, Any]] = []
    for line, fz, un, found in zip(log_lines, frozen, uniform, found_at):
        assert line["step"] == fz["step"] == un["step"]
        rows.append(
            {
                "end_row": line["rows"],
                "phase": min(3, 1 + (line["step"] - 1) // phase_steps),
                "online_auc": line["window"]["auc"],
                "frozen_auc": fz["auc"],
                "uniform_auc": un["auc"],
                "online_total_dim": sum(line["dims"]),
                **{f"dim_{f}": d for f, d in zip(FIELDS, line["dims"])},
                "online_found_total": sum(found),
                "frozen_total_dim": sum(frozen_dims.values()),
                "uniform_total_dim": uniform_dim * len(FIELDS),
                **{f"found_{f}": d for f, d in zip(FIELDS, found)},
                # the faded field's active gates (slot order) at the window's end
                "fading_gates": "/".join(f"{g:.3f}" for g in line["gates"][FIELDS.index("fading")]),
                "fading_min_gate": min(line["gates"][FIELDS.index("fading")], default=float("nan")),
            }
        )
    phases: dict[int, dict[str, float]] = {}
    for ph in (1, 2, 3):
        sel = [r for r in rows if r["phase"] == ph]
        if sel:
            phases[ph] = {
                "online_auc": float(np.mean([r["online_auc"] for r in sel])),
                "frozen_auc": float(np.mean([r["frozen_auc"] for r in sel])),
                "uniform_auc": float(np.mean([r["uniform_auc"] for r in sel])),
                "online_found_total": float(np.mean([r["online_found_total"] for r in sel])),
            }
    meta = {
        "rows": args.rows,
        "window": args.window,
        "batch_size": args.batch_size,
        "signal": args.signal,
        "seed": args.seed,
        "d_max": args.d_max,
        "gate_lr": args.gate_lr,
        "frozen_dims": frozen_dims,
        "uniform_dim": uniform_dim,
        "online_final_found_dims": online["dims"],
        "online_replans": online["metrics"]["replans"],
        "phase_means": phases,
    }
    write_rows(rows, args.out, "drift", meta)
    cols = ["end_row", "phase", "online_auc", "frozen_auc", "uniform_auc", *[f"found_{f}" for f in FIELDS]]
    print(markdown_table(rows, cols))
    print(
        json.dumps(
            {
                "frozen_dims": frozen_dims,
                "uniform_dim": uniform_dim,
                "online_final_found_dims": online["dims"],
                "phases": phases,
            }
        )
    )


if __name__ == "__main__":
    main()
