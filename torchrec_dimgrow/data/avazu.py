"""Avazu Kaggle CTR CSV: ``id,click,hour,C1,...,C21``.

Common splits of Avazu keep the header only in the train file, so each other file is
checked: its first line is skipped only when it equals the train header. ``hour``
(YYMMDDHH) becomes hour-of-day because the date part never repeats between train and test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from torchrec_dimgrow.data.chunk import Chunk
from torchrec_dimgrow.data.columns import as_tokens, int_tokens, parse_ints, text_labels
from torchrec_dimgrow.data.csv_stream import CsvDialect, TextBatch, header_names, read_first_line, stream_text
from torchrec_dimgrow.errors import DataError

LABEL = "click"
_DROPPED = {"id", LABEL, "hour"}
_DIALECT = CsvDialect(delimiter=",", quoting=False)


class AvazuReader:
    """Reads Avazu CSV files; the column layout comes from the train file's header."""

    num_dense: int = 0

    def __init__(self, train_path: Path) -> None:
        self.header = header_names(train_path, _DIALECT)
        for required in (LABEL, "hour"):
            if required not in self.header:
                raise DataError(f"{train_path}: missing column {required!r} in header {self.header}")
        self.fields: list[str] = ["hour"] + [c for c in self.header if c not in _DROPPED]

    def chunks(self, path: Path) -> Iterator[Chunk]:
        has_header = read_first_line(path).split(",") == self.header
        include = [LABEL, *self.fields]
        for block in stream_text(
            path, self.header, dialect=_DIALECT, skip_header=has_header, include=include
        ):
            yield self._convert(block, path)

    def _convert(self, block: TextBatch, path: Path) -> Chunk:
        batch, line = block.batch, block.first_line
        labels = text_labels(batch.column(LABEL), path, line)
        hours, missing = parse_ints(batch.column("hour"), path, line, "hour")
        tokens: list[pa.Array] = [int_tokens(hours % 100, missing)]
        tokens += [as_tokens(batch.column(name)) for name in self.fields[1:]]
        return Chunk(tokens, labels)
