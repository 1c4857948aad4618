"""Online DimGrow on 2 real gloo ranks: same decisions as 1 rank; a killed run resumes exactly."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from tests import stream_workers as w
from tests.dist_utils import dcp_tensors, run_ranks, same_tensors
from tests.test_stream import FP32_ATOL, load_alone
from torchrec_dimgrow.versions import list_versions, read_latest

STEPS = 26
SETTINGS = {"publish_every": 8, "keep_versions": 10, "window_rows": 512, "log_every": 0, "max_steps": STEPS}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("stream2") / "out"
    results = run_ranks(w.stream, 2, str(out), dict(SETTINGS))
    assert results[0]["trajectory"] == results[1]["trajectory"]  # every rank took the same decisions
    return out, results[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_ranks_take_the_decisions_of_one_rank(
    two_ranks: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, two = two_ranks
    (one,) = run_ranks(w.stream, 1, str(tmp_path / "one"), dict(SETTINGS))
    assert two["metrics"]["replans"] >= 1, "no re-plan mid-stream"
    assert len(two["trajectory"]) > len(w.tiny_data().fields), "the dims never changed"
    assert two["trajectory"] == one["trajectory"]  # step, field, dim, capacity of every change
    assert two["metrics"]["published_steps"] == one["metrics"]["published_steps"]
    assert two["dims"] == one["dims"]
    assert two["metrics"]["rows_consumed"] == one["metrics"]["rows_consumed"] == STEPS * w.GLOBAL_BATCH
    # the same global batches, the gradients averaged over 2 ranks instead of one batch: float-close
    assert abs(two["metrics"]["window"]["auc"] - one["metrics"]["window"]["auc"]) < 2e-3
    versions = list_versions(out)
    assert read_latest(out) == f"v{versions[-1]}" and len(versions) == two["metrics"]["versions"]
    for got in load_alone(*(out / "versions" / f"v{n}" for n in versions)):
        assert got["diff"] <= FP32_ATOL * max(1.0, got["scale"]), got


def test_a_killed_two_rank_stream_resumes_where_it_stopped(
    two_ranks: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    full_out, full = two_ranks
    every = SETTINGS["publish_every"]  # also the checkpoint interval
    published = full["metrics"]["published_steps"]
    # a kill after a version was published but before the next checkpoint recorded it
    after = [p for p in published if p % every and p + 1 < STEPS]
    assert after, f"no publish between two checkpoints in {published}: the test data changed"
    crash = after[0] + 1
    out = tmp_path / "out"
    with pytest.raises(AssertionError, match="did not finish"):
        run_ranks(w.stream, 2, str(out), {**SETTINGS, "crash_at_step": crash})
    number = published.index(after[0]) + 1
    staged = out / "versions" / f"v{number}" / "serving.pt"
    before = (_sha(staged), staged.stat().st_mtime_ns)
    assert read_latest(out) == f"v{number}"

    resumed = run_ranks(w.stream, 2, str(out), {**SETTINGS, "resume": str(out)})[0]
    m = resumed["metrics"]
    assert m["rows_consumed"] == full["metrics"]["rows_consumed"] == STEPS * w.GLOBAL_BATCH
    assert resumed["trajectory"] == full["trajectory"]
    assert m["published_steps"] == published
    assert (_sha(staged), staged.stat().st_mtime_ns) == before  # kept, not published again
    assert list_versions(out) == list_versions(full_out)
    # no row trained twice or skipped: the final weights, optimizer states and gates are bit-identical
    assert (
        same_tensors(dcp_tensors(out / "checkpoint" / "dcp"), dcp_tensors(full_out / "checkpoint" / "dcp"))
        == []
    )
