"""Streaming CSV/TSV reading with file/line-aware errors.

pyarrow reads a file in blocks (``open_csv``), never whole. Its own errors lack the file
name; this wrapper turns them into :class:`DataError` that names the file and, for rows
with a wrong column count, the 1-based line (pyarrow reports it when single-threaded).

Compressed files are read as they stream: pyarrow picks the codec from the extension
(``.gz``, ``.bz2``, ``.zst``, ``.lz4``, ``.br``). A compressed file whose name does not
say so is refused by name instead of failing later as undecodable text.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from torchrec_dimgrow.errors import DataError

BLOCK_SIZE = 8 << 20
"""Bytes per pyarrow read block (module-level so tests can force many small blocks)."""


@dataclass(frozen=True)
class CsvDialect:
    """How one text file is laid out."""

    delimiter: str = ","
    quoting: bool = True
    encoding: str = "utf8"


@dataclass(frozen=True)
class TextBatch:
    """A block of rows with every column as strings, plus its first row's file line."""

    batch: pa.RecordBatch
    first_line: int


CODEC_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4", ".br")
"""Extensions pyarrow decompresses on the fly (``compression="detect"``)."""
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd"}
"""Leading bytes of the compressed formats a text file is most often mistaken for."""


def _first_raw_line(path: Path) -> bytes:
    """The first line of ``path`` as bytes, decompressed when its extension names a codec."""
    try:
        if path.suffix.lower() in CODEC_SUFFIXES:
            with io.BufferedReader(pa.input_stream(str(path), compression="detect")) as handle:
                return handle.readline()
        with open(path, "rb") as handle:
            first = handle.readline()
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read: {err}") from err
    kind = next((k for magic, k in COMPRESSED_MAGIC.items() if first.startswith(magic)), None)
    if kind is not None:
        raise DataError(
            f"{path}: looks {kind}-compressed but its name does not say so; name it with the "
            "codec's extension (.gz, .bz2, .zst) or decompress it"
        )
    return first


def read_first_line(path: Path, encoding: str = "utf8") -> str:
    """The first line of ``path`` without its newline ('' for an empty file)."""
    return _first_raw_line(path).decode(encoding, errors="replace").rstrip("\r\n")


def header_names(path: Path, dialect: CsvDialect) -> list[str]:
    """Column names from the header row, parsed exactly as pyarrow parses the data.

    Only the first line is parsed, so a bad data row further down is reported by the data
    stream with its line number rather than as an unreadable header.
    """
    first = _first_raw_line(path)
    if not first.strip():
        raise DataError(f"{path}: file is empty (no header row)")
    try:
        table = pacsv.read_csv(
            io.BytesIO(first),
            read_options=pacsv.ReadOptions(use_threads=False, encoding=dialect.encoding),
            parse_options=_parse_options(dialect, None),
        )
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: cannot parse the header line: {err}") from err
    names = list(table.column_names)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"{path}: duplicate column names in header: {duplicates}")
    return names


def _parse_options(dialect: CsvDialect, bad_rows: list[pacsv.InvalidRow] | None) -> pacsv.ParseOptions:
    def handler(row: pacsv.InvalidRow) -> str:
        if bad_rows is not None:
            bad_rows.append(row)
        return "error"

    return pacsv.ParseOptions(
        delimiter=dialect.delimiter,
        quote_char='"' if dialect.quoting else False,
        invalid_row_handler=handler,
    )


def stream_text(
    path: Path,
    names: list[str],
    *,
    dialect: CsvDialect,
    skip_header: bool,
    include: list[str] | None = None,
) -> Iterator[TextBatch]:
    """Yield blocks of ``path`` with the requested columns as strings.

    ``names`` are all columns of the file in order; ``skip_header`` drops the first line.
    Line numbers assume one row per line (true for every supported format).
    """
    bad_rows: list[pacsv.InvalidRow] = []
    wanted = include if include is not None else names
    read_options = pacsv.ReadOptions(
        use_threads=False,
        block_size=BLOCK_SIZE,
        column_names=names,
        skip_rows=1 if skip_header else 0,
        encoding=dialect.encoding,
    )
    convert_options = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in wanted},
        include_columns=wanted,
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    line = 2 if skip_header else 1
    try:
        reader = pacsv.open_csv(str(path), read_options, _parse_options(dialect, bad_rows), convert_options)
        for batch in reader:
            yield TextBatch(batch, line)
            line += batch.num_rows
    except pa.ArrowInvalid as err:
        if "Empty CSV file" in str(err):
            return  # zero rows: the caller reports the empty split with its name
        raise _as_data_error(path, err, bad_rows) from err
    except (OSError, UnicodeDecodeError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read: {err}") from err


def _as_data_error(path: Path, err: pa.ArrowInvalid, bad_rows: list[pacsv.InvalidRow]) -> DataError:
    if bad_rows:
        row = bad_rows[0]
        where = f"line {row.number}" if row.number is not None else "a row"
        return DataError(
            f"{path}: {where}: expected {row.expected_columns} columns, got {row.actual_columns}: "
            f"{row.text[:200]!r}"
        )
    return DataError(f"{path}: {err}")
