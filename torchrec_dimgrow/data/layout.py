"""Where the raw files of a dataset are, and a fingerprint to detect that they changed.

``data`` may be a prefix (``PREFIX_train.csv``), a template with ``{split}``, a single file
(split randomly), or for MovieLens a directory. Resolving it up front gives a missing-file
error that names the path and the split before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchrec_dimgrow.errors import DataError

SPLITS = ("train", "val", "test")
_ALIASES = {"train": ("train",), "val": ("val", "dev", "valid"), "test": ("test",)}
SUFFIXES = {
    "criteo": (".tsv", ".txt"),
    "avazu": (".csv",),
    "aliccp": (".csv",),
    "csv": (".csv",),
    "parquet": (".parquet", ".pq"),
}
COMPRESSIONS = ("", ".gz", ".bz2", ".zst")
"""Text inputs may be compressed (pyarrow decompresses them as it reads); parquet compresses
inside the file."""


@dataclass(frozen=True)
class Layout:
    """Resolved input files: one per split, or one ``single`` file to split randomly."""

    files: dict[str, Path] = field(default_factory=dict)
    single: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)

    @property
    def schema_file(self) -> Path:
        """The file that defines columns and vocab: the train file (or the single file)."""
        return self.single if self.single is not None else self.files["train"]

    def file_of(self, split: str) -> Path:
        """The file a split's rows come from (for error messages)."""
        return self.single if self.single is not None else self.files[split]

    def fingerprint(self) -> dict[str, Any]:
        """Path, size and mtime of every input, so a changed file invalidates the cache."""
        named = {**({"all": self.single} if self.single else {}), **self.files, **self.extra}
        return {name: _stat(path) for name, path in sorted(named.items())}


def _stat(path: Path) -> dict[str, Any]:
    info = path.stat()
    return {"path": str(path.resolve()), "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _template_file(data: str, split: str) -> Path:
    tried = [Path(data.replace("{split}", alias)) for alias in _ALIASES[split]]
    return _first_existing(tried, split)


def _prefix_file(data: str, split: str, suffixes: tuple[str, ...], compressed: bool) -> Path:
    codecs = COMPRESSIONS if compressed else ("",)
    tried = [
        Path(f"{data}_{alias}{suffix}{codec}")
        for alias in _ALIASES[split]
        for suffix in suffixes
        for codec in codecs
    ]
    return _first_existing(tried, split)


def _first_existing(candidates: list[Path], split: str) -> Path:
    for path in candidates:
        if path.is_file():
            return path
    for path in candidates:
        if path.is_dir():
            raise DataError(f"{split} split: {path} is a directory, expected a file")
    names = ", ".join(str(p) for p in candidates)
    raise DataError(f"missing {split} split file: {candidates[0]} (tried {names})")


def resolve_files(data: str, fmt: str) -> Layout:
    """Resolve a prefix / ``{split}`` template / single file for a file-based format."""
    if "{split}" in data:
        return Layout(files={s: _template_file(data, s) for s in SPLITS})
    if Path(data).is_file():
        return Layout(single=Path(data))
    compressed = fmt != "parquet"
    return Layout(files={s: _prefix_file(data, s, SUFFIXES[fmt], compressed) for s in SPLITS})


def resolve_movielens(data: str, layouts: tuple[tuple[str, ...], ...]) -> Layout:
    """MovieLens: a directory holding one release's ratings file (split randomly) and its
    lookup tables; ``layouts`` lists each release's files, ratings first."""
    directory = Path(data)
    if directory.is_file():  # accept the path of the ratings file itself
        directory = directory.parent
    names = next((files for files in layouts if (directory / files[0]).is_file()), layouts[0])
    if not (directory / names[0]).is_file():
        tried = " or ".join(str(directory / files[0]) for files in layouts)
        raise DataError(f"missing MovieLens file {directory / names[0]}: no ratings file ({tried})")
    for name in names:
        if not (directory / name).is_file():
            raise DataError(f"missing MovieLens file {directory / name} (needed for train/val/test)")
    return Layout(single=directory / names[0], extra={name: directory / name for name in names[1:]})
