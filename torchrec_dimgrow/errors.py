"""Exception types of expected failures: bad flags, bad data, bad checkpoints, diverged runs.

The CLI turns exactly these into one line on stderr and exit code 2; anything else is a
bug and keeps its traceback. Subclass :class:`DimGrowError` for any new expected failure.
"""

from __future__ import annotations


class DimGrowError(Exception):
    """Base of every expected, user-facing failure (the message is the whole story)."""


class UsageError(DimGrowError, ValueError):
    """A flag, flag combination or output directory the run cannot honour; names the flag."""


class CheckpointError(DimGrowError):
    """A checkpoint that is missing, damaged or does not match this run; names the file."""


class NonFiniteError(DimGrowError):
    """The loss or a gate became NaN/inf; names the step. The last good checkpoint is kept."""


class Interrupted(DimGrowError):
    """Ctrl-C (SIGINT) stopped the run; the message says where and how to continue.

    The CLI prints it as one line and exits 130 (128 + SIGINT, the shell's convention).
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step  # the training step reached, when a training loop was interrupted
