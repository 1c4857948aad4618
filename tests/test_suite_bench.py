"""The drawn-suite benchmark: iso-AUC bytes, margins, references, stall flag, an end-to-end run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import child_env

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import suite  # noqa: E402

# bytes -> AUC; the 400-byte point dips below the 200-byte one (noise), the envelope holds 0.70
CURVE = [(100.0, 0.60), (400.0, 0.68), (200.0, 0.70), (800.0, 0.80)]


def test_iso_auc_bytes_inverts_the_monotone_envelope_in_log_bytes() -> None:
    assert _common.iso_auc_bytes(CURVE, 0.65) == (pytest.approx(math.sqrt(100 * 200)), "inside")
    assert _common.iso_auc_bytes(CURVE, 0.70) == (pytest.approx(200.0), "inside")
    # 0.69 sits under the dip: the envelope reaches it before 200 bytes, never between 200 and 400
    b, where = _common.iso_auc_bytes(CURVE, 0.69)
    assert where == "inside" and 100 < b < 200
    assert _common.iso_auc_bytes(CURVE, 0.75) == (pytest.approx(math.sqrt(400 * 800)), "inside")
    assert _common.iso_auc_bytes(CURVE, 0.90) == (800.0, "above")
    assert _common.iso_auc_bytes(CURVE, 0.55) == (100.0, "below")
    with pytest.raises(ValueError, match="empty"):
        _common.iso_auc_bytes([], 0.7)


def test_margin_is_the_auc_over_the_uniform_curve_at_the_mean_bytes() -> None:
    vocab = {"a": 10, "b": 15}  # dims (2, 2) -> 4 * 50 = 200 bytes; (1, 0) -> 40; (4, 4) -> 400
    runs = [{"dims": {"a": 2, "b": 2}, "aucs": [0.74, 0.76]}, {"dims": {"a": 2, "b": 2}, "aucs": [0.71]}]
    auc, n_bytes, margin = suite.margin_of(runs, vocab, CURVE)
    assert (auc, n_bytes) == (pytest.approx(0.73), 200.0)
    assert margin == pytest.approx(0.03)
    low = [{"dims": {"a": 1, "b": 0}, "aucs": [0.65]}]
    assert suite.margin_of(low, vocab, CURVE)[2] == pytest.approx(0.05)  # flat below the curve


def test_mde_gives_small_tables_more_dims_and_fits_the_bytes() -> None:
    vocab = {"small": 10, "mid": 1_000, "big": 100_000}
    for n_bytes in (500_000, 2_000_000):
        dims = _common.mde_allocation(vocab, n_bytes, d_max=16)
        assert _common.embedding_bytes(vocab, dims) <= n_bytes
        assert dims["small"] >= dims["mid"] >= dims["big"] >= 1
        assert _common.embedding_bytes(vocab, {**dims, "big": dims["big"] + 1}) > n_bytes or dims["big"] == 16
    # below the all-ones bytes (404040) the largest tables drop out first, and the bytes still fit
    dims = _common.mde_allocation(vocab, 300_000, d_max=16)
    assert dims["big"] == 0 and dims["small"] >= dims["mid"] >= 1
    assert _common.embedding_bytes(vocab, dims) <= 300_000


def test_prune_keeps_the_largest_columns_that_fit() -> None:
    vocab = {"a": 10, "b": 100, "c": 5}
    norms = {"a": [3.0, 0.1], "b": [2.0, 1.5], "c": [0.5, 0.2]}
    # by norm: a0 (40 B), b0 (400 B), b1 (400 B: 840 > 800, skipped), c0 (20 B), c1 (20 B), a1 (40 B)
    assert _common.prune_allocation(norms, vocab, 800) == {"a": 2, "b": 1, "c": 2}
    assert _common.prune_allocation(norms, vocab, 45) == {"a": 1, "b": 0, "c": 0}
    with pytest.raises(ValueError, match="column norms"):
        _common.reference_dims("prune", vocab, 100, 16)


def test_stalled_flags_chance_auc_and_a_search_that_neither_learns_nor_grows() -> None:
    def hist(aucs: list[float], dims: list[int]) -> list[dict[str, float]]:
        return [{"val_auc": a, "total_dim": d} for a, d in zip(aucs, dims)]

    assert suite.stalled(hist([0.51, 0.515], [10, 14]))  # within noise of chance
    assert suite.stalled(hist([0.70, 0.69, 0.68], [10, 10, 10]))  # stuck at its start
    assert not suite.stalled(hist([0.70, 0.69], [10, 14]))  # early peak, but it grew
    assert not suite.stalled(hist([0.60, 0.65], [10, 10]))  # learned after its first epoch
    assert not suite.stalled(hist([0.60], [10]))
    learned = hist([0.60, 0.65], [10, 10])
    assert suite.is_stall({"history": learned, "learned": False})  # the search's own verdict
    assert not suite.is_stall({"history": learned, "learned": True})
    assert not suite.is_stall({"history": learned})  # a run cached before the verdict existed


def test_an_instance_no_uniform_model_learns_is_left_out_of_the_means() -> None:
    import numpy as np

    labels = np.array([1] * 100 + [0] * 900)  # SE of AUC 0.5 here: 0.0304; the bar 0.5608
    assert suite.learnable([(100.0, 0.55), (200.0, 0.57)], labels)
    assert not suite.learnable([(100.0, 0.55), (200.0, 0.56)], labels)
    row = {"fields": 3, "noise": 0, "ctr": 0.1, "auc": 0.7, "margin": 0.01, "mde_margin": 0.0,
           "prune_margin": 0.0, "dims_spread": 1.0, "spearman": 0.5, "bytes": 100, "bytes_spread": 0,
           "iso_ratio": 2.0, "iso": "inside", "stalled": "0/3", "beats_mde": "yes", "beats_prune": "yes"}  # fmt: skip
    noise = {**row, "learnable": "no", "margin": -0.5, "stalled": "3/3", "beats_mde": "no", "iso_ratio": 0.1}
    means = suite.means_row([{**row, "learnable": "yes"}, noise, row])  # the last: an older record
    assert means["learnable"] == "2/3" and means["margin"] == pytest.approx(0.01)
    assert (means["stalled"], means["beats_mde"], means["iso_ratio"]) == ("0/6", "2/2", 2.0)
    assert suite.means_row([noise])["learnable"] == "0/1"


def test_spearman_is_undefined_on_a_constant_side() -> None:
    need = {"a": 0, "b": 1, "c": 4}
    assert suite.spearman({"a": 0, "b": 2, "c": 7}, need) == pytest.approx(1.0)
    assert suite.spearman({"a": 7, "b": 2, "c": 0}, need) == pytest.approx(-1.0)
    assert suite.spearman({"a": 1, "b": 1, "c": 1}, need) is None


def test_bench_suite_runs_end_to_end_and_resumes_from_its_cache(tmp_path: Path) -> None:
    env = child_env(PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH.parent), env.get("PYTHONPATH", "")])
    args = ["--instances", "2", "--scale", "tiny", "--search-seeds", "0", "--retrain-seeds", "0",
            "--search-epochs", "2", "--retrain-epochs", "1", "--uniform", "1,4", "--d-max", "4",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]  # fmt: skip

    def bench(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "torchrec_dimgrow", "bench", "suite", *args, *extra],
            cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    r = bench()
    assert r.returncode == 0, r.stderr[-3000:]
    header = next(line for line in r.stdout.splitlines() if line.startswith("| instance"))
    assert [c.strip() for c in header.strip("|").split("|")] == suite.COLUMNS
    rows = json.loads((tmp_path / "out" / "suite_0.json").read_text())["rows"]
    assert [x["instance"] for x in rows] == [0, 1, "mean"]
    for x in rows[:2]:
        assert x["iso"] in ("inside", "above", "below") and x["iso_ratio"] > 0
        assert x["beats_mde"] in ("yes", "no") and isinstance(x["prune_margin"], float)
        assert len(x["search_dims"][0]) == x["fields"] == len(x["need"])
        assert all(d <= 4 for d in x["search_dims"][0] + x["prune_dims"][0] + x["mde_dims"][0])
    kept = sum(x["learnable"] == "yes" for x in rows[:2])
    assert rows[2]["learnable"] == f"{kept}/2" and rows[2]["beats_prune"].endswith(f"/{kept}")
    for ext in ("csv", "md", "png"):
        assert (tmp_path / "out" / f"suite_0.{ext}").stat().st_size > 100
    cache = sorted(p.name for p in (tmp_path / "work").rglob("*.json"))
    again = bench()
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "work").rglob("*.json")) == cache
    assert json.loads((tmp_path / "out" / "suite_0.json").read_text())["rows"][:2] == rows[:2]
    # --first: a process that takes only the later instances (same cache) gives the same rows
    part = bench("--first", "1")
    assert part.returncode == 0, part.stderr[-3000:]
    later = json.loads((tmp_path / "out" / "suite_0.json").read_text())["rows"]
    assert [x["instance"] for x in later] == [1, "mean"] and later[0] == rows[1]


def test_bench_suite_rejects_an_unlabelled_variant_and_a_bad_scale(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv, message in (
        (["--set", "alpha=0.05"], "--label"),
        (["--blocks"], "--label"),
        (["--scale", "huge"], "ROWS,MAX_VOCAB"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            suite.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert suite.parse_args(["--set", "alpha=0.05", "--label", "a"]).dimgrow_set == {"alpha": 0.05}


def test_bench_suite_blocks_searches_per_block_and_counts_block_bytes(tmp_path: Path) -> None:
    from torchrec_dimgrow.data.blocks import BlockConfig, field_blocks
    from torchrec_dimgrow.data.suite import SCALES, draw_instance

    env = child_env(PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    args = ["--instances", "1", "--scale", "tiny", "--search-seeds", "0", "--retrain-seeds", "0",
            "--search-epochs", "2", "--retrain-epochs", "1", "--uniform", "1,4", "--d-max", "4",
            "--blocks", "--label", "b", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "torchrec_dimgrow", "bench", "suite", *args],
        cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads((tmp_path / "out" / "suite_0_b.json").read_text())["rows"][0]
    blocks = field_blocks(draw_instance(0, 0, SCALES["tiny"]), BlockConfig(enabled=True))
    assert blocks.split and len(row["search_dims"][0]) == len(blocks.names()) > row["fields"]
    found = dict(zip(blocks.names(), row["search_dims"][0]))
    assert row["bytes"] == _common.embedding_bytes(blocks.vocab(), found)
    assert len(row["mde_dims"][0]) == len(row["prune_dims"][0]) == row["fields"]  # references per field
    # and MDE's rule on the same blocks, at no more bytes than the block search
    mde_blocks = dict(zip(blocks.names(), row["mde_blocks_dims"][0]))
    assert len(mde_blocks) == len(blocks.names())
    assert 0 < _common.embedding_bytes(blocks.vocab(), mde_blocks) <= row["bytes"]
    assert row["beats_mde_blocks"] in ("yes", "no")


def test_bench_frontier_adds_mde_and_pruning_at_each_dimgrow_point(tmp_path: Path) -> None:
    env = child_env(PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH.parent), env.get("PYTHONPATH", "")])
    args = ["--data", "fm", "--rows", "3000", "--uniform", "1,4", "--d-max", "4", "--budgets", "0.5",
            "--methods", "dimgrow,mde,prune", "--no-unbudgeted", "--search-seeds", "0", "--retrain-seeds", "0",
            "--search-epochs", "1", "--retrain-epochs", "1", "--work", str(tmp_path / "work"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(
        [sys.executable, "-m", "torchrec_dimgrow", "bench", "frontier", *args],
        cwd=BENCH.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "out" / "frontier_fm.json").read_text())["rows"]
    assert [x["method"] for x in rows] == [
        "uniform", "uniform", "DimGrow", "MDE at DimGrow bytes", "pruned at DimGrow bytes"
    ]  # fmt: skip
    found, mde, pruned = rows[2:]
    assert pruned["bytes"] <= found["bytes"] and isinstance(pruned["margin"], float)
    # the iso-AUC ratio is the bytes the uniform curve needs for the point's AUC over its bytes
    curve = [(float(u["bytes"]), float(u["auc"])) for u in rows[:2]]
    need, where = _common.iso_auc_bytes(curve, found["auc"])
    assert found["iso"] == where and found["iso_ratio"] == pytest.approx(need / found["bytes"], rel=1e-2)
    assert mde["bytes"] <= found["bytes"] and all(0 <= int(d) <= 4 for d in mde["dims"].split())
    assert "norms" in json.loads((tmp_path / "work" / "fm-3000-d4" / "uniform4-r0.json").read_text())
