"""Numbered serving versions under ``ROOT/versions`` and the ``LATEST`` file that names one.

Layout::

    ROOT/versions/v1/ v2/ ...    one complete serving export each (serving.pt, serving.json, ...)
    ROOT/versions/LATEST         one line: the name of the newest complete version ("v2")

A version is assembled in ``versions/.tmp-vK`` by the caller's ``write`` function, its
files are fsynced, and the directory is renamed to ``vK`` only when complete; ``LATEST`` is
then replaced atomically (written to ``LATEST.tmp``, fsynced, ``os.replace``, directory
fsynced). A reader therefore sees either the previous ``LATEST`` and its complete version,
or the new one and its complete version, whatever point a kill lands at. Old versions are
pruned down to ``keep`` afterwards, never the one ``LATEST`` names.

A version records the training step it was published at (``version.json``). Publishing
a step that an existing version already records (a resumed run replaying steps it had
published before it was killed) writes nothing new: the existing version is kept and
``LATEST`` is pointed at it if it is newer than what ``LATEST`` names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSIONS = "versions"
LATEST = "LATEST"
VERSION_FILE = "version.json"
_NAME = re.compile(r"^v([1-9][0-9]*)$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
    for d in sorted({p.parent for p in path.rglob("*")} | {path}):
        _fsync_dir(d)


def version_number(name: str) -> int | None:
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def read_latest(root: str | Path) -> str | None:
    """The version ``ROOT/versions/LATEST`` names (``"vK"``), or ``None`` before the first."""
    path = Path(root) / VERSIONS / LATEST
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        return None
    if version_number(name) is None:
        raise ValueError(f"{path}: names {name!r}, not a version")
    return name


def list_versions(root: str | Path) -> list[int]:
    """Numbers of the complete versions on disk, ascending (temp dirs are not versions)."""
    base = Path(root) / VERSIONS
    if not base.is_dir():
        return []
    found = [version_number(p.name) for p in base.iterdir() if p.is_dir()]
    return sorted(n for n in found if n is not None)


def read_version_info(root: str | Path, number: int) -> dict[str, Any]:
    return dict(json.loads((Path(root) / VERSIONS / f"v{number}" / VERSION_FILE).read_text()))


def write_latest(root: str | Path, name: str) -> None:
    """Point ``LATEST`` at ``name``: tmp file, fsync, ``os.replace``, fsync the directory."""
    base = Path(root) / VERSIONS
    tmp = base / (LATEST + ".tmp")
    with tmp.open("w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, base / LATEST)
    _fsync_dir(base)


def finish_version(
    staging: Path,
    number: int,
    step: int,
    info: dict[str, Any] | None = None,
    manifest_config: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    world_size: int = 1,
) -> None:
    """The last files of a staged version: ``version.json`` (its step), then the manifest.

    The manifest (:func:`~torchrec_dimgrow.manifest.write_manifest`) holds the sha256 of
    every other file, so it is written last.
    """
    from torchrec_dimgrow.manifest import write_manifest

    payload = {"version": f"v{number}", "step": step, **(info or {})}
    (staging / VERSION_FILE).write_text(json.dumps(payload, sort_keys=True) + "\n")
    config = {"kind": "serving_version", "version": f"v{number}", **(manifest_config or {})}
    write_manifest(staging, config=config, data=data or {}, world_size=world_size, step=step)


class VersionPublisher:
    """Writes ``ROOT/versions/vK`` directories and keeps ``LATEST`` pointing at a complete one.

    Single writer (rank 0). ``keep``: how many versions stay on disk (at least 1; the one
    ``LATEST`` names is never deleted). ``after_staging`` (tests): called with the version
    number once the staging directory is complete, before the rename (a kill injected there
    must leave the previous ``LATEST`` and its version intact).
    """

    def __init__(self, root: str | Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep_versions must be >= 1, got {keep}")
        self.root = Path(root)
        self.base = self.root / VERSIONS
        self.keep = keep
        self.after_staging: Callable[[int], None] | None = None

    def existing_for_step(self, step: int) -> int | None:
        """The version already published at ``step``, if any."""
        for n in list_versions(self.root):
            try:
                if int(read_version_info(self.root, n)["step"]) == step:
                    return n
            except (OSError, ValueError, KeyError):
                continue
        return None

    def publish(self, number: int, step: int, write: Callable[[Path], None]) -> tuple[int, bool]:
        """Publish version ``number`` for ``step``; return (its number, whether it was written now).

        ``write(staging_dir)`` creates the staging directory and every file of the version
        in it, ``version.json`` (with ``"step"``) and the manifest included.
        """
        again = self.existing_for_step(step)
        if again is not None:
            self._point_latest(again)
            self.prune()
            return again, False
        final = self.base / f"v{number}"
        if final.exists():
            info = read_version_info(self.root, number) if (final / VERSION_FILE).is_file() else {}
            raise RuntimeError(
                f"{final} exists and was published at step {info.get('step')}, not {step}: "
                "another run's versions are in this directory"
            )
        self.base.mkdir(parents=True, exist_ok=True)
        staging = self.base / f".tmp-v{number}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            write(staging)
            recorded = json.loads((staging / VERSION_FILE).read_text()).get("step")
            if recorded != step:
                raise RuntimeError(f"{staging / VERSION_FILE}: records step {recorded}, not {step}")
            _fsync_tree(staging)
            if self.after_staging is not None:
                self.after_staging(number)
            os.rename(staging, final)
            _fsync_dir(self.base)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._point_latest(number)
        self.prune()
        return number, True

    def _point_latest(self, number: int) -> None:
        current = read_latest(self.root)
        if current is None or (version_number(current) or 0) < number:
            write_latest(self.root, f"v{number}")

    def prune(self) -> list[int]:
        """Delete all but the newest ``keep`` versions (never the one ``LATEST`` names)."""
        latest = read_latest(self.root)
        named = version_number(latest) if latest else None
        numbers = list_versions(self.root)
        doomed = [n for n in numbers[: max(0, len(numbers) - self.keep)] if n != named]
        for n in doomed:
            shutil.rmtree(self.base / f"v{n}", ignore_errors=True)
        for p in self.base.glob(".tmp-v*"):  # a staging dir a killed publish left behind
            shutil.rmtree(p, ignore_errors=True)
        return doomed
