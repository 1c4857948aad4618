"""Block reads and writes on TorchRec ``ShardedTensor`` tables, whatever their layout.

A block of a table is read by every rank writing the part it owns into a zero buffer and
all-reducing it: exactly one rank contributes each element and ``x + 0 == x`` in floating
point, so the result is bit-exact for table-wise, column-wise, row-wise and mixed layouts
alike. Rows are processed in chunks so the transient buffer stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class LocalPiece:
    row: int
    col: int
    tensor: torch.Tensor  # 2-D view into live storage


def as_2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.view(-1, 1)


def local_pieces(st: torch.Tensor) -> list[LocalPiece]:
    """Local shards of a ShardedTensor (or the whole tensor if it is a plain one)."""
    if hasattr(st, "local_shards"):
        out = []
        for shard in st.local_shards():  # type: ignore[attr-defined]
            offs = list(shard.metadata.shard_offsets) + [0]
            out.append(LocalPiece(int(offs[0]), int(offs[1]), as_2d(shard.tensor)))
        return out
    return [LocalPiece(0, 0, as_2d(st))]


def global_shape(st: torch.Tensor) -> tuple[int, int]:
    size = list(st.size()) + [1]
    return int(size[0]), int(size[1])


def placement_signature(st: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """(row, col, rows, cols, rank) of every shard: equal signatures mean equal layouts."""
    if not hasattr(st, "metadata"):
        r, c = global_shape(st)
        return ((0, 0, r, c, -1),)
    sig = []
    for m in st.metadata().shards_metadata:  # type: ignore[attr-defined]
        offs = list(m.shard_offsets) + [0]
        sizes = list(m.shard_sizes) + [1]
        rank = m.placement.rank() if m.placement is not None else -1
        sig.append((int(offs[0]), int(offs[1]), int(sizes[0]), int(sizes[1]), int(rank)))
    return tuple(sorted(sig))


def columns_are_local(st: torch.Tensor) -> bool:
    """True when every shard spans all columns (TW, RW): column ops need no communication."""
    _, cols = global_shape(st)
    return all(c == 0 and w == cols for _, c, _, w, _ in placement_signature(st))


def _row_chunks(rows: int, cols: int, itemsize: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(1, cols * itemsize))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _intersect(piece: LocalPiece, r0: int, r1: int, c0: int, c1: int) -> tuple[slice, slice, slice, slice] | None:
    pr0, pc0 = piece.row, piece.col
    pr1, pc1 = pr0 + piece.tensor.shape[0], pc0 + piece.tensor.shape[1]
    a0, a1, b0, b1 = max(r0, pr0), min(r1, pr1), max(c0, pc0), min(c1, pc1)
    if a0 >= a1 or b0 >= b1:
        return None
    return (
        slice(a0 - r0, a1 - r0),
        slice(b0 - c0, b1 - c0),
        slice(a0 - pr0, a1 - pr0),
        slice(b0 - pc0, b1 - pc0),
    )


def _all_reduce(buf: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(buf, group=group)


@torch.no_grad()
def copy_block(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_cols: list[int],
    dst_cols: list[int],
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> int:
    """Copy columns ``src_cols`` of ``src`` onto ``dst_cols`` of ``dst`` (same row count).

    ``src`` and ``dst`` may be different ShardedTensors (re-plan) or the same one (a
    column move). Returns the bytes that went through the all-reduce (0 when local).
    Every rank must call this with the same arguments in the same order.
    """
    rows, _ = global_shape(src)
    if global_shape(dst)[0] != rows:
        raise ValueError(f"copy_block: row counts differ ({rows} vs {global_shape(dst)[0]})")
    if len(src_cols) != len(dst_cols):
        raise ValueError("copy_block: column lists differ in length")
    if not src_cols:
        return 0
    same_layout = placement_signature(src) == placement_signature(dst)
    if same_layout and (src_cols == dst_cols or columns_are_local(src)):
        # Every element's owner is the same rank in src and dst: no communication.
        dst_by_origin = {(p.row, p.col): p for p in local_pieces(dst)}
        for ps in local_pieces(src):
            _copy_local(ps, dst_by_origin[(ps.row, ps.col)], src_cols, dst_cols)
        return 0
    pieces_src = local_pieces(src)
    pieces_dst = local_pieces(dst)
    dtype = pieces_src[0].tensor.dtype if pieces_src else torch.float32
    dev = device or (pieces_src[0].tensor.device if pieces_src else torch.device("cpu"))
    moved = 0
    ncols = len(src_cols)
    src_idx = torch.tensor(src_cols, dtype=torch.int64)
    for r0, r1 in _row_chunks(rows, ncols, torch.finfo(dtype).bits // 8):
        buf = torch.zeros(r1 - r0, ncols, dtype=dtype, device=dev)
        for p in pieces_src:
            for j, c in enumerate(src_idx.tolist()):
                hit = _intersect(p, r0, r1, c, c + 1)
                if hit is not None:
                    br, _, pr, pc = hit
                    buf[br, j : j + 1] = p.tensor[pr, pc]
        _all_reduce(buf, group)
        moved += buf.numel() * buf.element_size()
        for p in pieces_dst:
            for j, c in enumerate(dst_cols):
                hit = _intersect(p, r0, r1, c, c + 1)
                if hit is not None:
                    br, _, pr, pc = hit
                    p.tensor[pr, pc] = buf[br, j : j + 1]
    return moved


def _copy_local(ps: LocalPiece, pd: LocalPiece, src_cols: list[int], dst_cols: list[int]) -> None:
    """Column copy inside one rank's pieces (pieces cover the same global region)."""
    for cs, cd in zip(src_cols, dst_cols):
        ls, ld = cs - ps.col, cd - pd.col
        if 0 <= ls < ps.tensor.shape[1] and 0 <= ld < pd.tensor.shape[1]:
            pd.tensor[:, ld] = ps.tensor[:, ls]


@torch.no_grad()
def fill_columns(st: torch.Tensor, cols: list[int], std: float | None) -> None:
    """Re-draw (``std``) or zero (``None``) the given global columns where this rank owns them."""
    for p in local_pieces(st):
        local = [c - p.col for c in cols if 0 <= c - p.col < p.tensor.shape[1]]
        if not local:
            continue
        view = p.tensor[:, local]
        if std is None:
            view.zero_()
        else:
            view.normal_(0.0, std)
        p.tensor[:, local] = view
