"""Criteo Kaggle DAC TSV: label, I1..I13 (counts), C1..C26 (hashed strings), no header.

Integer features are bucketised the way the DCN/DeepFM/DimGrow preprocessing does it
(``floor(ln(v)^2)`` above 2), which keeps their vocab small while preserving order of
magnitude; the same columns also feed the dense tower as ``log(1 + max(v, 0))``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from torchrec_dimgrow.data.chunk import Chunk
from torchrec_dimgrow.data.columns import as_tokens, int_tokens, parse_ints, text_labels
from torchrec_dimgrow.data.csv_stream import CsvDialect, TextBatch, stream_text

INT_FIELDS = [f"I{i}" for i in range(1, 14)]
CAT_FIELDS = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label", *INT_FIELDS, *CAT_FIELDS]
_DIALECT = CsvDialect(delimiter="\t", quoting=False)


def bucketize(values: np.ndarray) -> np.ndarray:
    """Standard Criteo integer bucketing: ``v > 2 -> floor(ln(v)^2)``, else ``v`` unchanged."""
    out = np.asarray(values, dtype=np.int64).copy()
    big = out > 2
    out[big] = np.floor(np.log(out[big].astype(np.float64)) ** 2).astype(np.int64)
    return out


def dense_values(values: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Dense feature ``log(1 + max(v, 0))``; missing -> 0 (negative counts are noise)."""
    dense = np.log1p(np.maximum(values, 0).astype(np.float64)).astype(np.float32)
    dense[missing] = 0.0
    return dense


class CriteoReader:
    """Reads Criteo TSV files into 39 categorical fields plus 13 dense values."""

    fields: list[str] = INT_FIELDS + CAT_FIELDS
    num_dense: int = len(INT_FIELDS)

    def chunks(self, path: Path) -> Iterator[Chunk]:
        for block in stream_text(path, COLUMNS, dialect=_DIALECT, skip_header=False):
            yield self._convert(block, path)

    def _convert(self, block: TextBatch, path: Path) -> Chunk:
        batch, line = block.batch, block.first_line
        labels = text_labels(batch.column("label"), path, line)
        dense = np.empty((batch.num_rows, len(INT_FIELDS)), dtype=np.float32)
        tokens: list[pa.Array] = []
        for j, name in enumerate(INT_FIELDS):
            values, missing = parse_ints(batch.column(name), path, line, name)
            tokens.append(int_tokens(bucketize(values), missing))
            dense[:, j] = dense_values(values, missing)
        tokens += [as_tokens(batch.column(name)) for name in CAT_FIELDS]
        return Chunk(tokens, labels, dense)
