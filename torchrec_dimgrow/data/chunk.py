"""The unit that flows from a format reader to vocab counting and encoding."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa


@dataclass
class Chunk:
    """A block of rows in canonical form, independent of the raw format.

    ``fields`` holds one non-null string array per categorical field (missing values are
    already the missing token), so counting and encoding need no per-format logic.
    """

    fields: list[pa.Array]
    labels: np.ndarray
    dense: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, mask: np.ndarray) -> Chunk:
        """Rows where ``mask`` is true (used to keep only train rows of a randomly split file)."""
        keep = pa.array(mask)
        dense = None if self.dense is None else self.dense[mask]
        return Chunk([column.filter(keep) for column in self.fields], self.labels[mask], dense)


class FormatReader(Protocol):
    """What the pipeline needs from a format: its fields and a chunk stream per file."""

    fields: list[str]
    num_dense: int

    def chunks(self, path: Path) -> Iterator[Chunk]:
        """Stream ``path`` as canonical chunks; raise DataError on bad content."""
        ...
