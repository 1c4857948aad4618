"""ShuffleGate (arXiv 2503.09315) applied per (field, dimension slot), as DimGrow does.

Each active embedding column ``x[:, c]`` is mixed with the same column permuted across the
batch: ``g * x + (1 - g) * stopgrad(shuffle(x))`` with ``g = sigmoid(tau * theta)``. The
shuffled copy keeps the column's marginal distribution but destroys its link to the label,
so a gate is pushed open exactly as far as its column carries signal. Each column gets its
own permutation (DimGrow), unlike ShuffleGate v1 which shares one per field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def _shuffle_order(
    rows: int, cols: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Rows to gather for :func:`column_shuffle`: ``sigma`` repeated to ``rows + cols - 1`` entries."""
    sigma = torch.randperm(rows, device=device, generator=generator)
    need = rows + cols - 1
    if need > 2 * rows:
        return sigma.repeat(-(-need // rows))[:need]
    return torch.cat([sigma, sigma[: cols - 1]])


def column_shuffle(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Permute the rows of every column of ``x`` (B x C), each column by its own permutation.

    Column ``c`` is permuted by ``b -> sigma((b + c) mod B)``: one uniformly random row
    permutation ``sigma`` shared by all columns, composed with a cyclic shift by the column
    index. Each column's permutation is therefore uniformly random (a fixed bijection after
    a uniform one), and the ``C`` columns of a row draw their noise from ``C`` different
    rows (while ``C <= B``), as independent permutations would up to chance collisions.

    Why not ``C`` independent permutations: drawing them (``C`` ``randperm`` calls, or a sort
    of ``B x C`` uniform noise) and gathering ``B x C`` scattered elements was the largest
    cost of a DimGrow step (~15 ms of a 40 ms Criteo-shaped step). Here the work is one
    ``randperm(B)``, one gather of ``B + C - 1`` whole rows and one strided copy: the
    element ``(b, c)`` of the result is ``ext[b + c, c]``, a fixed-stride view of the
    gathered rows. No host sync, the same code on any device.

    ``out`` (row-major, B x C) receives the result instead of a fresh tensor.
    """
    if x.dim() != 2:
        raise ValueError(f"column_shuffle expects a 2-D (batch x columns) tensor, got {tuple(x.shape)}")
    rows, cols = x.shape
    if cols == 0 or rows <= 1:
        return x if out is None else out.copy_(x)
    ext = x.index_select(0, _shuffle_order(rows, cols, x.device, generator)).contiguous()
    skewed = ext.as_strided((rows, cols), (cols, cols + 1))
    return skewed.contiguous() if out is None else out.copy_(skewed)


def shuffle_noise(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise copy of ``x`` (gradient stopped): shuffled columns, or the batch mean (1 x C)."""
    if mode == "shuffle":
        return column_shuffle(x.detach(), generator)
    if mode == "mean":
        return x.detach().mean(dim=0, keepdim=True)
    raise ValueError(f"unknown mixing mode {mode!r}")


def shuffle_mix(
    x: torch.Tensor,
    g: torch.Tensor,
    mode: str = "shuffle",
    generator: torch.Generator | None = None,
    gate_grad: bool = True,
) -> torch.Tensor:
    """Mix columns of ``x`` (B x C) with their noise copies using gates ``g`` (C).

    ``mode``: ``"shuffle"`` (training: a fresh per-column permutation, gradient stopped),
    ``"mean"`` (the expectation of the shuffled copy, the batch mean: deterministic),
    ``"off"`` (identity: the raw columns). ``gate_grad=False``: ``g`` gets a zero gradient
    without its batch-sized reduction (see :func:`shuffle_project`).
    """
    if mode == "off":
        return x
    noise = shuffle_noise(x, mode, generator)
    if torch.is_grad_enabled() and (x.requires_grad or g.requires_grad):
        return _GateMix.apply(x, noise, g, gate_grad)
    return torch.lerp(noise, x, g)


class _GateMix(torch.autograd.Function):
    """``g * x + (1 - g) * noise`` with a hand-written backward (``noise`` gets no gradient).

    The forward is one fused ``lerp`` (exact at ``g`` = 0 and 1). Autograd's own ``lerp``
    backward reduces the gate gradient over the batch through a slow generic path (~10x
    the two plain ops used here: ``grad * g`` and ``sum_b(grad * (x - noise))``), and the
    three-op form saves two batch-sized tensors; this saves one, ``x - noise``.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, noise: torch.Tensor, g: torch.Tensor, gate_grad: bool
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x - noise if gate_grad else None, g)
        return torch.lerp(noise, x, g)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:  # type: ignore[override]
        diff, g = ctx.saved_tensors
        grad_x = grad * g if ctx.needs_input_grad[0] else None
        grad_g = None
        if ctx.needs_input_grad[2]:
            if diff is None:
                grad_g = torch.zeros_like(g)
            else:
                grad_g = (grad * diff).sum(0)
                if g.dim() == 0:
                    grad_g = grad_g.sum()
        return grad_x, None, grad_g, None


def shuffle_project(
    x: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor,
    generator: torch.Generator | None = None,
    weight_grad: bool = True,
    noise_fn: NoiseFn | None = None,
    gate_grad: bool = True,
) -> torch.Tensor:
    """``(g * x + (1 - g) * stopgrad(column_shuffle(x))) @ weight``: mixing and projection fused.

    ``x`` is B x C, ``g`` has C gates, ``weight`` is C x width. The same values as
    ``shuffle_mix(x, g) @ weight`` (the same random draws, so the same shuffle). The point
    is what it does *not* do: the backward needs exactly the two matmuls a plain
    ``x @ W`` needs (the gradient of the mixed columns and of ``weight``) plus two
    batch-sized elementwise passes, ``grad_x = grad_mixed * g`` and
    ``grad_g = sum_b grad_mixed * (x - noise)``; the shuffled copy gets no gradient.

    ``weight_grad=False`` reports a zero gradient for ``weight`` without computing it (a
    matmul saved), for a backward whose weight gradient the caller discards anyway (the
    DimGrow gate step). A zero rather than none: DDP with a static graph expects every
    parameter to receive a gradient in every backward. ``gate_grad=False`` does the same for
    ``g`` (no ``x - noise`` is kept, no batch-sized reduction): a training backward whose
    gate gradient the DARTS-style gate step would drop unread.

    ``noise_fn`` (default :func:`column_shuffle` with ``generator``) makes the shuffled copy
    instead: it takes ``x`` (no gradient is taken through it) and returns a fresh B x C
    tensor, e.g. a shuffle of the global batch across ranks (the online recipe's
    world-size-invariant noise).
    """
    return _ShuffleProject.apply(x, g, weight, generator, weight_grad, noise_fn, gate_grad)


class _ShuffleProject(torch.autograd.Function):
    """Forward: the noise (one gather, one skewed copy), ``x - noise``, an in-place ``lerp``
    turning the noise buffer into the mixed columns, one matmul. Saves ``x - noise`` and the
    mixed columns (two B x C tensors). The noise is built inside the function, so it is no
    graph node: no gradient can flow into the shuffled copy.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        g: torch.Tensor,
        weight: torch.Tensor,
        generator: torch.Generator | None,
        weight_grad: bool,
        noise_fn: NoiseFn | None = None,
        gate_grad: bool = True,
    ) -> torch.Tensor:
        x = x.contiguous()
        if noise_fn is not None:
            mixed = noise_fn(x).contiguous()  # the noise, for now
        else:
            mixed = column_shuffle(x, generator, out=torch.empty_like(x))
        # ``x - noise`` is only read by the gate gradient (not needed under no_grad).
        diff = x - mixed if ctx.needs_input_grad[1] and gate_grad else None
        mixed.lerp_(x, g)  # noise + g * (x - noise), exact at g = 0 and 1
        ctx.save_for_backward(diff, g, weight, mixed)
        ctx.weight_grad = weight_grad
        return mixed @ weight

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        diff, g, weight, mixed = ctx.saved_tensors
        need_x, need_g, need_w = ctx.needs_input_grad[:3]
        grad_x = grad_g = grad_w = None
        if need_g and diff is None:  # ``gate_grad=False``
            need_g, grad_g = False, torch.zeros_like(g)
        if need_w:
            grad_w = mixed.t() @ grad if ctx.weight_grad else torch.zeros_like(weight)
        if need_x:
            grad_mixed = grad @ weight.t()
            if need_g:
                grad_g = (diff * grad_mixed).sum(0)
            grad_x = grad_mixed.mul_(g)  # our own temporary, handed on: scaled in place
        elif need_g:
            # Lookups detached (the gate step): sum_b (grad W^T) * diff = rowsum(W * (diff^T grad)),
            # the same matmul work without writing or reading any batch-sized tensor.
            grad_g = ((diff.t() @ grad) * weight).sum(1)
        return grad_x, grad_g, grad_w, None, None, None, None


def feature_project(
    x: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor,
    slot_rows: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    weight_grad: bool = True,
    gate_grad: bool = True,
    groups: torch.Tensor | None = None,
    n_groups: int = 0,
) -> torch.Tensor:
    """Per-feature :func:`shuffle_project`: the mixed columns of feature ``f`` times ``weight[f]``.

    ``x`` is B x C (the active columns, feature by feature), ``g`` has C gates, ``weight`` is
    F x d x w; ``slot_rows`` places column ``c`` at row ``f * d + slot`` of the padded B x F*d
    input (``None``: every feature has all ``d`` slots, so ``x`` is that input already). The
    result is B x F*w, feature ``f`` at columns ``f*w:(f+1)*w``: the same values as
    ``shuffle_mix(x, g)`` zero-padded and multiplied by one batched matmul (the same random
    draws). One autograd node instead of four (mix, pad, matmul, layout copy); the backward
    is the two batched matmuls of a plain one plus the two elementwise passes of the mixing,
    and with ``weight_grad=False`` (a gate step: the caller discards it) the weight's
    gradient reads zero without its matmul and, with ``x`` detached, the gate gradient is
    ``sum_k (diff_f^T grad_f) * W_f`` (no batch-sized gradient of the mixed columns).
    ``gate_grad=False`` reads a zero gate gradient, as in :func:`shuffle_project`.
    ``groups`` (F group indices, ``n_groups`` groups) sums the projected features of each
    group (a field's frequency blocks): the result is B x n_groups*w, added over whole
    feature-major slabs before the one layout copy.
    """
    return _FeatureProject.apply(x, g, weight, slot_rows, generator, weight_grad, gate_grad, groups, n_groups)


def _feature_major(t: torch.Tensor, n_feat: int) -> torch.Tensor:
    """B x (F * k) -> F x B x k, copied contiguous: the layout a batched matmul over features
    reads fastest on a CPU (a strided view costs it more than this copy, ~1 ms at 2048 x 624)."""
    return t.view(t.shape[0], n_feat, -1).transpose(0, 1).contiguous()


def _batch_major(t: torch.Tensor) -> torch.Tensor:
    """F x B x k -> B x (F * k), row-major: what a KeyedTensor's consumer and the lookup's
    backward expect (a column-major result would make every later elementwise op strided)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


class _FeatureProject(torch.autograd.Function):
    """Every batch-sized tensor in and out is row-major: the output, the gradient handed to
    the lookup, and the saved ones. The matmuls read feature-major (F x B x k) copies."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        g: torch.Tensor,
        weight: torch.Tensor,
        slot_rows: torch.Tensor | None,
        generator: torch.Generator | None,
        weight_grad: bool,
        gate_grad: bool = True,
        groups: torch.Tensor | None = None,
        n_groups: int = 0,
    ) -> torch.Tensor:
        x = x.contiguous()
        n_feat, d, w = weight.shape
        batch = x.shape[0]
        mixed = column_shuffle(x, generator, out=torch.empty_like(x))  # the noise, for now
        diff = x - mixed if ctx.needs_input_grad[1] and gate_grad else None
        mixed.lerp_(x, g)  # noise + g * (x - noise), exact at g = 0 and 1
        if slot_rows is not None:
            mixed = mixed.new_zeros(batch, n_feat * d).index_copy_(1, slot_rows, mixed)
        mixed_f = _feature_major(mixed, n_feat)  # F x B x d
        keep = mixed_f if ctx.needs_input_grad[2] and weight_grad else None
        ctx.save_for_backward(diff, g, weight, keep, slot_rows, groups)
        ctx.weight_grad = weight_grad
        out_f = torch.bmm(mixed_f, weight)  # F x B x w
        if groups is not None:
            out_f = out_f.new_zeros(n_groups, batch, w).index_add_(0, groups, out_f)
        return _batch_major(out_f)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad: torch.Tensor
    ) -> tuple[
        torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, None, None, None, None, None, None
    ]:
        diff, g, weight, mixed_f, slot_rows, groups = ctx.saved_tensors
        need_x, need_g, need_w = ctx.needs_input_grad[:3]
        n_feat = weight.shape[0]
        batch = grad.shape[0]
        if groups is None:
            grad_f = _feature_major(grad, n_feat)  # F x B x w
        else:  # every feature of a group gets the group's gradient
            grad_f = _feature_major(grad, grad.shape[1] // weight.shape[2]).index_select(0, groups)
        grad_x = grad_g = grad_w = None
        if need_g and diff is None:  # ``gate_grad=False``
            need_g, grad_g = False, torch.zeros_like(g)
        if need_w:
            grad_w = (
                torch.bmm(mixed_f.transpose(1, 2), grad_f) if ctx.weight_grad else torch.zeros_like(weight)
            )
        if need_x:
            grad_mixed_f = torch.bmm(grad_f, weight.transpose(1, 2))  # F x B x d
            if slot_rows is None and not need_g:
                # The layout copy and the gate scaling in one pass (B x F x d out).
                scale = g.view(n_feat, 1, -1).expand_as(grad_mixed_f).transpose(0, 1)
                out = grad_f.new_empty(batch, n_feat, grad_mixed_f.shape[2])
                grad_x = torch.mul(grad_mixed_f.transpose(0, 1), scale, out=out).view(batch, -1)
            else:
                grad_mixed = _batch_major(grad_mixed_f)  # B x F*d
                if slot_rows is not None:
                    grad_mixed = grad_mixed.index_select(1, slot_rows)
                if need_g:
                    grad_g = (diff * grad_mixed).sum(0)
                grad_x = grad_mixed.mul_(g)
        elif need_g:
            # Lookups detached (the gate step): sum_b diff * (grad_f W_f^T) = rowsum(W_f * (diff_f^T grad_f)),
            # one batched matmul and no batch-sized product.
            if slot_rows is not None:
                diff = diff.new_zeros(batch, n_feat * weight.shape[1]).index_copy_(1, slot_rows, diff)
            per_slot = (torch.bmm(_feature_major(diff, n_feat).transpose(1, 2), grad_f) * weight).sum(2)
            grad_g = per_slot.reshape(-1)
            if slot_rows is not None:
                grad_g = grad_g.index_select(0, slot_rows)
        return grad_x, grad_g, grad_w, None, None, None, None, None, None


class ShuffleGate(nn.Module):
    """Gate logits ``theta`` for ``num_tables`` x ``d_max`` slots.

    Only the first ``dims[t]`` slots of table ``t`` are active; the rest are ignored by
    :meth:`column_gates` and :meth:`penalty`, so an inactive slot costs no gradient.
    """

    def __init__(self, num_tables: int, d_max: int, tau: float = 5.0, theta_init: float = 0.0) -> None:
        super().__init__()
        self.tau = float(tau)
        self.theta_init = float(theta_init)
        self.theta = nn.Parameter(torch.full((num_tables, d_max), float(theta_init)))

    def gates(self) -> torch.Tensor:
        """All gate values ``sigmoid(tau * theta)`` (num_tables x d_max)."""
        return torch.sigmoid(self.tau * self.theta)

    def column_gates(self, col_table: torch.Tensor, col_slot: torch.Tensor) -> torch.Tensor:
        """Gate value of each active column, given its table and 0-based slot index."""
        return torch.sigmoid(self.tau * self.theta[col_table, col_slot])

    def penalty(
        self,
        col_table: torch.Tensor,
        col_slot: torch.Tensor,
        table_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``mean over active (t, k) of w[t] * g[t, k] / k`` with k the 1-based slot index.

        Later slots weigh less, so a field that already earned k dims pays less to keep
        dim k+1 (the DimGrow decaying L1). The mean (not sum) follows the reference code.
        ``table_weight`` (one value per table, default 1) lets a caller charge tables by
        what a column costs them (see ``SearchRule.penalty_weighting``).
        """
        if col_table.numel() == 0:
            return self.theta.sum() * 0.0
        g = self.column_gates(col_table, col_slot)
        weights = 1.0 / (col_slot.to(g.dtype) + 1.0)
        if table_weight is not None:
            weights = weights * table_weight.to(g.dtype)[col_table]
        return (g * weights).mean()

    @torch.no_grad()
    def reset_slots(self, table: int, slots: list[int]) -> None:
        """Put slots back to the initial logit (a slot that is freed starts over)."""
        if slots:
            self.theta[table, slots] = self.theta_init

    @torch.no_grad()
    def move_slot(self, table: int, src: int, dst: int) -> None:
        self.theta[table, dst] = self.theta[table, src]
