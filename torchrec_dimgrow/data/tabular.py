"""Generic CSV / Parquet tables: one 0/1 label column, every other kept column a field.

The field list comes from the train file, so val/test must carry the same columns (extra
ones are ignored). Values are treated as opaque categories, ints and strings alike.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from torchrec_dimgrow.data.chunk import Chunk
from torchrec_dimgrow.data.columns import as_tokens, numeric_labels, text_labels
from torchrec_dimgrow.data.csv_stream import CsvDialect, header_names, stream_text
from torchrec_dimgrow.errors import DataError

PARQUET_BATCH_ROWS = 65_536
CSV_DIALECT = CsvDialect(delimiter=",", quoting=True)


def select_fields(names: list[str], label_col: str, drop_cols: Sequence[str], path: Path) -> list[str]:
    """Field columns of a table: all but the label and ``drop_cols`` (both must exist)."""
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column name(s) {duplicates}; every column needs its own name")
    if label_col not in names:
        raise DataError(f"{path}: label column {label_col!r} not found (columns: {names})")
    unknown = [c for c in drop_cols if c not in names]
    if unknown:
        raise DataError(f"{path}: drop_cols {unknown} not found (columns: {names})")
    fields = [c for c in names if c != label_col and c not in set(drop_cols)]
    if not fields:
        raise DataError(f"{path}: no categorical columns left after removing the label and drop_cols")
    return fields


def require_columns(names: list[str], wanted: list[str], path: Path) -> None:
    """Val/test files must have every column the train file defined."""
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} present in the train file")


class CsvTableReader:
    """CSV with a header in every file."""

    num_dense: int = 0

    def __init__(self, schema_path: Path, label_col: str, drop_cols: Sequence[str]) -> None:
        self.label_col = label_col
        self.fields = select_fields(header_names(schema_path, CSV_DIALECT), label_col, drop_cols, schema_path)

    def chunks(self, path: Path) -> Iterator[Chunk]:
        names = header_names(path, CSV_DIALECT)
        wanted = [self.label_col, *self.fields]
        require_columns(names, wanted, path)
        for block in stream_text(path, names, dialect=CSV_DIALECT, skip_header=True, include=wanted):
            labels = text_labels(block.batch.column(self.label_col), path, block.first_line)
            yield Chunk([as_tokens(block.batch.column(f)) for f in self.fields], labels)


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: not a readable parquet file: {err}") from err


class ParquetReader:
    """Parquet read in record batches of ``PARQUET_BATCH_ROWS`` rows."""

    num_dense: int = 0

    def __init__(self, schema_path: Path, label_col: str, drop_cols: Sequence[str]) -> None:
        self.label_col = label_col
        names = list(_open_parquet(schema_path).schema_arrow.names)
        self.fields = select_fields(names, label_col, drop_cols, schema_path)

    def chunks(self, path: Path) -> Iterator[Chunk]:
        source = _open_parquet(path)
        wanted = [self.label_col, *self.fields]
        require_columns(list(source.schema_arrow.names), wanted, path)
        row = 1
        try:
            for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted):
                labels = numeric_labels(batch.column(self.label_col), path, row)
                yield Chunk([self._tokens(batch, f, path) for f in self.fields], labels)
                row += batch.num_rows
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{path}: cannot read: {err}") from err

    @staticmethod
    def _tokens(batch: pa.RecordBatch, name: str, path: Path) -> pa.Array:
        try:
            return as_tokens(batch.column(name))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise DataError(
                f"{path}: column {name!r} of type {batch.column(name).type} is unsupported"
            ) from err
