"""``DimGrowEmbeddingBagCollection``: an EmbeddingBagCollection whose tables grow.

Layout (composition, after TorchRec's ``FeatureProcessedEmbeddingBagCollection``):

* ``self.ebc``: a plain :class:`torchrec.EmbeddingBagCollection` holding every table at its
  current **capacity** (a multiple of ``capacity_block`` columns). Because it is a stock
  EBC, ``DistributedModelParallel`` shards it with TorchRec's own sharder and planner, the
  planner sees the real widths, and nothing about TorchRec's kernels is re-implemented.
* ``self.post``: a dense module (gates, optional projections, the logical dims). It takes
  the KeyedTensor of ``self.ebc``, keeps the first ``dim`` columns of each table, applies
  the ShuffleGate mixing and aligns the widths. It holds no sharded module, so
  ``TrainPipelineSparseDist``'s tracer treats it as a leaf and the wrapper's ``forward``
  (``post(ebc(features))``) stays fx-traceable.

The logical dim of a table moves one slot at a time; its capacity only moves when the dim
crosses a block edge. The two are separate events (:class:`ChangeReport`): logical changes
never touch storage, capacity changes reallocate (single process) or re-plan (sharded).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_dimgrow.config import AlignMode, BudgetError, DimGrowConfig, resolve_budget
from torchrec_dimgrow.modules.composed import ComposedEmbeddingBagCollection
from torchrec_dimgrow.modules.shuffle_gate import (
    ShuffleGate,
    shuffle_mix,
    shuffle_noise,
    shuffle_project,
)
from torchrec_dimgrow.modules.table_store import LocalTableStore, TableStore
from torchrec_dimgrow.modules.tables import dim_cost, embedding_bytes, normal_init
from torchrec_dimgrow.policy import DimChange, capacity_for, final_dims


@dataclass
class ChangeReport:
    """What one call to :meth:`DimGrowEmbeddingBagCollection.apply_changes` did."""

    dim_changes: list[DimChange] = field(default_factory=list)
    capacity_changes: dict[str, tuple[int, int]] = field(default_factory=dict)
    replan_seconds: float = 0.0
    bytes_moved: int = 0

    @property
    def replanned(self) -> bool:
        return bool(self.capacity_changes)


@dataclass
class _Layout:
    """Where the active columns are, for one (dims, lookup layout) pair; built once, reused.

    ``select``: columns of the lookup's values to keep, in feature order (``None`` when that
    is all of them in order: every table at capacity). ``col_t``/``col_s``: table and slot of
    each kept column. ``slot_rows``: row of each kept column in the ``F x d x w`` projection
    seen as ``(F * d) x w`` (feature * d + slot). ``pad_cols``: its column in the zero-padded
    output. ``stacked``: every feature has the same output width (one batched matmul).
    """

    select: torch.Tensor | None
    col_t: torch.Tensor
    col_s: torch.Tensor
    slot_rows: torch.Tensor
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

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return _Layout(
            select=None if select == list(range(start)) else tensor(select),
            col_t=tensor([t for t, d in zip(post.feature_tables, feature_dims) for _ in range(d)]),
            col_s=tensor([k for d in feature_dims for k in range(d)]),
            slot_rows=tensor([i * d_stack + k for i, d in enumerate(feature_dims) for k in range(d)]),
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
        self.gate = ShuffleGate(n, max(d_max), config.tau, config.theta_init)
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
        initial_scale = float(config.alpha) if config.penalty_mode == "fixed" else 0.0
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
        return "shuffle" if self.training else self.config.eval_mixing

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
        return x, self.gate.column_gates(lay.col_t, lay.col_s), lay, dims

    def _mixed(self, pooled: KeyedTensor) -> tuple[torch.Tensor, _Layout, list[int]]:
        """The active columns gate-mixed with their noise: one shuffle gather, one ``lerp``."""
        x, g, lay, dims = self._active(pooled)
        return shuffle_mix(x, g, self.mixing_mode()), lay, dims

    def _projection_rows(self, lay: _Layout) -> torch.Tensor:
        """``concat_f(W_f[:dim_f])``: the projection rows of every active column, in column order."""
        assert self.projection is not None
        return self.projection.flatten(0, 1).index_select(0, lay.slot_rows)

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        y, lay, dims = self._mixed(pooled)
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
        padded = y.new_zeros(y.shape[0], n_feat * d).index_copy(1, lay.slot_rows, y)
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
        if self.align == "pad":
            y, lay, _ = self._mixed(pooled)
            return y.new_zeros(y.shape[0], self.out_dims[0]).index_add(1, lay.col_s, y)
        x, g, lay, _ = self._active(pooled)
        rows = self._projection_rows(lay)
        mode = self.mixing_mode()
        if mode == "off":
            return x @ rows
        if mode == "shuffle":
            return shuffle_project(x, g, rows, weight_grad=not self.freeze_lookup)
        noise = shuffle_noise(x, mode)
        return x @ (g.unsqueeze(1) * rows) + noise @ ((1.0 - g).unsqueeze(1) * rows)

    def table_weights(self, tab_t: torch.Tensor) -> torch.Tensor | None:
        """Per-table penalty weight (``penalty_weighting="bytes"``), mean 1 over active slots.

        Normalising over the active slots (not over tables) keeps ``alpha`` meaning the
        same average bar as the uniform penalty; only the split between tables changes.
        """
        if self.config.penalty_weighting == "uniform" or tab_t.numel() == 0:
            return None
        rows = self.table_rows
        return rows / rows[tab_t].mean()

    def penalty(self, price: float = 1.0) -> torch.Tensor:
        """Scaled decaying-L1 gate penalty, ``price * penalty_scale * mean_active(w_t * g / k)``.

        ``price`` is the budget's ramp (:meth:`DimGrowEmbeddingBagCollection.budget_price`).
        """
        _, _, tab_t, tab_s = self._index()
        return (price * self.penalty_scale) * self.gate.penalty(tab_t, tab_s, self.table_weights(tab_t))

    # ----------------------------------------------------------------- auto penalty
    @torch.no_grad()
    def observe_task_gradient(self, theta_grad_with_penalty: torch.Tensor, price: float = 1.0) -> None:
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
        penalty_grad = (price * self.penalty_scale) * w * dg_dtheta / (k * n)
        task = theta_grad_with_penalty[tab_t, tab_s] - penalty_grad
        task_g = task / dg_dtheta.clamp_min(1e-4)
        ema = self.task_grad_ema
        ema[tab_t, tab_s] = cfg.auto_ema * ema[tab_t, tab_s] + (1 - cfg.auto_ema) * task_g
        if cfg.penalty_mode == "auto":
            # In float64 then stored: the same value as ``alpha * n * float(mean)``, without
            # the host read (a device sync on an accelerator) that ``float()`` would be.
            mean = ema[tab_t, tab_s].abs().mean().double()
            self.penalty_scale.copy_(mean * (cfg.alpha * n))

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


class DimGrowEmbeddingBagCollection(ComposedEmbeddingBagCollection):
    """An :class:`~torchrec.EmbeddingBagCollection` that searches each table's dimension.

    Takes a ``KeyedJaggedTensor`` and returns a ``KeyedTensor`` like any EBC. Each table
    starts at ``config.initial_dim`` (1) logical dims and grows/shrinks one slot at a time
    under the DimGrow rule (see :mod:`torchrec_dimgrow.policy`).

    Args:
        tables: the tables, exactly as for an EBC. In ``"pad"``/``"project"`` mode each
            table's ``embedding_dim`` is the width its features are presented at (so a
            DLRM with one common ``embedding_dim`` keeps working); in ``"raw"`` mode the
            output width is the current logical dim and ``embedding_dim`` only caps it.
        config: the search knobs; ``config.d_max`` caps every table.
        align: ``"raw"`` (concatenated variable widths), ``"pad"`` (zero-pad to the
            table's ``embedding_dim``) or ``"project"`` (learned per-feature projection to
            it, no bias: the reference's adapter).
        is_weighted: as for EBC.
        device: where to allocate (``"meta"`` for DMP's lazy init).

    ``embedding_bag_configs()`` describes what ``forward`` returns: in raw mode the
    ``embedding_dim`` of each config follows the logical dim. :meth:`physical_configs`
    describes storage (the capacities), :meth:`export_configs` the found dims.

    It stays an ``EmbeddingBagCollection`` subclass, so code that looks for EBCs finds it,
    including init hooks such as TorchRec's ``DistributedModelParallel`` docstring example
    (``model.apply(fn)`` with ``fn`` re-drawing ``m.parameters()`` of every EBC ``m``). Such a
    hook cannot silently re-initialise the gate logits or the projections: :meth:`apply`
    visits the children first, so the tables (the stock EBC child ``.ebc``) get the hook
    exactly as in a stock model; the hook then also sees this wrapper, and whatever it did
    to the dense ``.post`` parameters is undone with a warning that names them.
    """

    def __init__(
        self,
        tables: list[EmbeddingBagConfig],
        config: DimGrowConfig | None = None,
        align: AlignMode = "raw",
        is_weighted: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        nn.Module.__init__(self)
        if not tables:
            raise ValueError("DimGrowEmbeddingBagCollection: tables must not be empty")
        if align not in ("raw", "pad", "project"):
            raise ValueError(f"DimGrowEmbeddingBagCollection: unknown align mode {align!r}")
        self.config = config or DimGrowConfig()
        cfg = self.config
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ValueError(f"DimGrowEmbeddingBagCollection: duplicate table names in {names}")
        self._user_configs = [copy.copy(t) for t in tables]
        for t in self._user_configs:
            if not t.feature_names:
                t.feature_names = [t.name]
        # Widths the tables may be presented at; the budget's "fraction of the d_max model"
        # refers to these, before the row cap (see DimGrowConfig.cap_dims_at_rows).
        self._width_caps = [
            cfg.d_max if align == "raw" else min(cfg.d_max, t.embedding_dim) for t in self._user_configs
        ]
        d_max = [
            min(m, t.num_embeddings) if cfg.cap_dims_at_rows and align != "pad" else m
            for m, t in zip(self._width_caps, self._user_configs)
        ]
        if align == "pad":
            for t in self._user_configs:
                if t.embedding_dim < cfg.d_max:
                    raise ValueError(
                        f"table {t.name!r}: align='pad' needs embedding_dim >= d_max "
                        f"({t.embedding_dim} < {cfg.d_max}); use align='project' or lower d_max"
                    )
        feature_tables = [i for i, t in enumerate(self._user_configs) for _ in t.feature_names]
        feature_names = [f for t in self._user_configs for f in t.feature_names]
        out_dims = [self._user_configs[i].embedding_dim for i in feature_tables]
        self._feature_names = [list(t.feature_names) for t in self._user_configs]
        self._embedding_names = feature_names
        self.post = DimGrowPostProcess(
            names,
            feature_tables,
            feature_names,
            out_dims,
            d_max,
            cfg,
            align,
            table_rows=[t.num_embeddings for t in self._user_configs],
            initial=self._start_dims(d_max),
        )
        self._check_budget()
        dev = torch.device(device) if device is not None else None
        self.ebc: nn.Module = EmbeddingBagCollection(
            tables=self.physical_configs(), is_weighted=is_weighted, device=dev
        )
        self._init_facade(is_weighted, dev)
        if dev is not None and dev.type != "meta":
            self.post.to(dev)

    # ------------------------------------------------------------------ EBC API
    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.post(self.ebc(features))

    def apply(self, fn: Callable[[nn.Module], None]) -> DimGrowEmbeddingBagCollection:
        """``nn.Module.apply`` that keeps the gates and projections out of EBC init hooks.

        Children first (the tables in ``.ebc`` get ``fn`` like any stock EBC), then ``fn``
        on this wrapper; the ``.post`` parameters it changed are restored, with a warning.
        """
        for child in self.children():
            child.apply(fn)
        dense = {n: p for n, p in self.post.named_parameters() if p.device.type != "meta"}
        saved = {n: p.detach().clone() for n, p in dense.items()}
        fn(self)
        changed = sorted(n for n, p in dense.items() if not torch.equal(p.detach(), saved[n]))
        if changed:
            with torch.no_grad():
                for n in changed:
                    dense[n].copy_(saved[n])
            warnings.warn(
                f"DimGrowEmbeddingBagCollection.apply: {getattr(fn, '__name__', fn)!r} changed the DimGrow "
                f"parameters {['post.' + n for n in changed]}; restored (the tables in .ebc were initialised "
                "as for any EmbeddingBagCollection)",
                stacklevel=2,
            )
        return self

    def forward_summed(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """``sum_f aligned_f`` (B x width) in one matmul: for consumers that sum the features.

        Equal to summing :meth:`forward`'s per-feature outputs (up to float summation
        order), without building them; see :meth:`DimGrowPostProcess.summed`.
        """
        return self.post.summed(self.ebc(features))

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """Configs describing the output: one per table, ``embedding_dim`` = output width."""
        if self.post.align != "raw":
            return self._user_configs
        dims = self.post.dims_list()
        return [replace(t, embedding_dim=d) for t, d in zip(self._user_configs, dims)]

    @property
    def _lengths_per_embedding(self) -> list[int]:  # type: ignore[override]
        return self.post.output_dims()

    # ------------------------------------------------------------------ DimGrow API
    @property
    def table_names(self) -> list[str]:
        return list(self.post.table_names)

    def dims(self) -> dict[str, int]:
        """Current logical dim per table."""
        return dict(zip(self.table_names, self.post.dims_list()))

    def capacities(self) -> dict[str, int]:
        """Current physical width per table."""
        return dict(zip(self.table_names, self.post.capacity_list()))

    def physical_configs(self) -> list[EmbeddingBagConfig]:
        """Configs of the tables as stored (capacity widths, N(0, init_std) init)."""
        caps = self.post.capacity_list()
        init = normal_init(self.config.init_std)
        return [replace(t, embedding_dim=c, init_fn=init) for t, c in zip(self._user_configs, caps)]

    def gate_values(self) -> torch.Tensor:
        """All gate values (tables x d_max), inactive slots included."""
        return self.post.gate.gates().detach()

    def penalty(self) -> torch.Tensor:
        """The gate regulariser to add to the loss of the gate (validation) step."""
        return self.post.penalty(self.budget_price())

    def budget_price(self) -> float:
        """How much of the gate penalty applies under a byte budget: ``min(1, fill) ** p``.

        ``fill`` is the bytes of the current logical dims over the budget and ``p`` is
        ``config.budget_pressure``. Without a budget (or with ``p = 0``) it is 1: the
        penalty alone decides the size. With a budget, the budget is the size target and
        the penalty only sets the price per byte that decides *where* the bytes go: far
        below the budget the price is low and useful fields keep growing, and at the
        budget it is the full penalty, under which :func:`~torchrec_dimgrow.policy.admit_growth`
        trades weak slots for stronger ones. Computed from the host-side dims (no device
        read), so it is the same on every rank.
        """
        power = self.config.budget_pressure
        budget = self.budget_bytes()
        if budget is None or power == 0:
            return 1.0
        return min(1.0, self.embedding_bytes(physical=False) / budget) ** power

    @contextlib.contextmanager
    def gate_step(self) -> Iterator[None]:
        """Context for the DARTS-style gate update on a validation batch.

        Inside it the pooled lookups are detached: the backward reaches the gates (and
        dense layers, whose gradients the caller discards) but never the tables, so a
        fused in-backward optimizer does not train embeddings on validation data. On the
        summed path (:meth:`forward_summed`) the projection's gradient is not computed
        either (it reads zero; it would be discarded too): a batch-sized matmul saved.
        """
        previous = self.post.freeze_lookup
        self.post.freeze_lookup = True
        try:
            yield
        finally:
            self.post.freeze_lookup = previous

    def gate_parameters(self) -> list[nn.Parameter]:
        """Parameters trained on validation batches (the DARTS-style gate step)."""
        return [self.post.gate.theta]

    def dims_list(self) -> list[int]:
        """Current logical dim per table, in table order."""
        return self.post.dims_list()

    def capacity_list(self) -> list[int]:
        """Current physical width per table, in table order."""
        return self.post.capacity_list()

    @property
    def start_dims(self) -> list[int]:
        """The logical dim every table started the search at."""
        return list(self.post.start_dims)

    @property
    def max_dims(self) -> list[int]:
        """Most dims each table may reach (``d_max``, capped by the width in pad/project mode)."""
        return list(self.post.d_max)

    def observe_gate_gradient(self, grad: torch.Tensor) -> None:
        """Feed the gate gradient of a gate step to the "auto" penalty scale."""
        self.post.observe_task_gradient(grad, self.budget_price())

    def restore_widths(self, dims: Sequence[int], capacities: Sequence[int]) -> None:
        """Set logical dims and capacities before sharding (a resumed run's saved widths).

        The tables are rebuilt, empty, on their current device (``meta`` before DMP); the
        caller loads their weights afterwards.
        """
        if len(dims) != len(self.table_names) or len(capacities) != len(self.table_names):
            raise ValueError(
                f"restore_widths: need one dim and one capacity per table ({len(self.table_names)})"
            )
        self.post.capacity.copy_(torch.tensor(list(capacities), dtype=torch.int64))
        self.post.dims.copy_(torch.tensor(list(dims), dtype=torch.int64))
        device = next(iter(self.ebc.parameters())).device
        self.ebc = EmbeddingBagCollection(
            self.physical_configs(), is_weighted=self.is_weighted(), device=device
        )

    def embedding_bytes(self, physical: bool = True) -> int:
        """Stored bytes of the tables: at capacity (``physical``) or at the logical dims."""
        widths = self.post.capacity_list() if physical else self.post.dims_list()
        return embedding_bytes(self._user_configs, dict(zip(self.table_names, widths)))

    def dim_costs(self) -> list[int]:
        """Bytes one logical dim of each table costs: rows x bytes per value of its data type."""
        return [dim_cost(t) for t in self._user_configs]

    def budget_bytes(self) -> int | None:
        """``config.budget`` in bytes (a fraction applies to the ``d_max`` model), or ``None``."""
        full = sum(c * m for c, m in zip(self.dim_costs(), self._width_caps))
        return resolve_budget(self.config.budget, full)

    def _start_dims(self, d_max: list[int]) -> list[int]:
        """Starting logical dims (see ``DimGrowConfig.initial_dim``; ``None`` = the block)."""
        cfg = self.config
        if cfg.initial_dim is not None:
            return [min(cfg.initial_dim, m) for m in d_max]
        costs = self.dim_costs()
        budget = self.budget_bytes()
        for k in range(min(cfg.capacity_block, max(d_max)), 0, -1):
            dims = [min(k, m) for m in d_max]
            if budget is None or sum(c * d for c, d in zip(costs, dims)) <= budget:
                return dims
        return [1] * len(d_max)  # below every field at dim 1: _check_budget refuses it

    def _check_budget(self) -> None:
        """Refuse a budget that cannot hold every field at dim 1, or the starting dims."""
        budget = self.budget_bytes()
        if budget is None:
            return
        costs = self.dim_costs()
        floor = sum(costs)
        if budget < floor:
            raise BudgetError(
                f"DimGrowConfig: budget {budget:,} bytes is below the {floor:,} bytes every "
                f"field needs at dim 1 ({len(costs)} tables); raise budget or drop tables"
            )
        start = sum(c * d for c, d in zip(costs, self.post.dims_list()))
        if budget < start:
            raise BudgetError(
                f"DimGrowConfig: budget {budget:,} bytes is below the {start:,} bytes of the "
                f"starting dims (initial_dim={self.config.initial_dim}); lower initial_dim"
            )

    def apply_changes(
        self,
        changes: Sequence[DimChange],
        store: TableStore | None = None,
        dense_optimizers: Sequence[torch.optim.Optimizer] = (),
    ) -> ChangeReport:
        """Apply grow/shrink decisions to gates, weights and optimizer state.

        A shrink of slot ``s`` < last moves the last active slot into ``s`` (weights,
        embedding optimizer state, gate logit, projection row, dense optimizer state), so
        storage stays a prefix; the vacated slot is re-initialised so that a later growth
        starts fresh. Capacity changes are batched into one ``store.resize`` call.
        """
        store = store or LocalTableStore(self.ebc, [])
        report = ChangeReport(dim_changes=list(changes))
        dims = self.post.dims_list()
        std = self.config.init_std
        for ch in changes:
            name = self.table_names[ch.table]
            if dims[ch.table] != ch.old_dim:
                raise RuntimeError(
                    f"table {name!r}: change expects dim {ch.old_dim}, collection has {dims[ch.table]}"
                )
            if ch.kind == "shrink":
                last = ch.old_dim - 1
                if ch.slot != last:
                    store.move_column(name, last, ch.slot)
                    self.post.move_slot(ch.table, last, ch.slot)
                    _move_dense_state(dense_optimizers, self.post, ch.table, last, ch.slot)
                store.reset_column(name, last, std)
                self.post.reset_slot(ch.table, last)
                _reset_dense_state(dense_optimizers, self.post, ch.table, last)
            dims[ch.table] = ch.new_dim
        self.post.set_dims(dims)
        caps = self.post.capacity_list()
        new_caps = {
            name: capacity_for(d, c, self.config)
            for name, d, c in zip(self.table_names, dims, caps)
            if capacity_for(d, c, self.config) != c
        }
        if new_caps:
            old = self.capacities()
            result = store.resize(new_caps, std)
            report.replan_seconds = result.seconds
            report.bytes_moved = result.bytes_moved
            report.capacity_changes = {n: (old[n], c) for n, c in new_caps.items()}
            full = [new_caps.get(n, c) for n, c in zip(self.table_names, caps)]
            self.post.capacity.copy_(torch.tensor(full, dtype=torch.int64))
            if isinstance(self.ebc, EmbeddingBagCollection):
                _sync_unsharded_configs(self.ebc, self.physical_configs())
        return report

    def export_dims(self, threshold: float | None = None) -> dict[str, int]:
        """Found dim per table: active slots whose gate exceeds the final threshold."""
        gates = self.gate_values()
        rows = [gates[t, :d].tolist() for t, d in enumerate(self.post.dims_list())]
        return dict(zip(self.table_names, final_dims(rows, self.config, threshold)))

    def export_configs(self, dims: dict[str, int] | None = None) -> list[EmbeddingBagConfig]:
        """Plain TorchRec configs at the found dims; tables with dim 0 are dropped."""
        found = dims if dims is not None else self.export_dims()
        return [
            replace(t, embedding_dim=found[t.name], init_fn=None)
            for t in self._user_configs
            if found[t.name] > 0
        ]


def _sync_unsharded_configs(ebc: EmbeddingBagCollection, configs: list[EmbeddingBagConfig]) -> None:
    """Keep a plain EBC's bookkeeping truthful after a table was reallocated."""
    ebc._embedding_bag_configs = configs
    ebc._lengths_per_embedding = [c.embedding_dim for c in configs for _ in c.feature_names]


def _optimizer_tensor_states(
    optimizers: Sequence[torch.optim.Optimizer], param: torch.Tensor
) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for opt in optimizers:
        state = opt.state.get(param, {})
        out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]
    return out


@torch.no_grad()
def _move_dense_state(
    optimizers: Sequence[torch.optim.Optimizer], post: DimGrowPostProcess, table: int, src: int, dst: int
) -> None:
    for param, row in post.dense_slot_params(table):
        for s in _optimizer_tensor_states(optimizers, param):
            s[row, dst] = s[row, src]


@torch.no_grad()
def _reset_dense_state(
    optimizers: Sequence[torch.optim.Optimizer], post: DimGrowPostProcess, table: int, slot: int
) -> None:
    for param, row in post.dense_slot_params(table):
        for s in _optimizer_tensor_states(optimizers, param):
            s[row, slot] = 0
