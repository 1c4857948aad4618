"""PNG plots: search memory vs D_max per method, and a DimGrow run's dims trajectory.

    python benchmarks/plot.py memory benchmarks/results/memory/memory.json -o benchmarks/results/memory.png
    python benchmarks/plot.py trajectory RUN_DIR/trajectory.csv -o benchmarks/results/trajectory.png

``memory`` reads the JSON that ``benchmarks/memory.py`` writes (rows with method, d_max,
peak_rss_delta_bytes, embedding_param_bytes, optimizer_state_bytes). ``trajectory`` reads the
``trajectory.csv`` a DimGrow search writes (step, field, logical_dim, capacity, min_gate,
max_gate): the total logical dim and the total capacity over steps, plus the per-field dims.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MiB = 1 << 20
STYLE = {"dimgrow": "o-", "floor": "k--", "full": "s-", "autodim": "^-", "optembed": "v-", "sseds": "d-"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # headless: write files only
    import matplotlib.pyplot as plt

    return plt


def plot_memory(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """Two panels: measured peak RSS delta, and tables + optimizer state, both vs D_max."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [
        ("peak RSS delta of the search (MiB)", lambda r: r["peak_rss_delta_bytes"]),
        (
            "tables + table optimizer state (MiB)",
            lambda r: r["embedding_param_bytes"] + r["optimizer_state_bytes"],
        ),
    ]
    methods = sorted({r["method"] for r in rows}, key=lambda m: list(STYLE).index(m) if m in STYLE else 99)
    for ax, (label, value) in zip(axes, panels):
        for m in methods:
            pts = sorted((r["d_max"], value(r) / MiB) for r in rows if r["method"] == m)
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, STYLE.get(m, "x-"), label=m)
        ax.set_xlabel("D_max")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["d_max"] for r in rows}))
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Embedding-dimension search memory (Criteo-shaped tables)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def read_trajectory(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [
            {
                "step": int(r["step"]),
                "field": r["field"],
                "dim": int(r["logical_dim"]),
                "cap": int(r["capacity"]),
            }
            for r in csv.DictReader(fh)
        ]


def trajectory_series(
    records: Sequence[dict[str, Any]],
) -> tuple[list[int], dict[str, list[int]], list[int], list[int]]:
    """Carry each field's last known dim forward: the CSV logs a field only when it changes
    (plus periodic full snapshots), so totals need the running state."""
    steps = sorted({r["step"] for r in records})
    fields = sorted({r["field"] for r in records})
    by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_step[r["step"]].append(r)
    dim = dict.fromkeys(fields, 0)
    cap = dict.fromkeys(fields, 0)
    per_field: dict[str, list[int]] = {f: [] for f in fields}
    total_dim, total_cap = [], []
    for s in steps:
        for r in by_step[s]:
            dim[r["field"]], cap[r["field"]] = r["dim"], r["cap"]
        for f in fields:
            per_field[f].append(dim[f])
        total_dim.append(sum(dim.values()))
        total_cap.append(sum(cap.values()))
    return steps, per_field, total_dim, total_cap


def plot_trajectory(path: Path, out: Path, top: int = 8) -> Path:
    """Total logical dim / capacity over steps, and the ``top`` fields with the largest final dims."""
    plt = _pyplot()
    steps, per_field, total_dim, total_cap = trajectory_series(read_trajectory(path))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes[0].plot(steps, total_dim, label="Σ logical dim")
    axes[0].plot(steps, total_cap, label="Σ capacity (stored columns)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("columns")
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    ranked = sorted(per_field, key=lambda f: per_field[f][-1], reverse=True)[:top]
    for f in ranked:
        axes[1].step(steps, per_field[f], where="post", label=f)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("logical dim")
    axes[1].legend(fontsize=7, ncol=2)
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"DimGrow dims trajectory ({path})")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/plot.py", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["memory", "trajectory"])
    p.add_argument("input", type=Path, help="memory.json or trajectory.csv")
    p.add_argument("-o", "--out", type=Path, required=True, help="PNG path")
    args = p.parse_args(argv)
    if args.kind == "memory":
        payload = json.loads(args.input.read_text())
        out = plot_memory(payload["rows"] if isinstance(payload, dict) else payload, args.out)
    else:
        out = plot_trajectory(args.input, args.out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
