"""MovieLens-100K (``u.data`` + ``u.user`` + ``u.item``) as a CTR task.

Ratings stream from ``u.data``; the small user and item tables are read once and joined
per chunk with ``pyarrow.compute.index_in``. Label is ``rating > 3`` as in the ERASE and
DimGrow code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torchrec_dimgrow.data.chunk import Chunk
from torchrec_dimgrow.data.columns import MISSING, as_tokens, first_false, parse_ints
from torchrec_dimgrow.data.csv_stream import CsvDialect, TextBatch, stream_text
from torchrec_dimgrow.data.errors import DataError

FIELDS = ["user_id", "item_id", "age", "gender", "occupation", "zip", "release_year", "first_genre"]
FILES = ("u.data", "u.user", "u.item")
_RATINGS = ["user_id", "item_id", "rating", "timestamp"]
_USERS = ["user_id", "age", "gender", "occupation", "zip"]
_GENRES = [f"genre{i}" for i in range(19)]
_ITEMS = ["item_id", "title", "release_date", "video_release_date", "url", *_GENRES]
_TAB = CsvDialect(delimiter="\t", quoting=False)
_PIPE = CsvDialect(delimiter="|", quoting=False, encoding="latin1")


def _read_small(path: Path, names: list[str], dialect: CsvDialect) -> pa.Table:
    """Read a small lookup table (streamed, then concatenated: it has ~1-4k rows)."""
    batches = [b.batch for b in stream_text(path, names, dialect=dialect, skip_header=False)]
    if not batches:
        raise DataError(f"{path}: file is empty")
    return pa.Table.from_batches(batches)


def _first_genre(items: pa.Table) -> pa.Array:
    """Index of the first set genre flag, as a token; no flag set -> missing token."""
    flags = np.stack([items.column(g).to_numpy(zero_copy_only=False) != "0" for g in _GENRES], axis=1)
    first = pa.array(flags.argmax(axis=1).astype(np.int64))
    return pc.if_else(pa.array(~flags.any(axis=1)), pa.scalar(MISSING), pc.cast(first, pa.string()))


def _release_year(dates: pa.ChunkedArray) -> pa.Array:
    """Year of ``dd-Mon-yyyy``; an empty or odd date -> missing token."""
    years = pc.extract_regex(dates.combine_chunks(), r"(?P<year>\d{4})\s*$")
    return pc.fill_null(pc.struct_field(years, "year"), MISSING)


class MovieLensReader:
    """Joins ratings with user and item attributes into the 8 MovieLens fields."""

    fields: list[str] = FIELDS
    num_dense: int = 0

    def __init__(self, directory: Path) -> None:
        users = _read_small(directory / "u.user", _USERS, _PIPE)
        items = _read_small(directory / "u.item", _ITEMS, _PIPE)
        self._user_keys = users.column("user_id").combine_chunks()
        self._user_columns = [as_tokens(users.column(c)) for c in _USERS[1:]]
        self._item_keys = items.column("item_id").combine_chunks()
        self._item_columns = [_release_year(items.column("release_date")), _first_genre(items)]

    def chunks(self, path: Path) -> Iterator[Chunk]:
        for block in stream_text(path, _RATINGS, dialect=_TAB, skip_header=False):
            yield self._convert(block, path)

    def _convert(self, block: TextBatch, path: Path) -> Chunk:
        batch, line = block.batch, block.first_line
        ratings, missing = parse_ints(batch.column("rating"), path, line, "rating")
        if missing.any():
            raise DataError(f"{path}: line {line + int(np.argmax(missing))}: empty rating")
        users = self._lookup(batch.column("user_id"), self._user_keys, path, line, "u.user")
        items = self._lookup(batch.column("item_id"), self._item_keys, path, line, "u.item")
        tokens = [as_tokens(batch.column("user_id")), as_tokens(batch.column("item_id"))]
        tokens += [column.take(users) for column in self._user_columns]
        tokens += [column.take(items) for column in self._item_columns]
        return Chunk(tokens, (ratings > 3).astype(np.float32))

    @staticmethod
    def _lookup(keys: pa.Array, table_keys: pa.Array, path: Path, line: int, table: str) -> pa.Array:
        """Row of each key in a lookup table; an unknown key is an error, not a silent 0."""
        index = pc.index_in(keys, value_set=table_keys)
        bad = first_false(pc.is_valid(index))
        if bad is not None:
            raise DataError(f"{path}: line {line + bad}: id {keys[bad].as_py()!r} not found in {table}")
        return index
