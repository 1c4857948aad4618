"""Writes that fail as expected failures: a full disk or a file-size limit is not a bug.

Every writer of the package (checkpoints, results, the saved model, the serving export)
runs inside :func:`disk_errors`. An ``OSError`` with ``ENOSPC``/``EFBIG``/``EDQUOT``/``EIO``,
or torch's ``RuntimeError`` for a short write (``unexpected pos ...`` from the zip writer,
which names neither disk nor file), becomes one :class:`DiskError` naming the path and
the cause, and the partial output (``checkpoint.tmp``, a staging dir) is removed first.
What was published before (the previous checkpoint, earlier results) is never touched:
writers publish by rename only after a complete write.

:func:`deferred_sigint` keeps Ctrl-C out of the few renames that publish a write, so an
interrupt lands either before them (nothing published) or after (all published).
:func:`agreed_write` runs one rank's part of a collective write and shares its outcome, so
one rank's full disk stops every rank instead of leaving the others at a barrier.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from torchrec_dimgrow.errors import CheckpointError, DiskError

DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error",
}
SHORT_WRITE_MARKERS = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")
"""Substrings of torch's zip writer's messages (``inline_container.cc``) for a write the OS
cut short; specific enough not to match a collective's socket errors."""
_LOW_SPACE = 1 << 20


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes/contexts, and the per-rank failures a DCP ``CheckpointException`` holds."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [e for e in (item.__cause__, item.__context__) if e is not None]
        failures = getattr(item, "failures", None)  # DCP: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            for failure in failures.values():
                inner = failure[0] if isinstance(failure, tuple) and failure else failure
                if isinstance(inner, BaseException):
                    todo.append(inner)


def was_interrupted(exc: BaseException) -> bool:
    """Whether a Ctrl-C is in ``exc``'s chain: DCP wraps one that lands inside its write in a
    ``CheckpointException``, which would otherwise read as a failed save."""
    return any(isinstance(item, KeyboardInterrupt) for item in _chain(exc))


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _short_write_cause(path: Path) -> str:
    """Why torch's writer came up short, judged from the filesystem and the process limits."""
    try:
        if shutil.disk_usage(_existing(path)).free < _LOW_SPACE:
            return DISK_ERRNOS[errno.ENOSPC]
    except OSError:
        pass
    if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
        return f"{DISK_ERRNOS[errno.EFBIG]} (the file-size limit, ulimit -f)"
    return "short write (disk full or a file-size limit?)"


def disk_cause(exc: BaseException, path: Path) -> str | None:
    """The cause in words if ``exc`` is a disk failure (anywhere in its chain), else ``None``."""
    for item in _chain(exc):
        if isinstance(item, DiskError):
            return str(item)
        if isinstance(item, OSError) and item.errno in DISK_ERRNOS:
            return DISK_ERRNOS[item.errno]
        if isinstance(item, RuntimeError) and any(m in str(item) for m in SHORT_WRITE_MARKERS):
            return _short_write_cause(path)
    return None


def remove(paths: Iterable[Path]) -> None:
    """Remove partial outputs (files or trees); a missing one is fine."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def disk_errors(path: str | Path, partial: Iterable[str | Path] = ()) -> Iterator[None]:
    """Turn a disk failure while writing ``path`` into one :class:`DiskError` line.

    ``partial``: what a failed (or interrupted) write leaves behind and must be removed
    (``checkpoint.tmp``, a staging dir). Other errors keep their type and traceback.
    """
    target = Path(path)
    try:
        yield
    except DiskError:
        remove(Path(p) for p in partial)
        raise
    except BaseException as exc:
        remove(Path(p) for p in partial)
        cause = disk_cause(exc, target)
        if cause is None:
            raise
        raise DiskError(f"cannot write {target}: {cause}") from exc


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done (then raise it): publishing renames run whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def note(signum: int, _frame: FrameType | None) -> None:
        pending.append(signum)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            os.kill(os.getpid(), signal.SIGINT)


def agreed_write(path: Path, step: Callable[[], None], world_size: int) -> None:
    """Run this rank's ``step`` of writing ``path``, then learn whether any rank failed.

    It is also a barrier. Why: a rank whose write fails (full disk on its node) would
    otherwise raise alone while the others wait at the next barrier until the process
    group times out. Every rank raises instead: the failing one its own error, the others
    a :class:`DiskError` (or :class:`CheckpointError` for anything else) naming that rank.
    """
    failure: BaseException | None = None
    try:
        step()
    except (Exception, CheckpointException) as exc:  # shared below, then re-raised unchanged
        failure = exc  # (DCP's CheckpointException is a BaseException)
    if world_size > 1 and dist.is_initialized():
        cause = None if failure is None else disk_cause(failure, path)
        mine = None if failure is None else (cause is not None, cause or repr(failure))
        verdicts: list[tuple[bool, str] | None] = [None] * world_size
        dist.all_gather_object(verdicts, mine)
        bad = next(((r, v) for r, v in enumerate(verdicts) if v is not None), None)
        if failure is None and bad is not None:
            rank, (disk, what) = bad
            if disk:
                raise DiskError(f"cannot write {path}: {what} (on rank {rank})")
            raise CheckpointError(f"{path} not written: rank {rank} failed ({what})")
    if failure is not None:
        raise failure
