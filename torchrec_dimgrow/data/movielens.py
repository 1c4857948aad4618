"""MovieLens-100K (``u.data`` + ``u.user`` + ``u.item``) or -1M (``ratings.dat`` +
``users.dat`` + ``movies.dat``) as a CTR task.

Ratings stream from ``u.data`` / ``ratings.dat``; the small user and item tables are read
once and joined per chunk with ``pyarrow.compute.index_in``. Label is ``rating > 3`` as in
the ERASE and DimGrow code. Both releases give the same 8 fields; in -1M, ``age`` is the
release's age group, ``release_year`` comes from the title's ``(1995)`` and ``first_genre``
is the first of the ``|``-separated genre names (the DimGrow code's ML-1M is this data).
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
from torchrec_dimgrow.errors import DataError

FIELDS = ["user_id", "item_id", "age", "gender", "occupation", "zip", "release_year", "first_genre"]
FILES = ("u.data", "u.user", "u.item")
FILES_1M = ("ratings.dat", "users.dat", "movies.dat")
#: The releases this reader knows, by their files (ratings first), newest layout last.
LAYOUTS = (FILES, FILES_1M)
_RATINGS = ["user_id", "item_id", "rating", "timestamp"]
_USERS = ["user_id", "age", "gender", "occupation", "zip"]
_GENRES = [f"genre{i}" for i in range(19)]
_ITEMS = ["item_id", "title", "release_date", "video_release_date", "url", *_GENRES]
_TAB = CsvDialect(delimiter="\t", quoting=False)
_PIPE = CsvDialect(delimiter="|", quoting=False, encoding="latin1")
# -1M separates columns with "::"; read with ":" every other column is an empty filler.
# Titles in movies.dat may hold ":", so those lines are read whole and split on "::".
_COLONS = CsvDialect(delimiter=":", quoting=False, encoding="latin1")
_WHOLE_LINE = CsvDialect(delimiter="\t", quoting=False, encoding="latin1")
_RATINGS_1M = ["user_id", "_1", "item_id", "_2", "rating", "_3", "timestamp"]
_USERS_1M = ["user_id", "_1", "gender", "_2", "age", "_3", "occupation", "_4", "zip"]


def _read_small(
    path: Path, names: list[str], dialect: CsvDialect, include: list[str] | None = None
) -> pa.Table:
    """Read a small lookup table (streamed, then concatenated: it has ~1-6k rows)."""
    batches = [b.batch for b in stream_text(path, names, dialect=dialect, skip_header=False, include=include)]
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


def _movies_1m(path: Path) -> tuple[pa.Array, list[pa.Array]]:
    """movies.dat -> item ids and their [release_year, first_genre] tokens."""
    lines = _read_small(path, ["line"], _WHOLE_LINE).column("line").combine_chunks()
    parts = pc.split_pattern(lines, "::", max_splits=2)
    bad = first_false(pc.equal(pc.list_value_length(parts), 3))
    if bad is not None:
        raise DataError(
            f"{path}: line {bad + 1}: expected MovieID::Title::Genres, got {lines[bad].as_py()!r}"
        )
    title, genres = pc.list_element(parts, 1), pc.list_element(parts, 2)
    years = pc.extract_regex(title, r"\((?P<year>\d{4})\)\s*$")
    first = pc.list_element(pc.split_pattern(genres, "|", max_splits=1), 0)
    first = pc.if_else(pc.equal(pc.utf8_trim_whitespace(first), ""), pa.scalar(MISSING), first)
    return pc.list_element(parts, 0), [pc.fill_null(pc.struct_field(years, "year"), MISSING), first]


class MovieLensReader:
    """Joins ratings with user and item attributes into the 8 MovieLens fields."""

    fields: list[str] = FIELDS
    num_dense: int = 0

    def __init__(self, ratings: Path) -> None:
        """``ratings``: the release's ratings file as the layout resolved it (its name says
        which release; the lookup tables sit next to it)."""
        directory = ratings.parent
        self._release_1m = ratings.name == FILES_1M[0]
        self._users_file, self._items_file = (FILES_1M if self._release_1m else FILES)[1:]
        if self._release_1m:
            users = _read_small(directory / "users.dat", _USERS_1M, _COLONS, include=_USERS)
            self._item_keys, self._item_columns = _movies_1m(directory / "movies.dat")
        else:
            users = _read_small(directory / "u.user", _USERS, _PIPE)
            items = _read_small(directory / "u.item", _ITEMS, _PIPE)
            self._item_keys = items.column("item_id").combine_chunks()
            self._item_columns = [_release_year(items.column("release_date")), _first_genre(items)]
        self._user_keys = users.column("user_id").combine_chunks()
        self._user_columns = [as_tokens(users.column(c)) for c in _USERS[1:]]

    def chunks(self, path: Path) -> Iterator[Chunk]:
        if self._release_1m:
            blocks = stream_text(path, _RATINGS_1M, dialect=_COLONS, skip_header=False, include=_RATINGS[:3])
        else:
            blocks = stream_text(path, _RATINGS, dialect=_TAB, skip_header=False)
        for block in blocks:
            yield self._convert(block, path)

    def _convert(self, block: TextBatch, path: Path) -> Chunk:
        batch, line = block.batch, block.first_line
        ratings, missing = parse_ints(batch.column("rating"), path, line, "rating")
        if missing.any():
            raise DataError(f"{path}: line {line + int(np.argmax(missing))}: empty rating")
        users = self._lookup(batch.column("user_id"), self._user_keys, path, line, self._users_file)
        items = self._lookup(batch.column("item_id"), self._item_keys, path, line, self._items_file)
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
