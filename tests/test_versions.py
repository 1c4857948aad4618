"""``versions.VersionPublisher``: numbered versions, an atomic LATEST, pruning, replays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from torchrec_dimgrow.versions import VersionPublisher, list_versions, read_latest, write_latest


def writer(step: int, payload: str = "x"):  # type: ignore[no-untyped-def]
    def write(staging: Path) -> None:
        staging.mkdir()
        (staging / "model.bin").write_text(payload)
        (staging / "version.json").write_text(json.dumps({"step": step}))

    return write


def test_prune_keeps_the_newest_and_never_the_one_latest_names(tmp_path: Path) -> None:
    pub = VersionPublisher(tmp_path, keep=2)
    for n in range(1, 4):
        assert pub.publish(n, 10 * n, writer(10 * n)) == (n, True)
    assert list_versions(tmp_path) == [2, 3] and read_latest(tmp_path) == "v3"
    write_latest(tmp_path, "v2")  # a reader pinned an older one: it survives the next prune
    pub.publish(4, 40, writer(40))
    assert read_latest(tmp_path) == "v4" and list_versions(tmp_path) == [3, 4]
    write_latest(tmp_path, "v3")
    assert pub.prune() == [] and list_versions(tmp_path) == [3, 4]


def test_a_replayed_step_keeps_its_version_and_a_foreign_one_is_refused(tmp_path: Path) -> None:
    pub = VersionPublisher(tmp_path, keep=3)
    pub.publish(1, 10, writer(10, "first"))
    assert pub.publish(1, 10, writer(10, "again")) == (1, False)
    assert (tmp_path / "versions" / "v1" / "model.bin").read_text() == "first"
    with pytest.raises(RuntimeError, match="another run"):
        pub.publish(1, 20, writer(20))


def test_a_failure_before_the_rename_leaves_latest_on_the_previous_version(tmp_path: Path) -> None:
    pub = VersionPublisher(tmp_path, keep=3)
    pub.publish(1, 10, writer(10))

    def boom(n: int) -> None:
        raise OSError(f"disk gone while publishing v{n}")

    pub.after_staging = boom
    with pytest.raises(OSError, match="v2"):
        pub.publish(2, 20, writer(20))
    assert read_latest(tmp_path) == "v1" and list_versions(tmp_path) == [1]
    assert not list((tmp_path / "versions").glob(".tmp-*"))
    pub.after_staging = None
    with pytest.raises(RuntimeError, match="records step 5"):
        pub.publish(2, 20, writer(5))
    assert read_latest(tmp_path) == "v1"
