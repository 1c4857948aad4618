"""Per-field vocabularies: counted on train rows only, applied to every split.

Counting merges per-chunk ``value_counts`` in Arrow, and encoding looks values up with
``pyarrow.compute.index_in``; neither loops over rows in Python. For vocabularies much
larger than a chunk (full Criteo), hashing the whole vocab per chunk would dominate, so
encoding switches to a Python dict over the chunk's *distinct* values instead.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torchrec_dimgrow.data.columns import MISSING

_COMPACT_EVERY = 16
_INDEX_IN_MAX_RATIO = 4


def _counts_table(values: pa.Array, counts: pa.Array) -> pa.Table:
    return pa.table({"value": values, "count": pc.cast(counts, pa.int64())})


def _merge(parts: list[pa.Table]) -> pa.Table:
    """Sum counts of equal values across partial tables."""
    merged = pa.concat_tables(parts).group_by("value").aggregate([("count", "sum")])
    return merged.rename_columns({"count_sum": "count"}).select(["value", "count"])


class ValueCounter:
    """Streams chunks of one split and counts every field's values."""

    def __init__(self, num_fields: int) -> None:
        self._parts: list[list[pa.Table]] = [[] for _ in range(num_fields)]
        self.rows = 0

    def add(self, fields: list[pa.Array]) -> None:
        """Count one chunk; partial tables are merged every few chunks to bound memory."""
        for parts, column in zip(self._parts, fields, strict=True):
            counted = pc.value_counts(column)
            parts.append(_counts_table(counted.field("values"), counted.field("counts")))
            if len(parts) >= _COMPACT_EVERY:
                parts[:] = [_merge(parts)]
        if fields:
            self.rows += len(fields[0])

    def vocabs(self, min_count: int) -> list[FieldVocab]:
        """Values seen at least ``min_count`` times, most frequent first (ties by value)."""
        return [self._field_vocab(parts, min_count) for parts in self._parts]

    @staticmethod
    def _field_vocab(parts: list[pa.Table], min_count: int) -> FieldVocab:
        if not parts:
            return FieldVocab(pa.array([], type=pa.string()))
        table = _merge(parts)
        rows = int(pc.sum(table.column("count")).as_py() or 0)
        missing = table.filter(pc.equal(table.column("value"), MISSING)).column("count")
        table = table.filter(pc.greater_equal(table.column("count"), min_count))
        table = table.sort_by([("count", "descending"), ("value", "ascending")])
        vocab = FieldVocab(table.column("value").combine_chunks())
        vocab.rows = rows
        vocab.kept_rows = int(pc.sum(table.column("count")).as_py() or 0)
        vocab.missing_rows = int(pc.sum(missing).as_py() or 0)
        return vocab


class FieldVocab:
    """Value -> id of one field: ids 1..n follow ``values``; anything else is 0."""

    def __init__(self, values: pa.Array) -> None:
        self.values = pc.cast(values, pa.string())
        self._lookup: dict[str, int] | None = None
        # Train rows counted, rows whose value made the vocab, rows that were null/empty.
        self.rows = self.kept_rows = self.missing_rows = 0

    def degenerate(self, name: str, min_count: int) -> str | None:
        """Why this field can carry no signal (all null, or mostly in the shared bucket 0)."""
        if self.rows and self.missing_rows == self.rows:
            return f"column {name!r} is empty/null on every train row: it carries no signal"
        if self.rows and self.kept_rows * 2 < self.rows:
            share = 100.0 * (self.rows - self.kept_rows) / self.rows
            return (
                f"column {name!r}: data.min_count {min_count} maps {share:.0f}% of train rows into the "
                "shared bucket 0 (nearly unique values: an id or timestamp column?)"
            )
        return None

    def __len__(self) -> int:
        return len(self.values)

    @property
    def size(self) -> int:
        """Embedding rows needed, including bucket 0 for rare/unseen values."""
        return len(self.values) + 1

    def mapping(self) -> dict[str, int]:
        """The value -> id dict (built lazily: only big vocabs and the JSON need it)."""
        if self._lookup is None:
            self._lookup = {value: i + 1 for i, value in enumerate(self.values.to_pylist())}
        return self._lookup

    def encode(self, column: pa.Array) -> np.ndarray:
        """Ids of ``column`` (int64); values not in the vocab map to 0."""
        if len(self.values) <= _INDEX_IN_MAX_RATIO * max(len(column), 1):
            index = pc.index_in(column, value_set=self.values)
            return pc.fill_null(index, -1).to_numpy().astype(np.int64) + 1
        encoded = column.dictionary_encode()
        lookup = self.mapping()
        distinct = encoded.dictionary.to_pylist()
        table = np.fromiter((lookup.get(v, 0) for v in distinct), dtype=np.int64, count=len(distinct))
        return table[encoded.indices.to_numpy(zero_copy_only=False)]
