"""``search --stream``: the online recipe from the command line (MovieLens sample, 1 rank)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_cli import MOVIELENS, cli
from torchrec_dimgrow.versions import list_versions, read_latest


def test_search_stream_publishes_versions_with_the_vocab(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--data", MOVIELENS, "--format", "movielens", "--out", str(out), "--quiet"]
    sets = [
        "--set",
        "stream.publish_every=5",
        "--set",
        "stream.keep_versions=2",
        "--set",
        "train.max_steps=12",
    ]
    r = cli("search", *args, "--stream", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "versions 3" in r.stdout  # steps 5, 10 and the end of the stream (12)
    assert list_versions(out) == [2, 3] and read_latest(out) == "v3"
    meta = json.loads((out / "versions" / "v3" / "serving.json").read_text())
    assert meta["step"] == 12 and meta["vocab"] == "vocab.json"
    assert json.loads((out / "metrics.json").read_text())["rows_consumed"] == 12 * 256
    # config.json records the stream section: --config OUT/config.json reruns the stream
    saved = json.loads((out / "config.json").read_text())
    assert saved["stream"]["enabled"] is True and saved["stream"]["publish_every"] == 5
    assert saved["train"]["max_steps"] == 12

    # a version is the checked export_serving artifact: an id outside its table is refused
    served = torch.jit.load(str(out / "versions" / "v3" / "serving.pt"))
    rows = meta["rows"]
    n = len(meta["input_features"])
    good = {"values": torch.zeros(n, dtype=torch.int64), "lengths": torch.ones(n, dtype=torch.int32)}
    assert served(good).shape == (1,)
    bad = dict(good, values=torch.tensor([rows[f] for f in meta["input_features"]], dtype=torch.int64))
    with pytest.raises(Exception, match=r"is outside \[0, "):
        served(bad)

    # --resume adopts the stream section (--stream need not be repeated) and refuses a contradiction
    shown = cli("search", "--resume", str(out), "--print-config")
    assert shown.returncode == 0, shown.stderr[-3000:]
    resumed = json.loads(shown.stdout)
    assert resumed["stream"] == saved["stream"] and resumed["train"]["max_steps"] == 12
    clash = cli("search", "--resume", str(out), "--set", "stream.publish_every=7", "--print-config")
    assert clash.returncode == 2 and "stream.publish_every 7 contradicts" in clash.stderr

    again = cli("search", *args, "--stream")  # a previous run's versions are not mixed with new ones
    assert again.returncode != 0 and "previous run" in again.stderr
