"""The benchmark plumbing: peak-RSS probe, ratio table, trajectory carry-forward, outputs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import memory  # noqa: E402
import plot  # noqa: E402


@pytest.mark.skipif(not _common.peak_supported(), reason="needs /proc/self/clear_refs")
def test_peak_rss_probe_sees_a_transient_allocation() -> None:
    baseline = _common.reset_peak()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
    del block
    _common.release_free_memory()
    peak = _common.hwm_bytes() - baseline
    assert peak >= 60 << 20
    assert _common.rss_bytes() - baseline < 32 << 20  # gone again: only the peak remembers it


def _row(method: str, d: int, peak: int, params: int) -> dict:
    return {
        "method": method,
        "d_max": d,
        "peak_rss_delta_bytes": peak,
        "embedding_param_bytes": params,
        "optimizer_state_bytes": params,
    }


def test_ratios_compare_dimgrow_with_each_method_per_d_max() -> None:
    rows = [
        _row("dimgrow", 16, 100, 10),
        _row("autodim", 16, 400, 40),
        _row("floor", 16, 50, 5),
        _row("autodim", 32, 1, 1),
    ]
    out = memory.ratios(rows)
    assert [(r["D_max"], r["ratio"]) for r in out] == [(16, "DimGrow/autodim"), (16, "DimGrow/floor")]
    assert out[0]["peak RSS delta"] == 0.25 and out[0]["tables + opt state"] == 0.25
    assert out[1]["peak RSS delta"] == 2.0


def test_write_rows_and_markdown(tmp_path: Path) -> None:
    rows = [{"a": 1, "b": 0.5, "dims": {"x": 1}}, {"a": 2, "b": float("nan")}]
    _common.write_rows(rows, tmp_path, "t", {"command": "cmd"})
    with (tmp_path / "t.csv").open() as fh:
        assert next(iter(csv.DictReader(fh))) == {"a": "1", "b": "0.5"}  # nested values only in JSON
    payload = json.loads((tmp_path / "t.json").read_text())
    assert payload["meta"]["command"] == "cmd" and payload["rows"][0]["dims"] == {"x": 1}
    table = _common.markdown_table(rows, ["a", "b"], digits=2)
    assert table.splitlines()[2] == "| 1 | 0.50 |" and "nan" in table
    assert _common.pm([1.0, 3.0], 1) == "2.0 ± 1.4"


def test_trajectory_totals_carry_each_field_forward(tmp_path: Path) -> None:
    path = tmp_path / "trajectory.csv"
    rows = [
        (0, "a", 1, 4), (0, "b", 1, 4),
        (5, "a", 2, 4),
        (9, "b", 5, 8), (9, "a", 1, 4),
    ]  # fmt: skip
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "field", "logical_dim", "capacity", "min_gate", "max_gate"])
        for step, f, d, c in rows:
            w.writerow([step, f, d, c, 0.5, 0.6])
    steps, per_field, total_dim, total_cap = plot.trajectory_series(plot.read_trajectory(path))
    assert steps == [0, 5, 9]
    assert per_field == {"a": [1, 2, 1], "b": [1, 1, 5]}
    assert total_dim == [2, 3, 6] and total_cap == [8, 8, 12]
    png = plot.plot_trajectory(path, tmp_path / "traj.png")
    assert png.stat().st_size > 1000


def test_memory_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [
        _row(m, d, d * k << 20, d * k << 18) for m, k in (("dimgrow", 1), ("autodim", 8)) for d in (16, 32)
    ]
    png = plot.plot_memory(rows, tmp_path / "mem.png")
    assert png.stat().st_size > 1000
