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

from collections.abc import Iterator
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


@torch.no_grad()
def fill_columns(t: torch.Tensor | TableView, cols: list[int], std: float | None) -> None:
    """Re-draw (``std``) or zero (``None``) the given global columns where this rank owns them."""
    for p in view_of(t).pieces:
        local = [c - p.col for c in cols if 0 <= c - p.col < p.tensor.shape[1]]
        if not local:
            continue
        block = torch.empty(p.tensor.shape[0], len(local), dtype=p.tensor.dtype, device=p.tensor.device)
        if std is None:
            block.zero_()
        else:
            block.normal_(0.0, std)
        p.tensor[:, local] = block
