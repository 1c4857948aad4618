"""Split.batches: the multi-rank contract (same batch count, disjoint non-empty slices)."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch

from torchrec_dimgrow.data import DataError, Split


def make_split(rows: int, num_fields: int = 3, num_dense: int = 0) -> Split:
    """Synthetic split whose first id column is the row number, so batches reveal their rows."""
    ids = np.stack([np.arange(rows) + 1000 * f for f in range(num_fields)], axis=1).astype(np.int64)
    labels = (np.arange(rows) % 2).astype(np.float32)
    dense = np.arange(rows * num_dense, dtype=np.float32).reshape(rows, num_dense) if num_dense else None
    return Split(ids, labels, dense, fields=[f"F{f}" for f in range(num_fields)])


def rows_of(split: Split, **kwargs: Any) -> list[list[int]]:
    """Row numbers of each batch a rank yields."""
    return [b.sparse_features["F0"].values().tolist() for b in split.batches(**kwargs)]


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_partition_each_global_batch(drop_last: bool) -> None:
    for rows, batch_size, world in itertools.product([2, 3, 5, 7, 9, 10, 16, 17], [1, 2, 3], [1, 2, 3]):
        if rows < world and not drop_last:
            continue
        split = make_split(rows)
        expected = split.num_batches(batch_size, world, drop_last)
        per_rank = [
            rows_of(split, batch_size=batch_size, rank=r, world_size=world, drop_last=drop_last)
            for r in range(world)
        ]
        case = (rows, batch_size, world, drop_last)
        assert all(len(batches) == expected for batches in per_rank), case
        for k in range(expected):
            slices = [per_rank[r][k] for r in range(world)]
            sizes = [len(s) for s in slices]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, case
            merged = [row for s in slices for row in s]
            assert merged == sorted(merged) and len(set(merged)) == len(merged), case
        seen = sorted(row for batches in per_rank for batch in batches for row in batch)
        if drop_last:
            assert seen == list(range(expected * batch_size * world)), case
        else:
            assert seen == list(range(rows)), case


def test_tiny_tail_is_merged_into_previous_global_batch() -> None:
    split = make_split(9)  # global batch 4: 4 + 4 + 1 -> the lone row joins the second batch
    assert split.num_batches(2, world_size=2) == 2
    assert rows_of(split, batch_size=2, rank=0, world_size=2) == [[0, 1], [4, 5, 6]]
    assert rows_of(split, batch_size=2, rank=1, world_size=2) == [[2, 3], [7, 8]]
    assert split.num_batches(2, world_size=2, drop_last=True) == 2
    assert rows_of(split, batch_size=2, rank=1, world_size=2, drop_last=True) == [[2, 3], [6, 7]]


def test_fewer_rows_than_ranks_is_an_error() -> None:
    split = make_split(2)
    with pytest.raises(DataError, match="world_size=3"):
        split.num_batches(4, world_size=3)
    with pytest.raises(DataError):
        next(iter(split.batches(4, rank=0, world_size=3)))
    assert split.num_batches(4, world_size=3, drop_last=True) == 0


def test_bad_arguments_raise() -> None:
    split = make_split(8)
    for kwargs in [dict(rank=2, world_size=2), dict(start_batch=-1), dict(world_size=0)]:
        with pytest.raises(DataError):
            split.batches(2, **kwargs)
    with pytest.raises(DataError):
        split.num_batches(0)


def test_shuffle_is_deterministic_per_seed_and_epoch() -> None:
    split = make_split(64)

    def order(seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
        return [
            r
            for b in rows_of(
                split, batch_size=8, shuffle=True, seed=seed, epoch=epoch, rank=rank, world_size=world
            )
            for r in b
        ]

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(64))
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != list(range(64))
    # Two ranks: same permutation, each its own part of every global batch.
    two = [rows_of(split, batch_size=4, shuffle=True, seed=3, epoch=2, rank=r, world_size=2) for r in (0, 1)]
    assert [r for k in range(len(two[0])) for r in two[0][k] + two[1][k]] == order(3, 2)


def test_start_batch_resumes_mid_epoch() -> None:
    split = make_split(30)
    kwargs: dict[str, Any] = dict(batch_size=4, shuffle=True, seed=5, epoch=1, rank=1, world_size=2)
    full = rows_of(split, **kwargs)
    assert rows_of(split, start_batch=2, **kwargs) == full[2:]
    assert rows_of(split, start_batch=len(full) + 3, **kwargs) == []


def test_batch_tensors_follow_torchrec_conventions() -> None:
    split = make_split(10, num_fields=3, num_dense=2)
    batch = next(iter(split.batches(4)))
    kjt = batch.sparse_features
    assert kjt.keys() == ["F0", "F1", "F2"]
    assert kjt.values().dtype == torch.int64
    assert kjt.lengths().tolist() == [1] * 12
    assert kjt.values().tolist() == [0, 1, 2, 3, 1000, 1001, 1002, 1003, 2000, 2001, 2002, 2003]
    assert kjt.stride() == 4
    assert batch.labels.dtype == torch.float32 and batch.labels.tolist() == [0, 1, 0, 1]
    assert batch.dense_features.dtype == torch.float32 and batch.dense_features.shape == (4, 2)
    no_dense = next(iter(make_split(10).batches(4)))
    assert no_dense.dense_features.shape == (4, 0)


class _Recording(np.ndarray):
    """An ndarray that logs the row indices it is read at."""

    log: list[np.ndarray]

    def __getitem__(self, key: Any) -> Any:
        rows = np.arange(self.shape[0])[key if not isinstance(key, tuple) else key[0]]
        self.log.append(np.atleast_1d(rows))
        return np.asarray(self).__getitem__(key)


@pytest.mark.parametrize("shuffle", [False, True])
def test_each_rank_reads_only_its_own_rows(shuffle: bool) -> None:
    base = make_split(40, num_dense=2)
    arrays = {}
    for name in ("ids", "labels", "dense"):
        recorded = getattr(base, name).view(_Recording)
        recorded.log = []
        arrays[name] = recorded
    split = Split(arrays["ids"], arrays["labels"], arrays["dense"], fields=base.fields)
    rank1 = rows_of(split, batch_size=4, shuffle=shuffle, rank=1, world_size=2)
    own = {row for batch in rank1 for row in batch}
    for recorded in arrays.values():
        touched = set(np.concatenate(recorded.log).tolist())
        assert touched == own
