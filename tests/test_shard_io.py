"""Rewidthing a flat table buffer in memory (one process; the multi-rank paths are in
test_distributed.py and test_replan_memory.py)."""

from __future__ import annotations

import pytest
import torch

from torchrec_dimgrow.distributed import shard_io

needs_release = pytest.mark.skipif(
    not shard_io.can_release_pages(), reason="pages are given back on Linux only"
)


def _vm_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS")


@pytest.mark.parametrize(("old_cols", "new_cols"), [(4, 8), (8, 4), (4, 12)])
def test_rewidth_keeps_every_kept_column(
    monkeypatch: pytest.MonkeyPatch, old_cols: int, new_cols: int
) -> None:
    monkeypatch.setattr(shard_io, "CHUNK_BYTES", 4096)  # many chunks, a ragged last one
    rows = 5003
    old = torch.randn(rows * old_cols)
    expected = old.view(rows, old_cols)[:, : min(old_cols, new_cols)].clone()
    new = shard_io.rewidth_rows(old, rows, old_cols, new_cols)
    assert new.shape == (rows * new_cols,)
    assert torch.equal(new.view(rows, new_cols)[:, : min(old_cols, new_cols)], expected)


@pytest.mark.parametrize("std", [0.1, None])
def test_rewidth_fills_new_columns_as_fill_columns_would(
    monkeypatch: pytest.MonkeyPatch, std: float | None
) -> None:
    monkeypatch.setattr(shard_io, "CHUNK_BYTES", 4096)
    rows = 3001
    old = torch.randn(rows * 4)
    torch.manual_seed(7)
    later = shard_io.rewidth_rows(old.clone(), rows, 4, 12)
    shard_io.fill_columns(later.view(rows, 12), list(range(4, 12)), std)
    torch.manual_seed(7)
    fused = shard_io.rewidth_rows(old.clone(), rows, 4, 12, fill=True, std=std)
    assert torch.equal(fused, later)
    if std is None:
        assert not fused.view(rows, 12)[:, 4:].any()


def test_rewidth_rejects_a_buffer_of_another_shape() -> None:
    with pytest.raises(ValueError, match="10 x 4"):
        shard_io.rewidth_rows(torch.zeros(41), 10, 4, 8)


@needs_release
def test_rewidth_gives_the_old_pages_back_behind_the_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_io, "CHUNK_BYTES", 1 << 20)
    rows, old_cols, new_cols = 1 << 21, 4, 8  # 32 MiB -> 64 MiB
    old = torch.ones(rows * old_cols)
    before = _vm_rss()
    new = shard_io.rewidth_rows(old, rows, old_cols, new_cols)
    grown = _vm_rss() - before
    # the old buffer's pages are gone (they read back as zeros) ...
    inner = old[4096:-4096]
    assert int(torch.count_nonzero(inner)) == 0
    # ... so RSS grew by about new - old (32 MiB), not by the whole new buffer (64 MiB)
    assert grown < 40 << 20, grown
    assert bool(torch.all(new.view(rows, new_cols)[:, :old_cols] == 1))


@needs_release
def test_release_pages_leaves_bytes_outside_whole_pages_alone() -> None:
    t = torch.ones(1 << 16)  # 256 KiB
    nbytes = t.numel() * 4
    end = shard_io.release_pages(t, 100, nbytes - 100)
    zero = (t == 0).nonzero().flatten()
    assert zero.numel() > 0 and end <= nbytes - 100
    first, last = int(zero[0]) * 4, int(zero[-1]) * 4 + 4
    assert first >= 100 and last <= nbytes - 100  # partial pages at both ends untouched
    assert torch.all(t[:25] == 1) and torch.all(t[-25:] == 1)
