"""Checkpoint manifests: what a checkpoint holds, and proof that it still holds it.

``manifest.json`` sits inside each checkpoint directory and records the sha256 and size
of every other file, the run's full config (the flags that decide its result), the world
size and a fingerprint of the data (input files, their sizes, the vocab's hash). Resume
verifies it *before* loading anything: a flipped byte, a truncated ``rank1.pt`` or a
missing DCP shard becomes one error naming the file instead of a silently different run
or a traceback from deep inside ``torch.load``.

Two checkpoints are kept (``checkpoint`` and ``checkpoint.prev``); when the latest fails
verification, resume falls back to the previous one and says so.

Hashing is split across ranks (:func:`file_shares` on save, :func:`share_of` on resume):
each rank hashes a byte-balanced share, so a sharded checkpoint is read once in all, not
once serially by rank 0 on save and once by every rank on resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchrec_dimgrow.errors import CheckpointError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VOCAB_FILE = "vocab.json"  # data/store.py's name (manifest stays free of the data package)
LATEST = "checkpoint"
PREVIOUS = "checkpoint.prev"
VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def data_fingerprint(source: dict[str, Any], cache_dir: Path | None) -> dict[str, Any]:
    """Input files (path, size), the vocab's sha256 and each field's vocab fingerprint
    (:func:`vocab_fingerprint`): what the run was trained on."""
    files = {
        name: {"path": info.get("path"), "size": info.get("size")}
        for name, info in source.get("files", {}).items()
    }
    vocab = cache_dir / VOCAB_FILE if cache_dir is not None else None
    return {
        "format": source.get("format"),
        "files": files,
        "vocab_sha256": sha256_file(vocab) if vocab is not None and vocab.is_file() else None,
        "vocab_fields": vocab_fingerprint(cache_dir) if cache_dir is not None else None,
    }


def vocab_fingerprint(cache_dir: Path) -> dict[str, str] | None:
    """Per field, the sha256 of its values in id order (``None`` without a ``vocab.json``).

    Why per field and over the values, not the vocab sizes nor the whole file: a column
    whose values were relabelled keeps its vocab size but gives its ids other meanings,
    and the file also records paths and mtimes, which change when the same data is
    copied elsewhere. Equal fingerprints mean every id stands for the same value.
    """
    path = cache_dir / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        vocab = json.loads(path.read_text())["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable vocab ({err})") from err
    out = {}
    for name, mapping in vocab.items():
        values = [value for value, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        out[name] = hashlib.sha256(json.dumps(values, ensure_ascii=False).encode()).hexdigest()
    return out


def vocab_difference(saved: dict[str, str], current: dict[str, str]) -> str | None:
    """The first field (in saved order) whose ids mean other values now, or ``None``."""
    for name in [*saved, *(n for n in current if n not in saved)]:
        if saved.get(name) != current.get(name):
            return name
    return None


def _balanced(sized: Sequence[tuple[int, str]], world_size: int) -> list[list[str]]:
    """Names in ``world_size`` groups of about equal bytes: largest first onto the lightest
    group (ties: lower group; equal sizes in name order), the same on every rank."""
    if world_size < 1:
        raise ValueError(f"file_shares: world_size must be >= 1, got {world_size}")
    groups: list[list[str]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for size, name in sorted(sized, key=lambda sn: (-sn[0], sn[1])):
        lightest = min(range(world_size), key=lambda r: (loads[r], r))
        groups[lightest].append(name)
        loads[lightest] += size
    return groups


def file_shares(directory: Path, world_size: int) -> list[list[Path]]:
    """The files under ``directory`` in ``world_size`` shares of about equal bytes.

    Why: one process hashing a whole sharded checkpoint reads every rank's tables serially
    while the other ranks wait; with a share each, the ranks hash in parallel. Every rank
    derives the same split from the same listing.
    """
    sized = [(p.stat().st_size, str(p.relative_to(directory))) for p in _files(directory)]
    return [[directory / name for name in group] for group in _balanced(sized, world_size)]


def hash_files(directory: Path, files: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Manifest entries (sha256 and size, keyed by path relative to ``directory``) of ``files``."""
    return {
        str(p.relative_to(directory)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files
    }


def write_manifest(
    directory: Path,
    *,
    config: dict[str, Any],
    data: dict[str, Any],
    world_size: int,
    step: int,
    entries: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write ``manifest.json`` (all ranks must have finished writing).

    ``entries``: the files' hashes, e.g. gathered from every rank's :func:`file_shares`
    share; by default this process hashes every file. They must cover every file under
    ``directory``: a file the manifest does not list would escape verification.
    """
    files = _files(directory)
    if entries is None:
        entries = hash_files(directory, files)
    missing = sorted(rel for rel in (str(p.relative_to(directory)) for p in files) if rel not in entries)
    if missing:
        raise RuntimeError(f"manifest of {directory}: no hash for {missing}")
    payload = {
        "version": VERSION,
        "step": step,
        "world_size": world_size,
        "config": config,
        "data": data,
        "files": entries,
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)


@dataclass(frozen=True)
class Verified:
    """A checkpoint directory and its manifest: every file matched it (from :func:`verify` or
    :func:`select`), or not checked yet (from :func:`peek`)."""

    path: Path
    manifest: dict[str, Any]
    fell_back: bool = False

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.manifest.get("config", {}))

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a checkpoint, or written by an older version)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("version") != VERSION or "files" not in manifest:
        raise CheckpointError(f"{path}: not a version-{VERSION} DimGrow manifest")
    return manifest


def share_of(manifest: dict[str, Any], rank: int, world_size: int) -> list[str]:
    """The listed files (relative paths) that ``rank`` of ``world_size`` hashes at resume."""
    sized = [(int(entry["bytes"]), rel) for rel, entry in manifest["files"].items()]
    return _balanced(sized, world_size)[rank]


def verify(directory: Path, share: tuple[int, int] | None = None, what: str = "checkpoint") -> Verified:
    """Check size and sha256 of every file the manifest lists; raise on the first mismatch.

    ``share`` = (rank, world size): every listed file's presence and size are checked, but
    only this rank's byte-balanced share of them is hashed, so that N ranks resuming
    together read the checkpoint once between them instead of N times (:func:`select`
    with ``agree`` combines the ranks' verdicts). ``what`` names the directory's kind in errors.
    """
    manifest = read_manifest(directory)
    files: dict[str, dict[str, Any]] = manifest["files"]
    to_hash = set(files) if share is None else set(share_of(manifest, *share))
    for rel, entry in sorted(files.items()):
        path = directory / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the {what}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {entry['bytes']} (truncated?)")
    for path in _files(directory):
        if str(path.relative_to(directory)) not in files:
            raise CheckpointError(
                f"{path}: not listed in the {what}'s {MANIFEST} (added after it was written)"
            )
    for rel in sorted(to_hash):
        if sha256_file(directory / rel) != files[rel]["sha256"]:
            raise CheckpointError(
                f"{directory / rel}: sha256 mismatch (the file changed after it was written)"
            )
    return Verified(directory, manifest)


def candidates(path: Path) -> list[Path]:
    """Checkpoint dirs to try, newest first, for a run dir or a checkpoint dir."""
    if (path / MANIFEST).is_file() or (path / "search_state.json").is_file():
        sibling = path.with_name(PREVIOUS) if path.name == LATEST else None
        return [path, *([sibling] if sibling is not None and sibling.is_dir() else [])]
    return [p for p in (path / LATEST, path / PREVIOUS) if p.is_dir()]


def select(
    path: Path,
    share: tuple[int, int] | None = None,
    agree: Callable[[str | None], list[str | None]] | None = None,
) -> Verified:
    """The newest intact checkpoint under ``path``; falls back to the previous one, loudly.

    Across ranks: ``share`` = (rank, world size) hashes only this rank's share of each
    candidate (:func:`verify`), and ``agree`` gathers every rank's verdict (its error, or
    ``None``) so that all ranks take the same checkpoint, or all stop with the same error.
    """
    options = candidates(path)
    if not options:
        raise CheckpointError(f"--resume {path}: no DimGrow checkpoint there (expected {path / LATEST})")
    first_error: CheckpointError | None = None
    for option in options:
        found: Verified | None = None
        error: str | None = None
        try:
            found = verify(option, share)
        except CheckpointError as err:
            error = str(err)
        verdicts = agree(error) if agree is not None else [error]
        failed = next((v for v in verdicts if v is not None), None)
        if failed is not None:
            first_error = first_error or CheckpointError(failed)
            continue
        assert found is not None
        if first_error is not None:
            log.warning("%s; resuming from the previous checkpoint %s instead", first_error, option)
            return Verified(found.path, found.manifest, fell_back=True)
        return found
    assert first_error is not None
    raise first_error


def peek(path: Path) -> Verified:
    """The newest checkpoint under ``path`` whose manifest reads, *not* verified yet.

    What a resume needs before its process group exists (the saved settings and world
    size); :func:`select` verifies the files afterwards, with every rank hashing a share.
    """
    options = candidates(path)
    if not options:
        raise CheckpointError(f"--resume {path}: no DimGrow checkpoint there (expected {path / LATEST})")
    first_error: CheckpointError | None = None
    for option in options:
        try:
            return Verified(option, read_manifest(option))
        except CheckpointError as err:
            first_error = first_error or err
    assert first_error is not None
    raise first_error


def compare_data(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume on data other than the checkpoint's (named file, both values)."""
    if saved.get("format") != current.get("format"):
        raise CheckpointError(
            f"data format {current.get('format')} differs from the checkpoint's {saved.get('format')}"
        )
    old, new = saved.get("files", {}), current.get("files", {})
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            raise CheckpointError(
                f"input {name!r} changed since the checkpoint: now {new.get(name)}, was {old.get(name)}"
            )
    old_vocab, new_vocab = saved.get("vocab_fields"), current.get("vocab_fields")
    changed = vocab_difference(old_vocab, new_vocab) if old_vocab and new_vocab else None
    if changed is not None:
        raise CheckpointError(
            f"field {changed!r}: its vocab differs from the checkpoint's (its ids would mean other values)"
        )
    if saved.get("vocab_sha256") != current.get("vocab_sha256"):
        raise CheckpointError(
            "the prepared vocab differs from the checkpoint's (different data or data.min_count)"
        )
