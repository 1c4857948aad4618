"""Frequency blocks: each field's ids cut into ranges of decreasing training frequency.

``prepare`` numbers a field's values most frequent first (id 0 is the shared bucket of rare
and unseen values, ids 1..n follow the train counts), so a block is just an id range
``[start, next start)``. The rule (:func:`block_starts`): walk the ids in order and cut where
the cumulative train lookup mass first reaches each of ``BlockConfig.mass`` (default 50%,
90%, 99%: a head, two middle blocks and the tail, so at most 4 blocks); the shared bucket 0
counts in the first block. A cut that would leave a block with fewer than
``BlockConfig.min_rows`` rows is dropped (merged into the block below), so a small field
stays one block and no block is so short that its rows cap its dim (``SearchRule.cap_dims_at_rows``).

The boundaries are stored with the vocab (``vocab.json`` and ``meta.json`` ``"blocks"``), so
search, retrain, evaluate and export cut the same ids; data built in memory (no vocab:
``data/synthetic.py``) gets them from its train split's id counts by the same rule.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Name of block ``i`` of a field that is split (a 1-block field keeps its own name).
BLOCK_SEP = "__b"


@dataclass(frozen=True)
class BlockConfig:
    """Frequency blocks: how prepare cuts each field, and whether the search uses them.

    ``enabled``: the search (and the retrain/export that follow it) looks up one table per
    block instead of per field. ``mass``: cumulative train-lookup fractions (increasing,
    in (0, 1)) where a field is cut. ``min_rows``: fewest rows a block may have.
    """

    enabled: bool = False
    mass: tuple[float, ...] = (0.5, 0.9, 0.99)
    min_rows: int = 64

    def __post_init__(self) -> None:
        m = list(self.mass)
        if any(not 0.0 < x < 1.0 for x in m) or any(b <= a for a, b in itertools.pairwise(m)):
            raise ValueError(f"BlockConfig.mass must increase strictly inside (0, 1), got {self.mass}")
        if self.min_rows < 1:
            raise ValueError(f"BlockConfig.min_rows must be >= 1, got {self.min_rows}")

    def rule(self) -> dict[str, Any]:
        """What the boundaries depend on (recorded in the prepared data's provenance)."""
        return {"mass": list(self.mass), "min_rows": self.min_rows}


def block_starts(counts: Sequence[int] | np.ndarray, cfg: BlockConfig | None = None) -> list[int]:
    """First id of every block of one field whose id ``i`` was seen ``counts[i]`` times.

    Always starts with 0; ``len`` is the number of blocks (1: the field is not split).
    """
    cfg = cfg or BlockConfig()
    c = np.asarray(counts, dtype=np.float64)
    rows = int(c.shape[0])
    total = float(c.sum())
    starts = [0]
    if rows < 2 * cfg.min_rows or total <= 0:
        return starts
    cum = np.cumsum(c) / total
    for m in cfg.mass:
        # the block so far ends at the first id where the mass reaches m (inclusive)
        cut = int(np.searchsorted(cum, m, side="left")) + 1
        if cut - starts[-1] >= cfg.min_rows and rows - cut >= cfg.min_rows:
            starts.append(cut)
    return starts


def block_names(fields: Sequence[str], starts: Sequence[Sequence[int]]) -> list[str]:
    """Table name of every block, in field order then block order."""
    return [f if len(s) == 1 else f"{f}{BLOCK_SEP}{i}" for f, s in zip(fields, starts) for i in range(len(s))]


@dataclass(frozen=True)
class FieldBlocks:
    """Every field's block boundaries: what the block lookup, retrain and export share."""

    fields: list[str]
    vocab_sizes: list[int]
    starts: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.starts:
            object.__setattr__(self, "starts", [[0] for _ in self.fields])
        if len(self.starts) != len(self.fields) or len(self.vocab_sizes) != len(self.fields):
            raise ValueError("FieldBlocks: need one vocab size and one start list per field")
        for f, s, n in zip(self.fields, self.starts, self.vocab_sizes):
            if not s or s[0] != 0 or any(b <= a for a, b in itertools.pairwise(s)) or s[-1] >= n:
                raise ValueError(f"FieldBlocks: field {f!r} has invalid block starts {s} (vocab {n})")

    @property
    def split(self) -> bool:
        """Whether any field has more than one block."""
        return any(len(s) > 1 for s in self.starts)

    def names(self) -> list[str]:
        return block_names(self.fields, self.starts)

    def field_of(self) -> list[int]:
        """Field index of every block."""
        return [i for i, s in enumerate(self.starts) for _ in s]

    def rows(self) -> list[int]:
        """Rows of every block."""
        out: list[int] = []
        for s, n in zip(self.starts, self.vocab_sizes):
            out += [b - a for a, b in zip(s, [*s[1:], n])]
        return out

    def vocab(self) -> dict[str, int]:
        """``{block name: rows}``: the per-table vocab the byte counts need."""
        return dict(zip(self.names(), self.rows()))

    def field_dims(self, dims: dict[str, int]) -> dict[str, list[int]]:
        """Per field, the dims of its blocks (from a per-block ``dims``)."""
        names = iter(self.names())
        return {f: [int(dims[next(names)]) for _ in s] for f, s in zip(self.fields, self.starts)}

    def to_dict(self) -> dict[str, list[int]]:
        return {f: list(s) for f, s in zip(self.fields, self.starts)}

    def fingerprint(self) -> dict[str, Any]:
        return {"blocks": self.to_dict(), "vocab_sizes": list(self.vocab_sizes)}


def train_counts(ids: np.ndarray, vocab_sizes: Sequence[int]) -> list[np.ndarray]:
    """Per field, how often each id occurs in ``ids`` (rows x fields)."""
    return [
        np.bincount(np.asarray(ids[:, f], dtype=np.int64), minlength=int(n))[: int(n)]
        for f, n in enumerate(vocab_sizes)
    ]


def field_blocks(data: Any, cfg: BlockConfig | None = None) -> FieldBlocks:
    """The blocks of ``data`` (a :class:`~torchrec_dimgrow.data.PreparedData`).

    A prepared dataset's stored boundaries win (they were cut by the rule its ``prepare``
    was given); in-memory data is cut by ``cfg``'s rule from its train split's id counts.
    """
    stored = getattr(data, "blocks", None)
    if stored is not None:
        return FieldBlocks(list(data.fields), list(data.vocab_sizes), [list(stored[f]) for f in data.fields])
    counts = train_counts(data.train.ids, data.vocab_sizes)
    return FieldBlocks(list(data.fields), list(data.vocab_sizes), [block_starts(c, cfg) for c in counts])


def config_dict(cfg: BlockConfig) -> dict[str, Any]:
    return {**asdict(cfg), "mass": list(cfg.mass)}
