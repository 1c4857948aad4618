"""One split of a prepared dataset and its multi-rank batch iterator.

The iterator is built around one rule: every rank derives the *same* global plan (order,
batch boundaries, batch count) from the split size and its arguments alone, then takes its
own contiguous slice of each global batch. No rank can yield more batches than another, so
collectives in the training step never deadlock, and no rank ever gets an empty batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_dimgrow.errors import DataError


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def global_batch_count(num_rows: int, global_size: int, world_size: int, drop_last: bool) -> int:
    """Number of global batches; a too-small tail (< world_size rows) is merged, not yielded."""
    full, rest = divmod(num_rows, global_size)
    if drop_last or rest == 0:
        return full
    if full == 0 or rest >= world_size:
        return full + 1
    return full


def global_batch_bounds(
    index: int, count: int, num_rows: int, global_size: int, drop_last: bool
) -> tuple[int, int]:
    """Row range ``[start, stop)`` of global batch ``index`` in the epoch order.

    Without ``drop_last`` the last batch runs to the end of the split, which both covers a
    regular partial tail and absorbs a merged tiny tail.
    """
    start = index * global_size
    stop = num_rows if (index == count - 1 and not drop_last) else start + global_size
    return start, stop


def rank_bounds(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """``np.array_split``-style slice of ``[start, stop)`` for ``rank`` (sizes differ by <= 1)."""
    base, extra = divmod(stop - start, world_size)
    lo = start + rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def epoch_order(num_rows: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray | None:
    """Row order of one epoch, identical on every rank; ``None`` means ``range(num_rows)``."""
    if not shuffle:
        return None
    return np.random.default_rng((seed, epoch)).permutation(num_rows)


def _rows(array: np.ndarray, lo: int, hi: int, order: np.ndarray | None) -> np.ndarray:
    """Read only rows ``lo:hi`` of the epoch order (memmap pages of other ranks stay untouched)."""
    if order is None:
        return np.array(array[lo:hi])
    return np.asarray(array[order[lo:hi]])


def make_kjt(ids: np.ndarray, keys: list[str]) -> KeyedJaggedTensor:
    """One id per row per field: KJT values are field-major, every length is 1."""
    values = torch.from_numpy(np.ascontiguousarray(ids.T, dtype=np.int64).reshape(-1))
    lengths = torch.ones(values.numel(), dtype=torch.int32)
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=ids.shape[0])


@dataclass
class Split:
    """Encoded rows of one split (train/val/test), usually memory-mapped from the cache.

    ``fields`` (an addition to ids/labels/dense) names the KJT keys; ``None`` gives
    ``f0, f1, ...``. :func:`load_prepared` always fills it with the real field names.
    """

    ids: np.ndarray
    labels: np.ndarray
    dense: np.ndarray | None
    fields: list[str] | None = None

    def __post_init__(self) -> None:
        if self.ids.ndim != 2:
            raise DataError(f"Split.ids must be (N, F), got shape {self.ids.shape}")
        n = self.ids.shape[0]
        if self.labels.shape != (n,):
            raise DataError(f"Split.labels must be ({n},), got shape {self.labels.shape}")
        if self.dense is not None and (self.dense.ndim != 2 or self.dense.shape[0] != n):
            raise DataError(f"Split.dense must be ({n}, D), got shape {self.dense.shape}")
        if self.fields is not None and len(self.fields) != self.ids.shape[1]:
            raise DataError(f"Split.fields has {len(self.fields)} names for {self.ids.shape[1]} columns")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def keys(self) -> list[str]:
        """KJT keys: the field names, or positional names when none were given."""
        return list(self.fields) if self.fields is not None else [f"f{i}" for i in range(self.ids.shape[1])]

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches each rank yields per epoch (the same on every rank)."""
        _check_positive("batch_size", batch_size)
        _check_positive("world_size", world_size)
        if not drop_last and len(self) < world_size:
            raise DataError(
                f"split has {len(self)} rows, fewer than world_size={world_size}: some rank would get no rows"
            )
        return global_batch_count(len(self), batch_size * world_size, world_size, drop_last)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        start_batch: int = 0,
    ) -> Iterator[Batch]:
        """Yield this rank's share of each global batch of ``batch_size * world_size`` rows.

        Validation happens eagerly (before the first ``next``) so a bad rank/world size
        fails at the call site rather than inside the training loop.
        """
        count = self.num_batches(batch_size, world_size, drop_last)
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, {world_size}), got {rank}")
        if start_batch < 0:
            raise DataError(f"start_batch must be >= 0, got {start_batch}")
        order = epoch_order(len(self), shuffle, seed, epoch)
        return self._iterate(count, batch_size * world_size, order, rank, world_size, drop_last, start_batch)

    def _iterate(
        self,
        count: int,
        global_size: int,
        order: np.ndarray | None,
        rank: int,
        world_size: int,
        drop_last: bool,
        start_batch: int,
    ) -> Iterator[Batch]:
        for index in range(start_batch, count):
            start, stop = global_batch_bounds(index, count, len(self), global_size, drop_last)
            lo, hi = rank_bounds(start, stop, rank, world_size)
            yield self.batch_at(lo, hi, order)

    def batch_at(self, lo: int, hi: int, order: np.ndarray | None = None) -> Batch:
        """Build the TorchRec ``Batch`` of positions ``lo:hi`` of ``order`` (identity if None)."""
        ids = _rows(self.ids, lo, hi, order)
        labels = torch.from_numpy(_rows(self.labels, lo, hi, order).astype(np.float32, copy=False))
        if self.dense is None:
            dense = torch.zeros((hi - lo, 0), dtype=torch.float32)
        else:
            dense = torch.from_numpy(_rows(self.dense, lo, hi, order).astype(np.float32, copy=False))
        return Batch(dense_features=dense, sparse_features=make_kjt(ids, self.keys), labels=labels)
