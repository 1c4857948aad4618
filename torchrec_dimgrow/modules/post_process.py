"""``DimGrowPostProcess``: the dense half of a DimGrow collection (dims, gates, alignment).

It takes the KeyedTensor of the collection's plain EBC (every table at its capacity), keeps
the first ``dim`` columns of each table, applies the ShuffleGate mixing and aligns the widths
(``"raw"``, zero-``"pad"`` or learned ``"project"``ion). It holds no sharded module, so it
survives sharding untouched (DDP replicates it) and pipelines may run it as an opaque leaf.
:class:`~torchrec_dimgrow.modules.collection.DimGrowEmbeddingBagCollection` composes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_dimgrow.config import AlignMode, DimGrowConfig
from torchrec_dimgrow.modules.feature_groups import FeatureGroups
from torchrec_dimgrow.modules.shuffle_gate import (
    NoiseFn,
    ShuffleGate,
    feature_project,
    shuffle_mix,
    shuffle_noise,
    shuffle_project,
)
from torchrec_dimgrow.policy import capacity_for

AUTO_EMA = 0.99
"""EMA factor of the per-gate task gradient the auto penalty follows: about 100 gate steps,
long enough to average out batch noise, short enough to follow the gates as they move."""


@dataclass
class _Layout:
    """Where the active columns are, for one (dims, lookup layout) pair; built once, reused.

    ``select``: columns of the lookup's values to keep, in feature order (``None`` when that
    is all of them in order: every table at capacity). ``col_t``/``col_s``: table and slot of
    each kept column. ``slot_rows``: row of each kept column in the ``F x d x w`` projection
    seen as ``(F * d) x w`` (feature * d + slot); ``pad_rows`` the same, ``None`` when that
    is every row (all features at ``d`` slots: the active columns need no padding).
    ``pad_cols``: its column in the zero-padded output. ``stacked``: every feature has the same output width (one batched matmul).
    """

    select: torch.Tensor | None
    col_t: torch.Tensor
    col_s: torch.Tensor
    slot_rows: torch.Tensor
    pad_rows: torch.Tensor | None
    pad_cols: torch.Tensor
    feature_dims: list[int]
    stacked: bool

    @staticmethod
    def build(
        post: DimGrowPostProcess, keys: list[str], lengths: list[int], dims: list[int], device: torch.device
    ) -> _Layout:
        offsets: dict[str, int] = {}
        start = 0
        for k, n in zip(keys, lengths):
            offsets[k] = start
            start += n
        missing = [f for f in post.feature_names if f not in offsets]
        if missing:
            raise KeyError(f"DimGrowPostProcess: the lookup has no output for features {missing}")
        feature_dims = [dims[t] for t in post.feature_tables]
        select = [offsets[f] + k for f, d in zip(post.feature_names, feature_dims) for k in range(d)]
        stacked = post.projection is not None and len(set(post.out_dims)) == 1
        d_stack = post.projection.shape[1] if post.projection is not None else 0
        pad_starts = [sum(post.out_dims[:i]) for i in range(len(post.out_dims))]
        slot_rows = [i * d_stack + k for i, d in enumerate(feature_dims) for k in range(d)]

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return _Layout(
            select=None if select == list(range(start)) else tensor(select),
            col_t=tensor([t for t, d in zip(post.feature_tables, feature_dims) for _ in range(d)]),
            col_s=tensor([k for d in feature_dims for k in range(d)]),
            slot_rows=tensor(slot_rows),
            pad_rows=None if slot_rows == list(range(len(feature_dims) * d_stack)) else tensor(slot_rows),
            pad_cols=tensor([s0 + k for s0, d in zip(pad_starts, feature_dims) for k in range(d)]),
            feature_dims=feature_dims,
            stacked=stacked,
        )


class DimGrowPostProcess(nn.Module):
    """Dense half of the collection: logical dims, gates, alignment.

    Kept separate from the sharded lookup so that it survives sharding untouched (DDP
    replicates it) and so pipelines may run it as an opaque leaf.
    """

    dims: torch.Tensor
    capacity: torch.Tensor
    penalty_scale: torch.Tensor
    task_grad_ema: torch.Tensor
    table_rows: torch.Tensor

    def __init__(
        self,
        table_names: list[str],
        feature_tables: list[int],
        feature_names: list[str],
        out_dims: list[int],
        d_max: list[int],
        config: DimGrowConfig,
        align: AlignMode,
        table_rows: list[int] | None = None,
        initial: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.align: AlignMode = align
        self.table_names = list(table_names)
        self.feature_names = list(feature_names)
        self.feature_tables = list(feature_tables)
        self.out_dims = list(out_dims)
        self.d_max = list(d_max)
        n = len(table_names)
        self.gate = ShuffleGate(n, max(d_max), config.tau)
        if initial is None:
            initial = [min(config.initial_dim or 1, m) for m in d_max]
        # The dims the search started from.
        self.start_dims = list(initial)
        self.register_buffer("dims", torch.tensor(initial, dtype=torch.int64))
        self.register_buffer(
            "capacity", torch.tensor([capacity_for(d, 0, config) for d in initial], dtype=torch.int64)
        )
        # ``penalty_scale`` is the coefficient of mean(g/k); "auto" mode rewrites it every gate step.
        # "auto" starts at 0 and follows the observed task gradient: starting it at alpha
        # would hit fresh gates with an arbitrary first step that Adam's second moment then
        # remembers for hundreds of steps (every gate drifts down together in epoch 0).
        initial_scale = float(config.penalty_alpha) if config.rule.penalty_mode == "fixed" else 0.0
        self.register_buffer("penalty_scale", torch.tensor(initial_scale))
        self.register_buffer("task_grad_ema", torch.zeros(n, max(d_max)))
        rows = table_rows if table_rows is not None else [1] * n
        if len(rows) != n or min(rows) < 1:
            raise ValueError(f"DimGrowPostProcess: need one row count >= 1 per table, got {rows}")
        self.register_buffer("table_rows", torch.tensor(rows, dtype=torch.float32))
        # All per-feature projections in one F x max(d_max) x max(width) parameter (feature i
        # uses the block [i, :d_max, :width_i]): one optimizer entry and one gradient instead
        # of F small ones, and the summed forward indexes its rows without stacking.
        self.projection: nn.Parameter | None = None
        if align == "project":
            slots = max(d_max[t] for t in feature_tables)
            w = torch.empty(len(feature_tables), slots, max(out_dims))
            self.projection = nn.Parameter(w.normal_(0.0, config.init_std))
        self.register_load_state_dict_pre_hook(_stack_old_projections)
        # Set by DimGrowEmbeddingBagCollection.gate_step(): the lookup output is detached so
        # the gate (validation) step never reaches the tables or their fused optimizer.
        self.freeze_lookup = False
        # Gates out of the forward (the raw columns, in training and eval): the search's
        # learn-first epochs (``recipes/search_loop.py``), where there is nothing to judge yet.
        self.gates_bypassed = False
        # Whether a training backward computes the gates' gradient. Only the single-loader
        # gate update reads it; the DARTS-style gate step clears it and takes its own on a
        # validation batch, so there it is a batch-sized product and reduction thrown away
        # (set by ``DimGrowController.step`` from the mode it is driven in). Off, the
        # gates still get a (zero) gradient: DDP with a static graph expects one.
        self.training_gate_grad = True
        # Optional maker of the training noise on the summed path (``shuffle_project``'s
        # ``noise_fn``): the online recipe shuffles the global batch across ranks with it.
        self.noise_fn: NoiseFn | None = None
        self._cache_key: tuple[int, ...] = ()
        self._cols: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # Host copy of ``dims`` and the buffer's version counter when it was taken: the
        # forward reads dims every step, and ``dims.tolist()`` on an accelerator is a
        # host-device sync. Refreshed only when the buffer was written in place since.
        self._host_dims: tuple[int, list[int]] = (self.dims._version, list(initial))
        self._layout_key: tuple[object, ...] = ()
        self._layout: _Layout | None = None

    # ----------------------------------------------------------------- state access
    def dims_list(self) -> list[int]:
        """Current logical dims, from the host cache (no device read unless ``dims`` was written)."""
        version, dims = self._host_dims
        if version != self.dims._version:
            dims = [int(v) for v in self.dims.tolist()]
            self._host_dims = (self.dims._version, dims)
        return list(dims)

    def set_dims(self, dims: Sequence[int]) -> None:
        """Write the logical dims (buffer and host cache together, so no later read syncs)."""
        self.dims.copy_(torch.tensor(list(dims), dtype=torch.int64))
        self._host_dims = (self.dims._version, [int(d) for d in dims])

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DimGrowPostProcess:
        # A device move or dtype cast replaces the buffer (new version counter) but never
        # changes its integer values: carry the host copy over instead of re-reading it.
        _, dims = self._host_dims
        in_sync = self._host_dims[0] == self.dims._version
        out = super()._apply(fn, recurse)
        if in_sync:
            self._host_dims = (self.dims._version, dims)
        return out  # type: ignore[return-value]

    def capacity_list(self) -> list[int]:
        return [int(v) for v in self.capacity.tolist()]

    def _index(
        self, dims_list: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(table, slot) of every active output column and every active table slot."""
        dims = tuple(self.dims_list() if dims_list is None else dims_list)
        if self._cols is None or self._cache_key != dims or self._cols[0].device != self.dims.device:
            dev = self.dims.device
            col_t = [t for t in self.feature_tables for _ in range(dims[t])]
            col_s = [k for t in self.feature_tables for k in range(dims[t])]
            tab_t = [t for t in range(len(dims)) for _ in range(dims[t])]
            tab_s = [k for t in range(len(dims)) for k in range(dims[t])]
            self._cols = tuple(
                torch.tensor(v, dtype=torch.int64, device=dev) for v in (col_t, col_s, tab_t, tab_s)
            )  # type: ignore[assignment]
            self._cache_key = dims
        assert self._cols is not None
        return self._cols

    def output_dims(self, dims_list: list[int] | None = None) -> list[int]:
        """Width of each output feature (logical dim in raw mode, configured width else)."""
        if self.align == "raw":
            dims = self.dims_list() if dims_list is None else dims_list
            return [dims[t] for t in self.feature_tables]
        return list(self.out_dims)

    # ----------------------------------------------------------------- forward
    def mixing_mode(self) -> str:
        if self.gates_bypassed:
            return "off"
        return "shuffle" if self.training else self.config.rule.eval_mixing

    def _layout_for(self, pooled: KeyedTensor, dims: list[int]) -> _Layout:
        """Index tensors of the active columns for this lookup layout, cached across steps."""
        keys, lengths = pooled.keys(), pooled.length_per_key()
        key = (tuple(dims), tuple(keys), tuple(lengths), pooled.values().device)
        if self._layout is None or self._layout_key != key:
            self._layout = _Layout.build(self, keys, lengths, dims, pooled.values().device)
            self._layout_key = key
        return self._layout

    def _active(self, pooled: KeyedTensor) -> tuple[torch.Tensor, torch.Tensor, _Layout, list[int]]:
        """The active columns of every feature (B x sum of dims) and their gate values.

        One ``index_select`` picks them out of the lookup (none at all when every table
        sits exactly at capacity, the usual case with ``capacity_block`` 4 and dims 4/8/16).
        """
        dims = self.dims_list()
        lay = self._layout_for(pooled, dims)
        x = pooled.values()
        if lay.select is not None:
            x = x.index_select(1, lay.select)
        if self.freeze_lookup:
            x = x.detach()
        g = self.gate.column_gates(lay.col_t, lay.col_s)
        if self.gates_bypassed and torch.is_grad_enabled():
            # The gates stay in the graph with a zero gradient: DDP (static graph) expects
            # every parameter it wraps to take part in each backward.
            x = x + 0.0 * g.sum()
        return x, g, lay, dims

    def _projection_rows(self, lay: _Layout) -> torch.Tensor:
        """``concat_f(W_f[:dim_f])``: the projection rows of every active column, in column order."""
        assert self.projection is not None
        return self.projection.flatten(0, 1).index_select(0, lay.slot_rows)

    def _gate_grad(self) -> bool:
        """Whether this forward's backward must compute the gates' gradient (see ``__init__``)."""
        return self.freeze_lookup or self.training_gate_grad

    def forward(self, pooled: KeyedTensor, groups: FeatureGroups | None = None) -> KeyedTensor:
        """Per-feature outputs; with ``groups``, summed into one output per group."""
        if groups is not None and groups.features != self.feature_names:
            raise KeyError(
                f"DimGrowPostProcess: groups over {groups.features}, features are {self.feature_names}"
            )
        x, g, lay, dims = self._active(pooled)
        mode = self.mixing_mode()
        if self.align == "project" and lay.stacked and mode == "shuffle":
            # Training at one common width: mixing, padding, the batched matmul and the
            # group sum in one node.
            assert self.projection is not None
            y = feature_project(
                x,
                g,
                self.projection,
                lay.pad_rows,
                weight_grad=not self.freeze_lookup,
                gate_grad=self._gate_grad(),
                groups=None if groups is None else groups.index(x.device),
                n_groups=0 if groups is None else len(groups.groups),
            )
            if groups is not None:
                widths = [self.out_dims[0]] * len(groups.groups)
                return KeyedTensor(keys=groups.groups, length_per_key=widths, values=y)
            return KeyedTensor(keys=self.feature_names, length_per_key=self.output_dims(dims), values=y)
        out = self._aligned(x, g, lay, dims, mode)
        return out if groups is None else groups.sum(out)

    def _aligned(
        self, x: torch.Tensor, g: torch.Tensor, lay: _Layout, dims: list[int], mode: str
    ) -> KeyedTensor:
        """Mixed and aligned per-feature outputs, one op at a time (eval, ``"pad"``, ``"raw"``, mixed widths)."""
        y = shuffle_mix(x, g, mode, gate_grad=self._gate_grad())
        width = sum(self.out_dims)
        if self.align == "pad":
            y = y.new_zeros(y.shape[0], width).index_copy(1, lay.pad_cols, y)
        elif self.align == "project":
            y = self._project_per_feature(y, lay)
        return KeyedTensor(keys=self.feature_names, length_per_key=self.output_dims(dims), values=y)

    def _project_per_feature(self, y: torch.Tensor, lay: _Layout) -> torch.Tensor:
        """Each feature's active columns times its own projection (DLRM needs them apart).

        With one common shape, a single batched matmul over the features (inactive slots
        are zero rows of the padded input); otherwise one matmul per feature.
        """
        weights = self.projection
        assert weights is not None
        if not lay.stacked:
            parts = y.split(lay.feature_dims, dim=1)
            blocks = [p @ weights[i, : p.shape[1], :w] for i, (p, w) in enumerate(zip(parts, self.out_dims))]
            return torch.cat(blocks, dim=1)
        n_feat, d, w = weights.shape
        padded = (
            y if lay.pad_rows is None else y.new_zeros(y.shape[0], n_feat * d).index_copy(1, lay.pad_rows, y)
        )
        out = torch.bmm(padded.view(-1, n_feat, d).transpose(0, 1), weights)  # F x B x w
        return out.transpose(0, 1).reshape(y.shape[0], n_feat * w)

    def summed(self, pooled: KeyedTensor) -> torch.Tensor:
        """Sum over features of the aligned outputs (B x common width), without building them.

        What a consumer that sums per-feature projections needs (the reference's adapter
        ``concat(x_f) @ concat(W_f)``). With ``align="project"`` the gates are folded into
        the concatenated projection rows ``W`` (C x width)::

            (g * x + (1 - g) * noise) @ W

        Training (``"shuffle"``): :func:`shuffle_project`, one matmul forward and the two a
        plain ``x @ W`` needs backward, plus a few batch-sized elementwise passes. In a
        gate step (lookups detached) the projection's gradient would be discarded, so its
        matmul is skipped (it reads zero). In ``eval`` "mean"
        mode the gates are folded into the rows, ``x @ (g W) + mean @ ((1 - g) W)`` (the
        noise term is one row). With ``"pad"`` the mixed columns are added into place (one
        ``index_add``). Never materialises the B x F x width per-feature outputs.
        """
        if self.align == "raw" or len(set(self.out_dims)) != 1:
            raise ValueError(
                "DimGrowPostProcess.summed needs align='pad' or 'project' with one common width, "
                f"got align={self.align!r} and widths {sorted(set(self.out_dims))}"
            )
        x, g, lay, _ = self._active(pooled)
        mode = self.mixing_mode()
        if self.align == "pad":
            y = shuffle_mix(x, g, mode, gate_grad=self._gate_grad())
            return y.new_zeros(y.shape[0], self.out_dims[0]).index_add(1, lay.col_s, y)
        rows = self._projection_rows(lay)
        if mode == "off":
            return x @ rows
        if mode == "shuffle":
            return shuffle_project(
                x,
                g,
                rows,
                weight_grad=not self.freeze_lookup,
                noise_fn=self.noise_fn,
                gate_grad=self._gate_grad(),
            )
        noise = shuffle_noise(x, mode)
        return x @ (g.unsqueeze(1) * rows) + noise @ ((1.0 - g).unsqueeze(1) * rows)

    def table_weights(self, tab_t: torch.Tensor) -> torch.Tensor | None:
        """Per-table penalty weight (``SearchRule.penalty_weighting="bytes"``), mean 1 over active slots.

        Normalising over the active slots (not over tables) keeps ``alpha`` meaning the
        same average bar as the uniform penalty; only the split between tables changes.
        """
        if self.config.rule.penalty_weighting == "uniform" or tab_t.numel() == 0:
            return None
        rows = self.table_rows
        return rows / rows[tab_t].mean()

    def penalty(self) -> torch.Tensor:
        """Scaled decaying-L1 gate penalty, ``penalty_scale * mean_active(w_t * g / k)``."""
        _, _, tab_t, tab_s = self._index()
        return self.penalty_scale * self.gate.penalty(tab_t, tab_s, self.table_weights(tab_t))

    # ----------------------------------------------------------------- auto penalty
    @torch.no_grad()
    def observe_task_gradient(self, theta_grad_with_penalty: torch.Tensor) -> None:
        """Update the "auto" penalty scale from the gate gradient of the last gate step.

        The penalty's own share of ``theta.grad`` is known in closed form, so the task
        share is recovered without a second backward. Per gate we track an EMA of the
        task gradient with respect to g (``dL/dtheta / (tau g (1-g))``); the scale is
        set so that the penalty's pull on a slot-k gate is ``alpha / k`` times the mean
        absolute EMA over active gates.
        """
        cfg = self.config
        _, _, tab_t, tab_s = self._index()
        if tab_t.numel() == 0:
            return
        g = self.gate.column_gates(tab_t, tab_s)
        dg_dtheta = cfg.tau * g * (1.0 - g)
        k = tab_s.to(g.dtype) + 1.0
        n = float(tab_t.numel())
        weights = self.table_weights(tab_t)
        w = weights[tab_t] if weights is not None else torch.ones_like(g)
        penalty_grad = self.penalty_scale * w * dg_dtheta / (k * n)
        task = theta_grad_with_penalty[tab_t, tab_s] - penalty_grad
        task_g = task / dg_dtheta.clamp_min(1e-4)
        ema = self.task_grad_ema
        ema[tab_t, tab_s] = AUTO_EMA * ema[tab_t, tab_s] + (1 - AUTO_EMA) * task_g
        if cfg.rule.penalty_mode == "auto":
            # In float64 then stored: the same value as ``alpha * n * float(mean)``, without
            # the host read (a device sync on an accelerator) that ``float()`` would be.
            mean = ema[tab_t, tab_s].abs().mean().double()
            self.penalty_scale.copy_(mean * (cfg.penalty_alpha * n))

    # ----------------------------------------------------------------- slot moves
    @torch.no_grad()
    def move_slot(self, table: int, src: int, dst: int) -> None:
        self.gate.move_slot(table, src, dst)
        self.task_grad_ema[table, dst] = self.task_grad_ema[table, src]
        if self.projection is not None:
            for i, t in enumerate(self.feature_tables):
                if t == table:
                    self.projection[i, dst] = self.projection[i, src]

    @torch.no_grad()
    def reset_gate_state(self) -> None:
        """Every gate logit back to its start (``g = 0.5``), the auto penalty back to its start.

        What a search that starts learn-first epochs needs: when it judges afterwards, the
        gates and the penalty's task-gradient average hold no evidence from before.
        """
        self.gate.theta.fill_(self.gate.theta_init)
        self.task_grad_ema.zero_()
        if self.config.rule.penalty_mode != "fixed":
            self.penalty_scale.zero_()

    @torch.no_grad()
    def reset_slot(self, table: int, slot: int) -> None:
        self.gate.reset_slots(table, [slot])
        self.task_grad_ema[table, slot] = 0.0
        if self.projection is not None:
            for i, t in enumerate(self.feature_tables):
                if t == table:
                    self.projection[i, slot].normal_(0.0, self.config.init_std)

    def dense_slot_params(self, table: int) -> list[tuple[nn.Parameter, int]]:
        """``(param, i)`` pairs whose slice ``param[i, slot]`` follows slot ``slot`` of ``table``.

        Row ``table`` of the gate logits, and block ``i`` of the projection for every
        feature ``i`` that reads the table (its slot rows).
        """
        out: list[tuple[nn.Parameter, int]] = [(self.gate.theta, table)]
        if self.projection is not None:
            out += [(self.projection, i) for i, t in enumerate(self.feature_tables) if t == table]
        return out


def _stack_old_projections(
    module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: object
) -> None:
    """Load state dicts written before the projections were one parameter (``projections.<i>``)."""
    old = sorted(
        (k for k in state_dict if k.startswith(prefix + "projections.")),
        key=lambda k: int(k.rsplit(".", 1)[1]),
    )
    target = getattr(module, "projection", None)
    if not old or target is None:
        return
    stacked = torch.zeros_like(target)
    for i, key in enumerate(old):
        w = state_dict.pop(key)
        stacked[i, : w.shape[0], : w.shape[1]] = w
    state_dict[prefix + "projection"] = stacked
