"""Every exception type of the package: bad flags, data, budgets, checkpoints, saved models, disks.

The CLI turns exactly the :class:`DimGrowError`s into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback. Subclass :class:`DimGrowError` for any new
expected failure. The ``ValueError``/``OSError`` mixins keep existing ``except`` clauses working.
"""

from __future__ import annotations


class DimGrowError(Exception):
    """Base of every expected, user-facing failure (the message is the whole story)."""


class UsageError(DimGrowError, ValueError):
    """A flag, flag combination or output directory the run cannot honour; names the flag."""


class DirectoryInUse(UsageError):
    """Another live run holds the directory; the refused run must not touch anything in it."""


class DataError(DimGrowError, ValueError):
    """Bad input data or arguments; the message names the file (and line/field when known).

    The one exception type of the data layer: every check in ``torchrec_dimgrow.data`` raises it.
    """


class BudgetError(DimGrowError, ValueError):
    """A byte budget that cannot be met (the CLI reports it as a one-line input error)."""


class CheckpointError(DimGrowError):
    """A checkpoint that is missing, damaged or does not match this run; names the file."""


class NonFiniteError(DimGrowError):
    """The loss or a gate became NaN/inf; names the step. The last good checkpoint is kept."""


class ModelError(DimGrowError, ValueError):
    """A saved model that is missing, malformed or does not match its spec (one-line message)."""


class DiskError(DimGrowError, OSError):
    """A write failed for lack of space, a file-size limit or an I/O error; names the path."""


class Interrupted(DimGrowError):
    """Ctrl-C (SIGINT) stopped the run; the message says where and how to continue.

    The CLI prints it as one line and exits 130 (128 + SIGINT, the shell's convention).
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step  # the training step reached, when a training loop was interrupted


class RankDivergenceError(RuntimeError):
    """Ranks that must agree (dims, a decision) do not: a bug, so deliberately not a
    :class:`DimGrowError`; the CLI lets it through with its traceback."""
