"""Append-only ``.npy`` writer for arrays whose row count is unknown up front.

Streaming a raw file gives rows chunk by chunk and the final count only at the end. Writing
a header with reserved space first and patching the shape at close lets every chunk go
straight to disk once, without a counting pass over the raw file or a copy afterwards.
The result is a plain ``.npy`` file that ``np.load(..., mmap_mode="r")`` opens.
"""

from __future__ import annotations

import struct
from pathlib import Path
from types import TracebackType

import numpy as np

_MAGIC = b"\x93NUMPY\x01\x00"
_HEADER_BYTES = 128  # magic + length + dict; 64-byte aligned so the data stays aligned for mmap


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version-1.0 ``.npy`` header padded to exactly ``_HEADER_BYTES`` bytes."""
    text = f"{{'descr': {dtype.str!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    body_len = _HEADER_BYTES - len(_MAGIC) - 2
    if len(text) + 1 > body_len:
        raise ValueError(f"npy header too long for shape {shape}")
    body = text.ljust(body_len - 1) + "\n"
    return _MAGIC + struct.pack("<H", body_len) + body.encode("latin1")


class NpyAppender:
    """Write rows of a fixed trailing shape to ``path``; the row count is fixed at ``close``."""

    def __init__(self, path: Path, dtype: np.dtype | type, row_shape: tuple[int, ...] = ()) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = row_shape
        self.rows = 0
        self._file = open(path, "wb")
        self._file.write(_header(self.dtype, (0, *row_shape)))

    def append(self, rows: np.ndarray) -> None:
        """Write ``rows`` (shape ``(n, *row_shape)``) after the rows written so far."""
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: row shape {rows.shape[1:]} != {self.row_shape}")
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        self._file.write(data.reshape(-1).view(np.uint8).data)
        self.rows += data.shape[0]

    def close(self) -> None:
        """Patch the header with the final row count and close the file."""
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(_header(self.dtype, (self.rows, *self.row_shape)))
        self._file.close()

    def __enter__(self) -> NpyAppender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
