"""Online DimGrow (recipes/stream.py), one rank: publish rule, versions, LATEST, serving checks.

Every run is a real spawned process (``dist_utils.run_ranks`` with one rank), so a kill
(``os._exit``) is a real process death; each published version is loaded in a child process
that imports only torch and fbgemm_gpu.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import stream_workers as w
from tests.dist_utils import child_env, run_ranks
from torchrec_dimgrow.manifest import verify
from torchrec_dimgrow.versions import list_versions, read_latest, read_version_info, write_latest

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"publish_every": 10, "keep_versions": 3, "window_rows": 512, "log_every": 10}
FP32_ATOL = 1e-5

# Loads versions with torch + fbgemm_gpu only and scores the request stored with each.
LOADER = """
import json, sys, torch, fbgemm_gpu
res = []
for d in sys.argv[1:]:
    m = torch.jit.load(d + "/serving.pt")
    c = torch.load(d + "/check.pt")
    out = m(c["request"])
    res.append({
        "diff": (out - c["reference_logits"]).abs().max().item(),
        "scale": c["reference_logits"].abs().max().item(),
        "bound": c["logit_error_bound"], "rows": out.numel()})
bad = sorted(k for k in sys.modules if k.split(".")[0] in ("torchrec", "torchrec_dimgrow"))
print(json.dumps({"versions": res, "imported": bad}))
"""


def load_alone(*version_dirs: Path) -> list[dict[str, Any]]:
    """Each version's scores against the trainer's, from one child process (torch + fbgemm_gpu)."""
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, *map(str, version_dirs)],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["imported"] == []
    return list(got["versions"])


def expected_publish_steps(
    trajectory: list[dict[str, Any]], steps: int, every: int, settle: int
) -> list[int]:
    """The publish rule of recipes/stream.py, replayed from the dims trajectory."""
    changes = sorted({int(r["step"]) for r in trajectory if int(r["step"]) > 0})
    out: list[int] = []
    pending = False
    for s in range(1, steps + 1):
        last = max([c for c in changes if c <= s], default=-(10**9))
        pending = pending or s % every == 0
        if pending and s - last >= settle:
            out.append(s)
            pending = False
    last = max([c for c in changes if c <= steps], default=-(10**9))
    if steps > (out[-1] if out else 0) and steps - last >= settle:
        out.append(steps)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("stream") / "out"
    (result,) = run_ranks(w.stream, 1, str(out), dict(SETTINGS))
    return out, result


def test_versions_are_published_at_the_rule_s_steps_and_old_ones_pruned(
    run: tuple[Path, dict[str, Any]],
) -> None:
    out, result = run
    m = result["metrics"]
    settle = w.configs(1)[0].check_interval
    assert m["rows_consumed"] == m["steps"] * w.GLOBAL_BATCH  # one pass, in order, no epochs
    assert any(int(r["step"]) > 0 for r in result["trajectory"]), (
        "the dims never changed: no test of the rule"
    )
    assert m["replans"] >= 1, "no re-plan happened mid-stream"
    assert m["published_steps"] == expected_publish_steps(result["trajectory"], m["steps"], 10, settle)
    assert m["versions"] == len(m["published_steps"]) >= 4
    kept = list_versions(out)
    assert kept == list(range(m["versions"] - 2, m["versions"] + 1))  # keep_versions = 3
    assert read_latest(out) == f"v{m['versions']}"
    for n in kept:
        info = read_version_info(out, n)
        assert info["step"] == m["published_steps"][n - 1]
        verify(out / "versions" / f"v{n}", what="version")  # manifest: every file's hash
        window = json.loads((out / "versions" / f"v{n}" / "window.json").read_text())
        assert window["window"]["rows"] > 0 and 0.0 <= window["window"]["auc"] <= 1.0
    assert not list((out / "versions").glob(".tmp-*"))
    lines = [json.loads(x) for x in (out / "stream_metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(10, m["steps"] + 1, 10))  # run.log_every
    for x in lines:  # every field's active gates beside its dim
        assert [len(g) for g in x["gates"]] == x["dims"]
        assert all(0.0 <= v <= 1.0 for g in x["gates"] for v in g)


def test_every_version_loads_alone_and_reproduces_the_trainer_s_scores(
    run: tuple[Path, dict[str, Any]],
) -> None:
    out, _ = run
    versions = list_versions(out)
    for n, got in zip(versions, load_alone(*(out / "versions" / f"v{n}" for n in versions))):
        assert got["rows"] == w.GLOBAL_BATCH
        assert got["diff"] <= FP32_ATOL * max(1.0, got["scale"]), (n, got)


def test_int8_versions_stay_within_the_quantisation_bound(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_ranks(w.stream, 1, str(out), {**SETTINGS, "serving": "int8", "max_steps": 20})
    versions = list_versions(out)
    assert versions
    for n, got in zip(versions, load_alone(*(out / "versions" / f"v{n}" for n in versions))):
        assert got["bound"] > 0
        assert got["diff"] <= got["bound"] + FP32_ATOL * max(1.0, got["scale"]), (n, got)


def test_a_kill_mid_publish_keeps_the_previous_latest_and_resume_finishes_the_stream(
    tmp_path: Path, run: tuple[Path, dict[str, Any]]
) -> None:
    out = tmp_path / "out"
    settings = {**SETTINGS, "max_steps": 30}
    with pytest.raises(AssertionError, match="did not finish"):  # the rank died in os._exit(3)
        run_ranks(w.stream, 1, str(out), {**settings, "kill_in_publish": 2})
    assert read_latest(out) == "v1"
    assert list_versions(out) == [1]
    assert (out / "versions" / ".tmp-v2" / "serving.pt").is_file()  # staged, never renamed
    (got,) = load_alone(out / "versions" / "v1")
    assert got["diff"] <= FP32_ATOL * max(1.0, got["scale"])

    (resumed,) = run_ranks(w.stream, 1, str(out), {**settings, "resume": str(out)})
    m = resumed["metrics"]
    full = run[1]
    assert m["steps"] == 30 and m["rows_consumed"] == 30 * w.GLOBAL_BATCH
    # the same decisions and publishes as the uninterrupted run over those steps (plus, maybe,
    # the end-of-stream version at step 30 that the longer run has no reason to write)
    prefix = [p for p in full["metrics"]["published_steps"] if p <= 30]
    assert m["published_steps"] in (prefix, [*prefix, 30])
    assert resumed["trajectory"] == [r for r in full["trajectory"] if int(r["step"]) <= 30]
    assert read_latest(out) == f"v{m['versions']}"
    assert not list((out / "versions").glob(".tmp-*"))
    for got in load_alone(*(out / "versions" / f"v{n}" for n in list_versions(out))):
        assert got["diff"] <= FP32_ATOL * 10


def test_serve_latest_switches_versions_without_restart(
    run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = run
    old, new = list_versions(out)[-2:]
    write_latest(out, f"v{old}")
    try:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "examples" / "serve_latest.py"),
                str(out),
                "--poll",
                "0.2",
                "--loads",
                "2",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["event"] == "loaded" and first["version"] == f"v{old}"
        time.sleep(0.5)
        write_latest(out, f"v{new}")
        second = json.loads(proc.stdout.readline())
        assert proc.wait(timeout=120) == 0
    finally:
        write_latest(out, f"v{new}")
    assert second["version"] == f"v{new}" and second["step"] is not None
    import torch

    check = torch.load(out / "versions" / f"v{new}" / "check.pt")
    served = torch.tensor(second["logits"][0])
    assert (served - check["reference_logits"]).abs().max().item() <= FP32_ATOL * 10
