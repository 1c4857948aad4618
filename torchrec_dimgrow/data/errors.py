"""The one exception type of the data layer.

Callers (CLI, recipes) catch a single type to turn any bad input into a clean message
instead of a traceback, so every check in this package raises :class:`DataError`.
"""

from __future__ import annotations

from torchrec_dimgrow.errors import DimGrowError


class DataError(DimGrowError, ValueError):
    """Bad input data or arguments; the message names the file (and line/field when known)."""
