"""On-disk layout of a prepared dataset and reopening it memory-mapped.

A prepared ``cache_dir`` holds ``{split}_ids.npy``, ``{split}_labels.npy``,
``{split}_dense.npy`` (criteo only), ``vocab.json`` and ``meta.json``. Search, retrain and
eval all reopen the same directory, so ids and vocab stay consistent across recipes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torchrec import EmbeddingBagConfig

from torchrec_dimgrow.data.layout import SPLITS
from torchrec_dimgrow.data.split import Split
from torchrec_dimgrow.errors import DataError

FORMAT_VERSION = 1
META_FILE = "meta.json"
VOCAB_FILE = "vocab.json"


def vocab_path(cache_dir: str | Path) -> Path:
    """Where the vocab JSON of a prepared dataset lives (retrain/eval reuse it)."""
    return Path(cache_dir) / VOCAB_FILE


def meta_path(cache_dir: str | Path) -> Path:
    """Where the metadata JSON of a prepared dataset lives."""
    return Path(cache_dir) / META_FILE


def array_path(cache_dir: Path, split: str, kind: str) -> Path:
    """``{split}_{kind}.npy`` with kind in ids/labels/dense."""
    return cache_dir / f"{split}_{kind}.npy"


@dataclass
class PreparedData:
    """Encoded train/val/test splits plus what a model needs to size its tables."""

    fields: list[str]
    vocab_sizes: list[int]
    num_dense: int
    train: Split
    val: Split
    test: Split
    source: dict[str, Any]
    directory: Path | None = None  # the prepared dataset on disk (its vocab.json); None: in memory
    # Frequency-block starts per field (data/blocks.py), as prepare stored them; None: in memory.
    blocks: dict[str, list[int]] | None = None

    def vocab(self) -> dict[str, int]:
        """Rows of each field's table, ``{field: vocab size}`` in field order."""
        return {f: int(v) for f, v in zip(self.fields, self.vocab_sizes, strict=True)}

    def table_configs(self, embedding_dim: int | dict[str, int]) -> list[EmbeddingBagConfig]:
        """One table per field; a dict gives per-field dims and a 0 drops the field."""
        dims = self._dims(embedding_dim)
        return [
            EmbeddingBagConfig(num_embeddings=size, embedding_dim=dims[name], name=name, feature_names=[name])
            for name, size in zip(self.fields, self.vocab_sizes, strict=True)
            if dims[name] > 0
        ]

    def _dims(self, embedding_dim: int | dict[str, int]) -> dict[str, int]:
        if isinstance(embedding_dim, dict):
            unknown = sorted(set(embedding_dim) - set(self.fields))
            missing = [f for f in self.fields if f not in embedding_dim]
            if unknown or missing:
                raise DataError(f"embedding_dim dict: unknown fields {unknown}, missing fields {missing}")
            dims = dict(embedding_dim)
        else:
            dims = dict.fromkeys(self.fields, embedding_dim)
        negative = {f: d for f, d in dims.items() if d < 0}
        if negative:
            raise DataError(f"embedding_dim must be >= 0, got {negative}")
        return dims


def read_meta(cache_dir: str | Path) -> dict[str, Any]:
    """The metadata of a prepared dataset; DataError if there is none or it is foreign."""
    path = meta_path(cache_dir)
    if not path.is_file():
        raise DataError(f"{path}: no prepared dataset here (run prepare first)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable metadata: {err}") from err
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: prepared with format version {meta.get('version')}, need {FORMAT_VERSION}")
    return meta


def _open(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: missing from the prepared dataset")
    return np.load(path, mmap_mode="r")


def _load_split(cache_dir: Path, split: str, fields: list[str], num_dense: int) -> Split:
    dense = _open(array_path(cache_dir, split, "dense")) if num_dense else None
    ids = _open(array_path(cache_dir, split, "ids"))
    return Split(ids, _open(array_path(cache_dir, split, "labels")), dense, fields=list(fields))


def load_prepared(cache_dir: str | Path) -> PreparedData:
    """Reopen a prepared dataset; arrays are memory-mapped read-only (no copy per rank)."""
    cache_dir = Path(cache_dir)
    meta = read_meta(cache_dir)
    fields, num_dense = list(meta["fields"]), int(meta["num_dense"])
    splits = {s: _load_split(cache_dir, s, fields, num_dense) for s in SPLITS}
    for name, split in splits.items():
        if len(split) != meta["rows"][name]:
            raise DataError(f"{cache_dir}: {name} has {len(split)} rows, meta.json says {meta['rows'][name]}")
    return PreparedData(
        fields=fields,
        vocab_sizes=[int(v) for v in meta["vocab_sizes"]],
        num_dense=num_dense,
        source=meta["source"],
        directory=cache_dir,
        blocks={f: [int(b) for b in s] for f, s in meta["blocks"].items()} if "blocks" in meta else None,
        **splits,
    )


def load_vocab(cache_dir: str | Path) -> dict[str, Any]:
    """The vocab JSON (``fields``, ``vocab``: field -> {value: id}, ``min_count``, ``source``)."""
    path = vocab_path(cache_dir)
    if not path.is_file():
        raise DataError(f"{path}: no vocab here (run prepare first)")
    return json.loads(path.read_text())
