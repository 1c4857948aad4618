"""Block reads and writes on TorchRec ``ShardedTensor`` tables, whatever their layout.

A block of a table is read by every rank writing the part it owns into a zero buffer and
all-reducing it: exactly one rank contributes each element and ``x + 0 == x`` in floating
point, so the result is bit-exact for table-wise, column-wise, row-wise and mixed layouts
alike. Rows are processed in chunks so the transient buffer stays bounded.

Every decision that leads to a collective (local copy or all-reduce?) is taken from
*global* shard metadata, never from what happens to be local: a rank that owns no shard of
a table still joins the all-reduce. The fused optimizer's ``state_dict`` only lists the
tables a rank owns, so optimizer-state layouts are derived from the weight's metadata
(:func:`state_view`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

CHUNK_BYTES = 64 << 20

Signature = tuple[tuple[int, int, int, int, int], ...]


@dataclass(frozen=True)
class LocalPiece:
    row: int
    col: int
    tensor: torch.Tensor  # 2-D view into live storage


@dataclass
class TableView:
    """Global layout of a table (identical on all ranks) plus this rank's pieces."""

    rows: int
    cols: int
    signature: Signature
    pieces: list[LocalPiece] = field(default_factory=list)
    replicated: bool = False

    def local_bytes(self) -> int:
        return sum(p.tensor.numel() * p.tensor.element_size() for p in self.pieces)


def as_2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.view(-1, 1)


def view_of(t: torch.Tensor | TableView) -> TableView:
    """A :class:`TableView` of a ShardedTensor, or of a plain (replicated) tensor."""
    if isinstance(t, TableView):
        return t
    size = [*list(t.size()), 1]
    rows, cols = int(size[0]), int(size[1])
    if not hasattr(t, "local_shards"):
        return TableView(rows, cols, ((0, 0, rows, cols, -1),), [LocalPiece(0, 0, as_2d(t))], replicated=True)
    sig = []
    for m in t.metadata().shards_metadata:  # type: ignore[attr-defined]
        offs = [*list(m.shard_offsets), 0]
        sizes = [*list(m.shard_sizes), 1]
        rank = m.placement.rank() if m.placement is not None else -1
        sig.append((int(offs[0]), int(offs[1]), int(sizes[0]), int(sizes[1]), int(rank)))
    pieces = []
    for shard in t.local_shards():  # type: ignore[attr-defined]
        offs = [*list(shard.metadata.shard_offsets), 0]
        pieces.append(LocalPiece(int(offs[0]), int(offs[1]), as_2d(shard.tensor)))
    return TableView(rows, cols, tuple(sorted(sig)), pieces)


def state_view(weight: TableView, local_state: torch.Tensor | None, rowwise: bool) -> TableView:
    """Layout of an optimizer state laid out like ``weight`` (2-D) or one value per row.

    ``local_state`` is this rank's ShardedTensor of that state, or ``None`` when the rank
    owns no shard of the table (the fused optimizer then omits it).
    """
    if rowwise:
        sig = tuple(sorted({(r, 0, n, 1, rank) for r, _, n, _, rank in weight.signature}))
        layout = TableView(weight.rows, 1, sig)
    else:
        layout = TableView(weight.rows, weight.cols, weight.signature)
    if local_state is not None:
        layout.pieces = view_of(local_state).pieces
    return layout


def columns_are_local(v: TableView) -> bool:
    """True when every shard spans all columns (TW, RW): column ops need no communication."""
    return all(c == 0 and w == v.cols for _, c, _, w, _ in v.signature)


def _row_chunks(rows: int, cols: int, itemsize: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(1, cols * itemsize))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _overlap(piece: LocalPiece, r0: int, r1: int, col: int) -> tuple[slice, slice, int] | None:
    """Rows of [r0, r1) and the local column index where ``piece`` holds global ``col``."""
    lc = col - piece.col
    if not 0 <= lc < piece.tensor.shape[1]:
        return None
    a0, a1 = max(r0, piece.row), min(r1, piece.row + piece.tensor.shape[0])
    if a0 >= a1:
        return None
    return slice(a0 - r0, a1 - r0), slice(a0 - piece.row, a1 - piece.row), lc


def _all_reduce(buf: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(buf, group=group)


@torch.no_grad()
def copy_block(
    src: torch.Tensor | TableView,
    dst: torch.Tensor | TableView,
    src_cols: list[int],
    dst_cols: list[int],
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> int:
    """Copy columns ``src_cols`` of ``src`` onto ``dst_cols`` of ``dst`` (same row count).

    ``src`` and ``dst`` may be different tables (re-plan) or the same one (a column move).
    Returns the bytes that went through the all-reduce (0 when the copy was local).
    Collective: every rank calls it with the same arguments in the same order.
    """
    s, d = view_of(src), view_of(dst)
    if s.rows != d.rows:
        raise ValueError(f"copy_block: row counts differ ({s.rows} vs {d.rows})")
    if len(src_cols) != len(dst_cols):
        raise ValueError("copy_block: column lists differ in length")
    if not src_cols:
        return 0
    if s.replicated or (s.signature == d.signature and (src_cols == dst_cols or columns_are_local(s))):
        _copy_local(s, d, src_cols, dst_cols)  # every element's source is on the same rank
        return 0
    contiguous = src_cols == list(range(src_cols[0], src_cols[0] + len(src_cols)))
    if src_cols == dst_cols and contiguous and _same_owners(s, d, src_cols):
        _copy_overlaps(s, d, src_cols)  # e.g. a table-wise table that widened on its rank
        return 0
    dtype = (
        s.pieces[0].tensor.dtype if s.pieces else (d.pieces[0].tensor.dtype if d.pieces else torch.float32)
    )
    moved = 0
    for r0, r1 in _row_chunks(s.rows, len(src_cols), torch.finfo(dtype).bits // 8):
        buf = torch.zeros(r1 - r0, len(src_cols), dtype=dtype, device=device or torch.device("cpu"))
        for p in s.pieces:
            for j, c in enumerate(src_cols):
                hit = _overlap(p, r0, r1, c)
                if hit is not None:
                    buf[hit[0], j] = p.tensor[hit[1], hit[2]]
        _all_reduce(buf, group)
        moved += buf.numel() * buf.element_size()
        for p in d.pieces:
            for j, c in enumerate(dst_cols):
                hit = _overlap(p, r0, r1, c)
                if hit is not None:
                    p.tensor[hit[1], hit[2]] = buf[hit[0], j]
    return moved


def _same_owners(s: TableView, d: TableView, cols: list[int]) -> bool:
    """True when each copied element lives on the same rank in ``s`` and in ``d``."""
    lo, hi = min(cols), max(cols) + 1
    for sr, sc, sn, sw, srank in s.signature:
        a0, a1 = max(sc, lo), min(sc + sw, hi)
        if a0 >= a1:
            continue
        for dr, dc, dn, dw, drank in d.signature:
            rows_meet = max(sr, dr) < min(sr + sn, dr + dn)
            cols_meet = max(a0, dc) < min(a1, dc + dw)
            if rows_meet and cols_meet and drank != srank:
                return False
    return True


def _copy_overlaps(s: TableView, d: TableView, cols: list[int]) -> None:
    """Copy every overlap between a local source piece and a local destination piece."""
    lo, hi = min(cols), max(cols) + 1
    for ps in s.pieces:
        for pd in d.pieces:
            r0, r1 = max(ps.row, pd.row), min(ps.row + ps.tensor.shape[0], pd.row + pd.tensor.shape[0])
            c0 = max(ps.col, pd.col, lo)
            c1 = min(ps.col + ps.tensor.shape[1], pd.col + pd.tensor.shape[1], hi)
            if r0 < r1 and c0 < c1:
                pd.tensor[r0 - pd.row : r1 - pd.row, c0 - pd.col : c1 - pd.col] = ps.tensor[
                    r0 - ps.row : r1 - ps.row, c0 - ps.col : c1 - ps.col
                ]


def _copy_local(s: TableView, d: TableView, src_cols: list[int], dst_cols: list[int]) -> None:
    """Copy where this rank holds the source of every element it must write."""
    if s.replicated:
        whole = s.pieces[0].tensor
        for p in d.pieces:
            for cs, cd in zip(src_cols, dst_cols):
                hit = _overlap(p, 0, d.rows, cd)
                if hit is not None:
                    p.tensor[hit[1], hit[2]] = whole[hit[0], cs]
        return
    by_origin = {(p.row, p.col): p for p in d.pieces}
    for ps in s.pieces:
        pd = by_origin[(ps.row, ps.col)]
        for cs, cd in zip(src_cols, dst_cols):
            ls, ld = cs - ps.col, cd - pd.col
            if 0 <= ls < ps.tensor.shape[1] and 0 <= ld < pd.tensor.shape[1]:
                pd.tensor[:, ld] = ps.tensor[:, ls]


def draw_chunks(rows: int, cols: int, itemsize: int = 4) -> Iterator[tuple[int, int]]:
    """Row chunks of about CHUNK_BYTES whose draws equal one draw over the whole block.

    PyTorch's CPU ``normal_`` fills groups of 16 values (and redraws the last 16 of a
    tensor whose size is not a multiple of 16), so drawing a ``rows x cols`` block chunk by
    chunk gives the same numbers as one draw exactly when every chunk but the last holds a
    multiple of 16 values and the last holds at least 16: chunks are a multiple of 16 rows
    and a short tail is merged into the chunk before it. This keeps initialisation
    bit-identical to a whole-table draw without a whole-table temporary.
    """
    step = max(16, (CHUNK_BYTES // max(1, cols * itemsize)) // 16 * 16)
    r0 = 0
    while r0 < rows:
        r1 = min(rows, r0 + step)
        if rows - r1 < step and (rows - r1) * cols < 16:
            r1 = rows
        yield r0, r1
        r0 = r1


@torch.no_grad()
def fill_columns(t: torch.Tensor | TableView, cols: list[int], std: float | None) -> None:
    """Re-draw (``std``) or zero (``None``) the given global columns where this rank owns them.

    Draws go through a bounded row-chunk buffer (:func:`draw_chunks`), never a temporary
    the size of the shard; the values equal one ``normal_`` over the ``rows x len(cols)``
    block of each local piece.
    """
    for p in view_of(t).pieces:
        local = [c - p.col for c in cols if 0 <= c - p.col < p.tensor.shape[1]]
        if not local:
            continue
        contiguous = local == list(range(local[0], local[0] + len(local)))
        target = p.tensor[:, local[0] : local[0] + len(local)] if contiguous else None
        if std is None:
            if target is not None:
                target.zero_()
            else:
                p.tensor[:, local] = 0.0
            continue
        for r0, r1 in draw_chunks(p.tensor.shape[0], len(local), p.tensor.element_size()):
            block = torch.empty(r1 - r0, len(local), dtype=p.tensor.dtype, device=p.tensor.device)
            block.normal_(0.0, std)
            if target is not None:
                target[r0:r1] = block
            else:
                p.tensor[r0:r1, local] = block


# ----------------------------------------------------------------------------- spill
@dataclass(frozen=True)
class SpilledPiece:
    """The first ``cols`` global-column-contiguous columns of one local piece, on disk."""

    row: int
    col: int
    rows: int
    cols: int
    offset: int


@dataclass
class SpilledTable:
    """A table's global layout (no local tensors) plus this rank's spilled pieces."""

    layout: TableView
    pieces: list[SpilledPiece]
    dtype: torch.dtype


class Spill:
    """A scratch file that holds what a re-plan keeps while the old tables are freed.

    Written and read in row chunks (``CHUNK_BYTES``) with plain file I/O, never mapped, so
    neither direction needs memory beyond one chunk: the kernel's page cache, not the
    process, holds the bytes in between. The file is deleted on :meth:`close`.
    """

    def __init__(self, directory: str | None = None) -> None:
        fd, self.path = tempfile.mkstemp(prefix="dimgrow-replan-", suffix=".bin", dir=directory)
        self._fh = os.fdopen(fd, "w+b")
        self.bytes = 0

    def write(self, view: TableView, keep: int) -> SpilledTable:
        """Spill columns ``[0, keep)`` of every local piece of ``view``."""
        out = []
        dtype = view.pieces[0].tensor.dtype if view.pieces else torch.float32
        for p in view.pieces:
            n = max(0, min(p.tensor.shape[1], keep - p.col))
            if n == 0:
                continue
            offset = self._fh.tell()
            for r0, r1 in _row_chunks(p.tensor.shape[0], n, p.tensor.element_size()):
                chunk = p.tensor[r0:r1, :n].contiguous()
                self._fh.write(chunk.cpu().numpy().tobytes())
            out.append(SpilledPiece(p.row, p.col, p.tensor.shape[0], n, offset))
        self.bytes = self._fh.tell()
        layout = TableView(view.rows, view.cols, view.signature, replicated=view.replicated)
        return SpilledTable(layout, out, dtype)

    def read(self, piece: SpilledPiece, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``[r0, r1)`` (piece-local) of a spilled piece, as a fresh ``(r1-r0, cols)`` tensor."""
        itemsize = torch.finfo(dtype).bits // 8
        out = torch.empty(r1 - r0, piece.cols, dtype=dtype)
        self._fh.seek(piece.offset + r0 * piece.cols * itemsize)
        got = self._fh.readinto(out.numpy().data.cast("B"))
        if got != out.numel() * itemsize:
            raise OSError(f"{self.path}: short read ({got} of {out.numel() * itemsize} bytes)")
        self._fh.seek(0, os.SEEK_END)
        return out

    def close(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@torch.no_grad()
def restore_block(
    spill: Spill,
    src: SpilledTable,
    dst: TableView,
    keep: int,
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> int:
    """Copy global columns ``[0, keep)`` from a spilled table into ``dst`` (same rows).

    The same rule as :func:`copy_block`: a row chunk is assembled from the pieces this rank
    spilled and all-reduced, unless the global layouts say every element stays on its rank
    (then the chunk is written locally). Returns the bytes that went through the all-reduce.
    Collective: every rank calls it with the same tables in the same order.
    """
    s = src.layout
    if s.rows != dst.rows:
        raise ValueError(f"restore_block: row counts differ ({s.rows} vs {dst.rows})")
    if keep <= 0:
        return 0
    cols = list(range(keep))
    local = s.replicated or _same_owners(s, dst, cols)
    moved = 0
    for r0, r1 in _row_chunks(s.rows, keep, torch.finfo(src.dtype).bits // 8):
        buf = torch.zeros(r1 - r0, keep, dtype=src.dtype)
        for sp in src.pieces:
            a0, a1 = max(r0, sp.row), min(r1, sp.row + sp.rows)
            if a0 < a1:
                buf[a0 - r0 : a1 - r0, sp.col : sp.col + sp.cols] = spill.read(
                    sp, a0 - sp.row, a1 - sp.row, src.dtype
                )
        if device is not None and device.type != "cpu":
            buf = buf.to(device)
        if not local:
            _all_reduce(buf, group)
            moved += buf.numel() * buf.element_size()
        for p in dst.pieces:
            a0, a1 = max(r0, p.row), min(r1, p.row + p.tensor.shape[0])
            c0, c1 = max(0, p.col), min(keep, p.col + p.tensor.shape[1])
            if a0 < a1 and c0 < c1:
                p.tensor[a0 - p.row : a1 - p.row, c0 - p.col : c1 - p.col] = buf[a0 - r0 : a1 - r0, c0:c1]
    return moved


# ----------------------------------------------------------------------------- rewidth in place
_MADV_DONTNEED = 4  # Linux: the range reads back as zeros and its pages leave the RSS


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` where pages can be given back on their own (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def can_release_pages() -> bool:
    """True when :func:`release_pages` gives memory back (Linux); else rewidth by spilling."""
    return _madvise() is not None


def release_pages(t: torch.Tensor, start: int, end: int) -> int:
    """Give back the pages lying wholly inside bytes ``[start, end)`` of ``t``'s data.

    The range's contents are lost (it reads back as zeros): only for a buffer that is about
    to be dropped and whose bytes were already copied. Only whole pages inside the range
    are released, so memory just outside it (the allocator's headers, another tensor) is
    never touched. Returns the offset up to which pages are now released (``start`` when
    none were), where a following call should start.
    """
    fn = _madvise()
    if fn is None or t.device.type != "cpu":
        return start
    base = t.data_ptr()
    lo = -(-(base + start) // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (base + end) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo:
        return start
    if fn(lo, hi - lo, _MADV_DONTNEED) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise(MADV_DONTNEED) failed: {os.strerror(err)}")
    return hi - base


@torch.no_grad()
def rewidth_rows(
    old: torch.Tensor, rows: int, old_cols: int, new_cols: int, fill: bool = False, std: float | None = None
) -> torch.Tensor:
    """A new flat ``rows x new_cols`` buffer with the first ``min(old_cols, new_cols)`` columns
    of every row of the flat ``rows x old_cols`` buffer ``old``.

    The added columns are left unset, or with ``fill`` drawn from N(0, ``std``) (zeroed when
    ``std`` is None) in the same pass, equal to :func:`fill_columns` over them afterwards
    (the draws follow :func:`draw_chunks`). The copy walks row chunks (``CHUNK_BYTES``) and
    gives back the pages of ``old`` behind it (:func:`release_pages`), while the new
    buffer, allocated empty, only takes pages as they are written: the two together never
    hold much more than the larger of the two plus one chunk. ``old`` is garbage
    afterwards: its owner must drop it.
    """
    if old.dim() != 1 or not old.is_contiguous() or old.numel() != rows * old_cols:
        raise ValueError(
            f"rewidth_rows: expected a contiguous flat buffer of {rows} x {old_cols}, got {tuple(old.shape)}"
        )
    new = torch.empty(rows * new_cols, dtype=old.dtype, device=old.device)
    keep, added = min(old_cols, new_cols), max(0, new_cols - old_cols)
    src, dst = old.view(rows, old_cols), new.view(rows, new_cols)
    row_bytes = old_cols * old.element_size()
    draw = fill and added > 0 and std is not None
    chunks = (
        draw_chunks(rows, added, old.element_size())
        if draw
        else _row_chunks(rows, old_cols, old.element_size())
    )
    released = 0
    for r0, r1 in chunks:
        dst[r0:r1, :keep] = src[r0:r1, :keep]
        if draw:
            block = torch.empty(r1 - r0, added, dtype=old.dtype, device=old.device)
            block.normal_(0.0, std)  # type: ignore[arg-type]
            dst[r0:r1, keep:] = block
        elif fill and added:
            dst[r0:r1, keep:] = 0.0
        released = release_pages(old, released, r1 * row_bytes)
    return new
