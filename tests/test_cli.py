"""End-to-end command-line runs on the real samples in ../shared/data (1 and 2 ranks)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import dcp_tensors, same_tensors
from torchrec_dimgrow.manifest import read_manifest, share_of

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CRITEO = str(DATA / "criteo" / "criteo_head8k")
MOVIELENS = str(DATA / "movielens-100k")
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2"]
ENV = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def cli(*args: str, ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    launcher = TORCHRUN if ranks == 2 else [PY]
    return subprocess.run(
        [*launcher, "-m", "torchrec_dimgrow", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_single_process_search_and_retrain_on_movielens(tmp_path: Path) -> None:
    out = tmp_path / "search"
    r = cli(
        "search",
        "--data",
        MOVIELENS,
        "--format",
        "movielens",
        "--out",
        str(out),
        "--epochs",
        "1",
        "--set",
        "train.max_steps=120",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    dims = json.loads((out / "dims.json").read_text())
    assert list(dims) == [
        "user_id",
        "item_id",
        "age",
        "gender",
        "occupation",
        "zip",
        "release_year",
        "first_genre",
    ]
    assert all(isinstance(d, int) and 0 <= d <= 16 for d in dims.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 120 and metrics["world_size"] == 1 and 0.5 < metrics["val_auc"] <= 1
    rows = list(csv.DictReader((out / "trajectory.csv").open()))
    assert set(rows[0]) == {"step", "field", "logical_dim", "capacity", "min_gate", "max_gate"}
    assert {r["field"] for r in rows} == set(dims)
    assert sum(dims.values()) > 0, f"120 steps of a seeded search kept no field: {dims}"
    rt = tmp_path / "retrain"
    r = cli(
        "retrain",
        "--dims",
        str(out / "dims.json"),
        "--data",
        MOVIELENS,
        "--format",
        "movielens",
        "--out",
        str(rt),
        "--epochs",
        "1",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((rt / "metrics.json").read_text())
    assert m["embedding_params"] == sum(m["dims"][f] * n for f, n in zip(m["dims"], _vocab(out)))
    assert 0.5 < m["test_auc"] <= 1 and m["test_logloss"] > 0


def _vocab(run: Path) -> list[int]:
    meta = json.loads((run / "data" / "meta.json").read_text())
    return list(meta["vocab_sizes"])


SEARCH_2R = [
    "--data", CRITEO, "--format", "criteo", "--epochs", "2", "--batch-size", "64", "--set", "train.max_steps=60",
    "--set", "dimgrow.grow_threshold=0.5005", "--set", "run.checkpoint_every=10", "--seed", "3",
]  # fmt: skip


def ours(stderr: str) -> list[str]:
    """Lines the ranks printed, without torchrun's own failure report (log lines, traceback)."""
    lines = []
    for line in stderr.strip().splitlines():
        if re.match(r"[WEI]\d{4} ", line) or line.startswith("Traceback"):
            break
        lines.append(line)
    return lines


def test_two_rank_torchrun_search_replans_and_writes_outputs_on_rank0(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = cli("search", *SEARCH_2R, "--out", str(out), ranks=2)
    assert r.returncode == 0, r.stderr[-4000:]
    # default output: one validation line per epoch (rank 0), data warnings, no library noise
    lines = [line for line in r.stderr.splitlines() if not line.startswith("warning: column")]
    assert len(lines) == 2 and all(line.startswith(f"epoch {e}  step ") for e, line in enumerate(lines)), (
        r.stderr
    )
    assert "val_auc" in lines[0] and "replans" in lines[0]
    assert r.stdout.startswith("dims: ") and len(r.stdout.splitlines()) == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 60
    assert m["replans"] >= 1 and m["replan_seconds_total"] > 0
    # every table holds whole rows (one shard each), so re-plans keep it on its rank and
    # rewidth it there: nothing crosses ranks (PlanningConfig.keep_placement)
    assert m["replan_bytes_moved"] == 0
    assert m["peak_rank_embedding_bytes"] > 0
    caps = {row["capacity"] for row in csv.DictReader((out / "trajectory.csv").open())}
    assert "8" in caps, "a capacity change must appear in the trajectory"
    ref = json.loads((out / "dims.json").read_text())

    # a setting that contradicts the checkpoint: one line from rank 0, exit 2 on both ranks
    r = cli(
        "search",
        *SEARCH_2R,
        "--out",
        str(out),
        "--resume",
        str(out),
        "--set",
        "dimgrow.gate_lr=0.01",
        ranks=2,
    )
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr and "exitcode  : 1" not in r.stderr
    assert ours(r.stderr) == [
        "error: dimgrow.gate_lr 0.01 contradicts the checkpoint's dimgrow.gate_lr 0.001; --resume "
        "continues with the saved settings (drop the setting, or start a new run)"
    ], r.stderr
    # resume on 1 rank: DCP reshards the 2-rank checkpoint, the planner places the tables afresh;
    # the checkpoint is rewritten at once at the new world size, holding the very same tensors
    one = tmp_path / "one"
    shutil.copytree(out, one)
    r = cli("search", *SEARCH_2R, "--out", str(one), "--resume", str(one))
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.startswith("warning: resuming a 2-rank checkpoint on 1 rank(s)"), r.stderr
    assert json.loads((one / "dims.json").read_text()) == ref
    assert json.loads((one / "metrics.json").read_text())["world_size"] == 1
    resharded, original = (dcp_tensors(one / d / "dcp") for d in ("checkpoint", "checkpoint.prev"))
    assert len(resharded) > 50 and any("embedding_bags" in k for k in resharded)
    assert same_tensors(resharded, original) == []

    # 2,000 flipped bytes in the latest checkpoint: resume falls back to the previous one (end of
    # epoch 0) and reproduces the run exactly. The file is one only rank 1 hashes (each rank
    # hashes a byte-balanced share): rank 0 must still learn of it, fall back and say so.
    shard = out / "checkpoint" / share_of(read_manifest(out / "checkpoint"), 1, 2)[0]
    blob = bytearray(shard.read_bytes())
    blob[100:2100] = bytes(b ^ 0xFF for b in blob[100:2100])
    shard.write_bytes(bytes(blob))
    r = cli("search", *SEARCH_2R, "--out", str(out), "--resume", str(out), ranks=2)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"warning: {shard}: sha256 mismatch" in r.stderr and "previous checkpoint" in r.stderr
    assert json.loads((out / "dims.json").read_text()) == ref

    # both checkpoints damaged: one error naming the latest file, nothing loaded
    damaged = out / "checkpoint" / "rank1.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    prev = out / "checkpoint.prev" / "search_state.json"
    prev.write_text(prev.read_text().replace('"step"', '"stop"', 1))
    r = cli("search", *SEARCH_2R, "--out", str(out), "--resume", str(out), ranks=2)
    assert r.returncode != 0
    assert ours(r.stderr) == [
        f"error: {damaged}: {damaged.stat().st_size} bytes, the manifest says "
        f"{damaged.stat().st_size + 10} (truncated?)"
    ], r.stderr


def _rank_processes(pid: int) -> list[int]:
    """Children of torchrun ``pid`` that run torchrec_dimgrow, read from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == pid and b"torchrec_dimgrow" in cmd:
            out.append(int(stat.parent.name))
    return out


def _wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids), f"ranks {pids} survived SIGKILL"


def test_killed_search_resumes_to_the_same_dims(tmp_path: Path) -> None:
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    r = cli("search", *SEARCH_2R, "--out", str(ref), ranks=2)
    assert r.returncode == 0, r.stderr[-4000:]
    proc = subprocess.Popen(
        [*TORCHRUN, "-m", "torchrec_dimgrow", "search", *SEARCH_2R, "--out", str(killed)],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    state = killed / "checkpoint" / "search_state.json"
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(state.read_text())["state"]["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if step >= 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    ranks = _rank_processes(proc.pid)
    assert len(ranks) == 2, f"expected torchrun's two rank processes, found {ranks}"
    os.kill(ranks[1], signal.SIGKILL)  # one rank dies (an OOM kill, a lost node): not torchrun
    assert proc.wait(timeout=30) != 0, "torchrun must fail when one rank dies"
    _wait_gone(ranks)
    saved = json.loads(state.read_text())["state"]
    killed_at = saved["step"]
    assert 20 <= killed_at < 60, f"the kill must land mid-run, the checkpoint is at step {killed_at}"
    assert not (killed / "dims.json").exists()
    r = cli("search", *SEARCH_2R, "--out", str(killed), "--resume", str(killed), ranks=2)
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads((killed / "dims.json").read_text()) == json.loads((ref / "dims.json").read_text())
    assert (killed / "trajectory.csv").read_text() == (ref / "trajectory.csv").read_text()
    m_ref = json.loads((ref / "metrics.json").read_text())
    m_res = json.loads((killed / "metrics.json").read_text())
    assert m_res["history"] == m_ref["history"], "every epoch's validation metrics must match"
    assert m_res["val_auc"] == m_ref["val_auc"] and m_res["replans"] == m_ref["replans"]
    assert m_res["wall_seconds"] > saved["wall_seconds"] > 0, "wall_seconds covers the part before the kill"
    best = [json.loads((d / "checkpoint" / "search_state.json").read_text())["state"] for d in (ref, killed)]
    assert best[0]["best_gates"] == best[1]["best_gates"], "the exported gates must survive the kill"


@pytest.mark.parametrize(
    ("case", "expect"),
    [("missing", "criteo_nothere"), ("badlabel", "line 3"), ("columns", "line 2"), ("empty", "no data rows")],
)
def test_bad_input_gives_a_clear_error_and_no_output(tmp_path: Path, case: str, expect: str) -> None:
    good = "\t".join(["0", *map(str, range(1, 14)), *["a1b2c3d4"] * 26])
    prefix = tmp_path / "criteo_bad"
    rows = {
        "badlabel": [good, good, "2" + good[1:]],
        "columns": [good, "1\t2\t3"],
        "empty": [],
    }
    if case != "missing":
        for split in ("train", "val", "test"):
            lines = rows[case] if split == "train" else [good, "1" + good[1:]]
            (tmp_path / f"criteo_bad_{split}.tsv").write_text("".join(line + "\n" for line in lines))
    data = str(tmp_path / "criteo_nothere") if case == "missing" else str(prefix)
    out = tmp_path / "out"
    r = cli("search", "--data", data, "--format", "criteo", "--out", str(out), "--quiet")
    assert r.returncode == 2
    assert expect in r.stderr, r.stderr[-2000:]
    assert not out.exists(), "no partial output"


def test_search_with_budget_never_exceeds_it_and_refuses_an_impossible_one(tmp_path: Path) -> None:
    out = tmp_path / "search"
    args = [
        "--data",
        MOVIELENS,
        "--format",
        "movielens",
        "--epochs",
        "1",
        "--set",
        "train.max_steps=80",
        "--quiet",
    ]
    # a grow threshold below the initial gate: every field asks to grow at every step
    r = cli("search", *args, "--out", str(out), "--budget", "0.1", "--set", "dimgrow.grow_threshold=0.3")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    vocab = dict(zip(json.loads((out / "dims.json").read_text()), _vocab(out)))
    assert m["budget_bytes"] == int(0.1 * 16 * 4 * sum(vocab.values()))
    assert 0 < m["found_embedding_bytes"] <= m["budget_bytes"]
    per_step: dict[str, int] = {}
    for row in csv.DictReader((out / "trajectory.csv").open()):
        per_step[row["step"]] = per_step.get(row["step"], 0) + 4 * vocab[row["field"]] * int(
            row["logical_dim"]
        )
    assert max(per_step.values()) <= m["budget_bytes"]
    assert max(per_step.values()) + 4 * min(vocab.values()) > m["budget_bytes"], "the budget must bind"
    bad = tmp_path / "bad"
    r = cli("search", *args, "--out", str(bad), "--budget", "1kB")
    assert r.returncode == 2 and "bytes every field needs at dim 1" in r.stderr, r.stderr[-2000:]
    assert not bad.exists(), "no partial output"
    r = cli("search", *args, "--out", str(bad), "--budget", "12 parsecs")
    assert r.returncode == 2 and "--budget" in r.stderr and "cannot read" in r.stderr


def test_voted_search_on_two_ranks_exports_the_vote_of_its_searches(tmp_path: Path) -> None:
    from torchrec_dimgrow.policy import vote_dims

    out = tmp_path / "voted"
    args = ["--data", MOVIELENS, "--format", "movielens", "--epochs", "1", "--set", "train.max_steps=30", "--quiet",
            "--budget", "0.1", "--set", "dimgrow.grow_threshold=0.3", "--seed", "5"]  # fmt: skip
    r = cli("search", *args, "--out", str(out), "--set", "run.votes=3", ranks=2)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [out / "votes" / f"seed-{s}" for s in (5, 6, 7)]
    assert sorted((out / "votes").iterdir()) == runs
    fields = list(json.loads((out / "dims.json").read_text()))
    vocab = dict(zip(fields, _vocab(out)))
    votes = [json.loads((run / "dims.json").read_text()) for run in runs]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and [v["seed"] for v in m["votes"]] == [5, 6, 7]
    assert [v["dims"] for v in m["votes"]] == votes
    costs = [4 * vocab[f] for f in fields]
    expect = vote_dims([[v[f] for f in fields] for v in votes], costs, m["budget_bytes"])
    assert json.loads((out / "dims.json").read_text()) == dict(zip(fields, expect))
    assert 0 < m["found_embedding_bytes"] <= m["budget_bytes"] == int(0.1 * 16 * 4 * sum(vocab.values()))
    # one of the votes is a complete search; resuming it alone would break the vote
    r = cli("search", *args, "--out", str(runs[0]), "--resume", str(runs[0]))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "a voting run (run.votes > 1) cannot be resumed" in r.stderr, r.stderr[-2000:]
