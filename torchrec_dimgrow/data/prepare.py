"""``prepare``: raw files -> vocab (train only) -> encoded, memory-mapped splits.

Two streaming passes: the first counts train values to build the vocab, the second encodes
every split straight into ``.npy`` files. All output goes to a staging directory next to
``cache_dir`` that is renamed into place only when everything succeeded, so bad input
never leaves a half-written cache that a later run could mistake for a good one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from torchrec_dimgrow.data.aliccp import aliccp_reader
from torchrec_dimgrow.data.avazu import AvazuReader
from torchrec_dimgrow.data.chunk import Chunk, FormatReader
from torchrec_dimgrow.data.columns import MISSING
from torchrec_dimgrow.data.criteo import CriteoReader
from torchrec_dimgrow.data.layout import SPLITS, Layout, resolve_files, resolve_movielens
from torchrec_dimgrow.data.movielens import LAYOUTS as MOVIELENS_LAYOUTS
from torchrec_dimgrow.data.movielens import MovieLensReader
from torchrec_dimgrow.data.npy_writer import NpyAppender
from torchrec_dimgrow.data.store import (
    FORMAT_VERSION,
    PreparedData,
    array_path,
    load_prepared,
    meta_path,
    read_meta,
    vocab_path,
)
from torchrec_dimgrow.data.tabular import CsvTableReader, ParquetReader
from torchrec_dimgrow.data.vocab import FieldVocab, ValueCounter
from torchrec_dimgrow.diskwrite import disk_errors
from torchrec_dimgrow.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("criteo", "avazu", "aliccp", "movielens", "csv", "parquet")
_TABULAR = ("csv", "parquet")


def prepare(
    data: str | Path,
    fmt: str,
    cache_dir: str | Path,
    *,
    label_col: str = "label",
    drop_cols: Sequence[str] = (),
    min_count: int = 2,
    split_seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> PreparedData:
    """Prepare ``data`` (format ``fmt``) into ``cache_dir``, or reuse it if already current.

    In a multi-process job, call it on one rank and barrier before the others call
    :func:`load_prepared` (concurrent calls are safe but each would redo the work).
    """
    fractions = _check_arguments(fmt, min_count, split_fractions)
    _check_columns_apply(fmt, label_col, drop_cols)
    layout = (
        resolve_movielens(str(data), MOVIELENS_LAYOUTS)
        if fmt == "movielens"
        else resolve_files(str(data), fmt)
    )
    source = _source(data, fmt, layout, label_col, drop_cols, min_count, split_seed, fractions)
    cache_dir = Path(cache_dir)
    current = _reusable(cache_dir, source)
    if current is not None:
        return current
    _check_replaceable(cache_dir)
    reader = _make_reader(fmt, layout, label_col, drop_cols)
    with disk_errors(cache_dir), _staging(cache_dir) as staging:  # a full disk: one line, no staging
        _build(reader, layout, source, staging)
        _publish(staging, cache_dir, source)
    return load_prepared(cache_dir)


def _check_arguments(fmt: str, min_count: int, split_fractions: Sequence[float]) -> list[float]:
    """Validate cheap arguments before touching any file; returns normalised fractions."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    if not isinstance(min_count, int) or min_count < 1:
        raise DataError(f"min_count must be an integer >= 1, got {min_count!r}")
    if len(split_fractions) != 3 or any(f < 0 for f in split_fractions) or split_fractions[0] <= 0:
        raise DataError(
            f"split_fractions must be 3 non-negative numbers with train > 0, got {split_fractions}"
        )
    total = float(sum(split_fractions))
    return [float(f) / total for f in split_fractions]


def _check_columns_apply(fmt: str, label_col: str, drop_cols: Sequence[str]) -> None:
    """``label_col`` / ``drop_cols`` name columns of csv and parquet files only.

    The other formats fix their label and fields, and ignoring the settings would run a search
    on other columns than the user asked for, without a word.
    """
    if fmt in _TABULAR:
        return
    given = [f"data.label_col {label_col}"] if label_col != "label" else []
    given += [f"data.drop_cols {','.join(drop_cols)}"] if drop_cols else []
    if given:
        raise DataError(
            f"{' and '.join(given)}: only --format csv or parquet take column names; "
            f"--format {fmt} fixes its label and fields (convert it to csv/parquet to choose them)"
        )


def _source(
    data: str | Path,
    fmt: str,
    layout: Layout,
    label_col: str,
    drop_cols: Sequence[str],
    min_count: int,
    split_seed: int,
    fractions: list[float],
) -> dict[str, Any]:
    """Provenance; equal provenance (files unchanged) means the cache can be reused."""
    source: dict[str, Any] = {
        "data": str(Path(data).resolve()),
        "format": fmt,
        "min_count": min_count,
        "files": layout.fingerprint(),
        "version": FORMAT_VERSION,
    }
    if fmt in _TABULAR:
        source.update(label_col=label_col, drop_cols=list(drop_cols))
    if layout.single is not None:
        source.update(split_seed=split_seed, split_fractions=fractions)
    return json.loads(json.dumps(source))


def _reusable(cache_dir: Path, source: dict[str, Any]) -> PreparedData | None:
    """The cached dataset if it was prepared from exactly this source, else ``None``."""
    if not meta_path(cache_dir).is_file():
        return None
    try:
        if read_meta(cache_dir).get("source") != source:
            return None
        return load_prepared(cache_dir)
    except (DataError, OSError, ValueError, KeyError):
        return None


def _check_replaceable(cache_dir: Path) -> None:
    """Never replace a directory that is not a prepared dataset (it may hold user files)."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DataError(f"cache_dir {cache_dir} exists and is not a directory")
    if cache_dir.is_dir() and any(cache_dir.iterdir()) and not meta_path(cache_dir).is_file():
        raise DataError(
            f"cache_dir {cache_dir} is not empty and holds no prepared dataset; refusing to replace it"
        )


def _make_reader(fmt: str, layout: Layout, label_col: str, drop_cols: Sequence[str]) -> FormatReader:
    if fmt == "criteo":
        return CriteoReader()
    if fmt == "avazu":
        return AvazuReader(layout.schema_file)
    if fmt == "aliccp":
        return aliccp_reader(layout.schema_file)
    if fmt == "movielens":
        return MovieLensReader(layout.schema_file)
    if fmt == "csv":
        return CsvTableReader(layout.schema_file, label_col, list(drop_cols))
    return ParquetReader(layout.schema_file, label_col, list(drop_cols))


def _split_codes(rng: np.random.Generator, rows: int, fractions: list[float]) -> np.ndarray:
    """Random split per row (0 train, 1 val, 2 test); the draw sequence is chunking-independent."""
    edges = np.cumsum(fractions)[:2]
    return np.searchsorted(edges, rng.random(rows), side="right").astype(np.int8)


def _inputs(
    reader: FormatReader, layout: Layout, source: dict[str, Any], splits: Sequence[str]
) -> Iterator[tuple[Chunk, np.ndarray]]:
    """Chunks of the requested splits with each row's split code."""
    if layout.single is not None:
        rng = np.random.default_rng(source["split_seed"])
        for chunk in reader.chunks(layout.single):
            yield chunk, _split_codes(rng, len(chunk), source["split_fractions"])
        return
    for name in splits:
        for chunk in reader.chunks(layout.files[name]):
            yield chunk, np.full(len(chunk), SPLITS.index(name), dtype=np.int8)


def _count_train(reader: FormatReader, layout: Layout, source: dict[str, Any]) -> list[FieldVocab]:
    """Pass 1: count field values over train rows only, so val/test never shape the vocab."""
    counter = ValueCounter(len(reader.fields))
    for chunk, codes in _inputs(reader, layout, source, ["train"]):
        train = codes == 0
        counter.add(chunk.fields if train.all() else chunk.select(train).fields)
    if counter.rows == 0:
        raise DataError(f"{layout.file_of('train')}: split 'train' has no data rows")
    vocabs = counter.vocabs(source["min_count"])
    for name, vocab in zip(reader.fields, vocabs, strict=True):
        problem = vocab.degenerate(name, source["min_count"])
        if problem is not None:  # once per column: a reused cache is not counted again
            log.warning("%s", problem)
    return vocabs


class _SplitWriter:
    """The ``.npy`` files of one split, appended chunk by chunk."""

    def __init__(self, directory: Path, split: str, num_fields: int, num_dense: int) -> None:
        self.ids = NpyAppender(array_path(directory, split, "ids"), np.int64, (num_fields,))
        self.labels = NpyAppender(array_path(directory, split, "labels"), np.float32)
        self.dense = (
            NpyAppender(array_path(directory, split, "dense"), np.float32, (num_dense,))
            if num_dense
            else None
        )
        self.positives = 0

    def append(self, ids: np.ndarray, labels: np.ndarray, dense: np.ndarray | None) -> None:
        self.ids.append(ids)
        self.labels.append(labels)
        self.positives += int(labels.sum())
        if self.dense is not None and dense is not None:
            self.dense.append(dense)

    def close(self) -> None:
        for appender in (self.ids, self.labels, self.dense):
            if appender is not None:
                appender.close()


def _encode(
    reader: FormatReader, layout: Layout, source: dict[str, Any], vocabs: list[FieldVocab], staging: Path
) -> dict[str, _SplitWriter]:
    """Pass 2: encode every split into its ``.npy`` files."""
    writers = {s: _SplitWriter(staging, s, len(reader.fields), reader.num_dense) for s in SPLITS}
    try:
        for chunk, codes in _inputs(reader, layout, source, SPLITS):
            ids = np.stack([v.encode(c) for v, c in zip(vocabs, chunk.fields, strict=True)], axis=1)
            _route(writers, codes, ids, chunk)
    finally:
        for writer in writers.values():
            writer.close()
    for name, writer in writers.items():
        if writer.labels.rows == 0:
            raise DataError(f"{layout.file_of(name)}: split {name!r} has no data rows")
    return writers


def _route(writers: dict[str, _SplitWriter], codes: np.ndarray, ids: np.ndarray, chunk: Chunk) -> None:
    """Send each encoded row to the writer of its split."""
    for code in np.unique(codes):
        rows = codes == code
        whole = bool(rows.all())
        dense = None if chunk.dense is None else (chunk.dense if whole else chunk.dense[rows])
        writers[SPLITS[code]].append(
            ids if whole else ids[rows], chunk.labels if whole else chunk.labels[rows], dense
        )


def _build(reader: FormatReader, layout: Layout, source: dict[str, Any], staging: Path) -> None:
    vocabs = _count_train(reader, layout, source)
    writers = _encode(reader, layout, source, vocabs, staging)
    _write_vocab(staging, reader.fields, vocabs, source)
    meta = {
        "version": FORMAT_VERSION,
        "fields": reader.fields,
        "vocab_sizes": [v.size for v in vocabs],
        "num_dense": reader.num_dense,
        "rows": {s: w.labels.rows for s, w in writers.items()},
        "positives": {s: w.positives for s, w in writers.items()},
        "missing_token": MISSING,
        "source": source,
    }
    meta_path(staging).write_text(json.dumps(meta, indent=2))


def _write_vocab(staging: Path, fields: list[str], vocabs: list[FieldVocab], source: dict[str, Any]) -> None:
    """Write value->id maps per field: retrain/eval on new raw data must reuse these ids."""
    payload = {
        "version": FORMAT_VERSION,
        "fields": fields,
        "min_count": source["min_count"],
        "missing_token": MISSING,
        "source": source,
        "vocab": {name: vocab.mapping() for name, vocab in zip(fields, vocabs, strict=True)},
    }
    with open(vocab_path(staging), "w") as handle:
        json.dump(payload, handle)


def _missing_parents(directory: Path) -> list[Path]:
    """Ancestors (nearest last) that do not exist yet, to remove them again on failure."""
    missing: list[Path] = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    return missing[::-1]


@contextmanager
def _staging(cache_dir: Path) -> Iterator[Path]:
    """A temp dir beside ``cache_dir`` (same filesystem: rename is atomic); removed on error."""
    created = _missing_parents(cache_dir.parent)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = cache_dir.with_name(f".{cache_dir.name}.staging-{uuid.uuid4().hex}")
    staging.mkdir()  # not mkdtemp: its 0700 mode would make the cache unreadable to other users
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for directory in reversed(created):
            _rmdir_if_empty(directory)
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _rmdir_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _publish(staging: Path, cache_dir: Path, source: dict[str, Any]) -> None:
    """Move the finished dataset into place, replacing an older prepared dataset.

    If another process (e.g. a second rank) published the same source meanwhile, its copy
    is kept and ours discarded, so readers that already opened it are not disturbed.
    """
    if _reusable(cache_dir, source) is not None:
        return
    if not cache_dir.exists():
        try:
            os.replace(staging, cache_dir)
            return
        except OSError:
            if _reusable(cache_dir, source) is not None:
                return
            raise
    retired = cache_dir.with_name(f".{cache_dir.name}.old-{uuid.uuid4().hex}")
    os.replace(cache_dir, retired)
    try:
        os.replace(staging, cache_dir)
    except OSError:
        os.replace(retired, cache_dir)
        raise
    shutil.rmtree(retired, ignore_errors=True)
