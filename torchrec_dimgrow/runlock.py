"""One writer per run directory: an ``fcntl.flock`` on ``OUT/.dimgrow.lock`` held for the run.

Why flock: the kernel drops it when its process dies, however it dies (``kill -9``, OOM,
a lost node's torchrun), so there is no stale lock to clean up: the file of a killed run
stays behind and the next run simply locks it again (a finished run removes it). The
holder writes its pid into the file so that a refused run can say who holds the directory. Only rank 0 locks; the other ranks write
into the directory only under rank 0's lead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from torchrec_dimgrow.errors import DirectoryInUse

LOCK_FILE = ".dimgrow.lock"


def _holder(handle: int) -> str:
    """`` (pid N)`` from the lock file, or ``""`` when it holds no readable pid."""
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(handle, 32, 0).decode().strip()
        return f" (pid {int(text)})"
    return ""


def sibling_lock(out: Path) -> Path:
    """A lock file beside ``out``, for writers that replace ``out`` whole (the serving export)."""
    return out.with_name(f".{out.name}{LOCK_FILE}")


def acquire(out: Path, flag: str = "--out", lock_file: Path | None = None) -> tuple[int, Path]:
    """Lock ``out`` for this process; returns the open descriptor (the lock) and the file.

    ``lock_file``: default ``out/.dimgrow.lock`` (``out`` is created if missing). Raises
    :class:`DirectoryInUse` naming the directory and the holder's pid when another live
    process holds it.
    """
    path = lock_file if lock_file is not None else out / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            os.close(handle)
            raise DirectoryInUse(
                f"{flag} {out} is in use by another run{holder}; wait for it to finish or choose another {flag}"
            ) from None
        except BaseException:
            os.close(handle)
            raise
        if _same_file(handle, path):
            break
        os.close(handle)  # the holder removed the file as we opened it: lock the new one
    os.ftruncate(handle, 0)
    os.pwrite(handle, f"{os.getpid()}\n".encode(), 0)
    return handle, path


def _same_file(handle: int, path: Path) -> bool:
    """Whether ``path`` still names the file we locked (a releasing holder unlinks it)."""
    try:
        return os.stat(path).st_ino == os.fstat(handle).st_ino
    except FileNotFoundError:
        return False


def release(handle: int, path: Path) -> None:
    """Remove the lock file, then give the lock up (closing the descriptor drops the flock).

    Removing it while still holding the lock is what makes :func:`acquire`'s same-file
    check sufficient: whoever locks a removed file notices and tries again.
    """
    with contextlib.suppress(OSError):
        if _same_file(handle, path):
            path.unlink()
    os.close(handle)


@contextlib.contextmanager
def run_lock(
    out: Path, enabled: bool = True, flag: str = "--out", lock_file: Path | None = None
) -> Iterator[None]:
    """Hold ``out``'s lock for the block (``enabled=False``: a rank other than 0, no lock)."""
    if not enabled:
        yield
        return
    handle, path = acquire(out, flag, lock_file)
    try:
        yield
    finally:
        release(handle, path)
