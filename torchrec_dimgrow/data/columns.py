"""Column-level helpers shared by the format readers (all vectorised with pyarrow).

Every field reaches the vocab as a non-null string array: one representation for ints,
strings and missing values means one counting and one encoding path for all formats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from torchrec_dimgrow.errors import DataError

MISSING = "<missing>"
"""Token of an empty/null value; it gets a vocab id like any value (if frequent enough)."""

LABEL_PATTERN = r"^\s*(?:[01](?:\.0*)?|true|false)\s*$"
"""Text labels accepted as 0/1 (case-insensitive): ``0``/``1`` with an optional all-zero
decimal part (``1.``, ``1.0``, ``1.00``) and ``true``/``false``; surrounding spaces are
ignored. Typed (Parquet) labels: integers, floats and booleans equal to 0 or 1."""


def as_tokens(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Cast to string; nulls, NaNs and empty strings become :data:`MISSING`.

    Why NaN too: a float id column (pandas writes missing ints as NaN floats) would
    otherwise give NaN its own category ``"nan"`` while a null of the same column is missing.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if pa.types.is_floating(column.type):
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    text = pc.cast(column, pa.string())
    return pc.fill_null(pc.if_else(pc.equal(text, ""), pa.scalar(MISSING), text), MISSING)


def first_false(mask: pa.Array) -> int | None:
    """Index of the first false/null entry, or ``None`` if all are true."""
    bad = np.flatnonzero(~pc.fill_null(mask, False).to_numpy(zero_copy_only=False))
    return int(bad[0]) if bad.size else None


def text_labels(column: pa.Array, path: Path, first_line: int, unit: str = "line") -> np.ndarray:
    """Parse a string label column that must hold 0/1; errors name the file line (or row)."""
    valid = pc.match_substring_regex(column, LABEL_PATTERN, ignore_case=True)
    bad = first_false(valid)
    if bad is not None:
        value = column[bad].as_py()
        raise DataError(
            f"{path}: {unit} {first_line + bad}: label must be 0 or 1, got {value!r} "
            "(accepted: 0, 1, 0.0, 1.00, true, false)"
        )
    ones = pc.match_substring_regex(column, r"^\s*(?:1(?:\.0*)?|true)\s*$", ignore_case=True)
    return ones.to_numpy(zero_copy_only=False).astype(np.float32)


def numeric_labels(column: pa.Array, path: Path, first_row: int) -> np.ndarray:
    """Parse a typed (int/float/bool) label column that must hold 0/1; errors name the row."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return text_labels(column, path, first_row, unit="row")
    try:
        values = pc.cast(column, pa.float64())
    except pa.ArrowInvalid as err:
        raise DataError(f"{path}: label column of type {column.type} is not numeric: {err}") from err
    bad = first_false(pc.is_in(values, value_set=pa.array([0.0, 1.0])))
    if bad is not None:
        raise DataError(f"{path}: row {first_row + bad}: label must be 0 or 1, got {column[bad].as_py()!r}")
    return values.to_numpy(zero_copy_only=False).astype(np.float32)


def parse_ints(column: pa.Array, path: Path, first_line: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse an integer text column where empty means missing.

    Returns ``(values, missing)``; missing entries hold 0. The plain cast is the fast path;
    only when it fails is the column scanned again to report the offending line, instead
    of pyarrow's row-less conversion error.
    """
    missing = pc.equal(column, "")
    try:
        numbers = pc.cast(pc.if_else(missing, pa.scalar("0"), column), pa.int64())
    except pa.ArrowInvalid as err:
        ok = pc.or_(missing, pc.match_substring_regex(column, r"^[-+]?\d{1,18}$"))
        bad = first_false(ok)
        where = f"line {first_line + bad}: " if bad is not None else ""
        value = f", got {column[bad].as_py()!r}" if bad is not None else f" ({err})"
        raise DataError(f"{path}: {where}column {name} must be an integer{value}") from err
    return numbers.to_numpy(), missing.to_numpy(zero_copy_only=False)


def int_tokens(values: np.ndarray, missing: np.ndarray) -> pa.Array:
    """Integer values as string tokens, missing entries as :data:`MISSING`."""
    text = pc.cast(pa.array(values, type=pa.int64()), pa.string())
    return pc.if_else(pa.array(missing), pa.scalar(MISSING), text)
