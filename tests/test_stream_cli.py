"""``search --stream``: the online recipe from the command line (MovieLens sample, 1 rank)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import MOVIELENS, cli
from torchrec_dimgrow.versions import list_versions, read_latest


def test_search_stream_publishes_versions_with_the_vocab(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--data", MOVIELENS, "--format", "movielens", "--out", str(out), "--quiet"]
    r = cli("search", *args, "--stream", "--publish-every", "5", "--keep-versions", "2", "--max-steps", "12")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "versions 3" in r.stdout  # steps 5, 10 and the end of the stream (12)
    assert list_versions(out) == [2, 3] and read_latest(out) == "v3"
    meta = json.loads((out / "versions" / "v3" / "serving.json").read_text())
    assert meta["step"] == 12 and meta["vocab"] == "vocab.json"
    assert json.loads((out / "metrics.json").read_text())["rows_consumed"] == 12 * 256
    again = cli("search", *args, "--stream")  # a previous run's versions are not mixed with new ones
    assert again.returncode != 0 and "previous run" in again.stderr
