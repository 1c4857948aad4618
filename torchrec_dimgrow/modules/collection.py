"""``DimGrowEmbeddingBagCollection``: an EmbeddingBagCollection whose tables grow.

Layout (composition, after TorchRec's ``FeatureProcessedEmbeddingBagCollection``):

* ``self.ebc``: a plain :class:`torchrec.EmbeddingBagCollection` holding every table at its
  current **capacity** (a multiple of ``capacity_block`` columns). Because it is a stock
  EBC, ``DistributedModelParallel`` shards it with TorchRec's own sharder and planner, the
  planner sees the real widths, and nothing about TorchRec's kernels is re-implemented.
* ``self.post``: a dense :class:`~torchrec_dimgrow.modules.post_process.DimGrowPostProcess`
  (gates, optional projections, the logical dims). It takes the KeyedTensor of ``self.ebc``,
  keeps the first ``dim`` columns of each table, applies the ShuffleGate mixing and aligns
  the widths. It holds no sharded module, so
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

from torchrec_dimgrow.budget import check_budget, resolve_budget, start_dims
from torchrec_dimgrow.config import AlignMode, DimGrowConfig
from torchrec_dimgrow.modules.composed import ComposedEmbeddingBagCollection
from torchrec_dimgrow.modules.feature_groups import FeatureGroups
from torchrec_dimgrow.modules.post_process import DimGrowPostProcess
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
        # refers to these, before the row cap (see SearchRule.cap_dims_at_rows).
        self._width_caps = [
            cfg.d_max if align == "raw" else min(cfg.d_max, t.embedding_dim) for t in self._user_configs
        ]
        d_max = [
            min(m, t.num_embeddings) if cfg.rule.cap_dims_at_rows and align != "pad" else m
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
            initial=start_dims(d_max, self.dim_costs(), self.budget_bytes(), cfg),
        )
        check_budget(self.budget_bytes(), self.dim_costs(), self.post.dims_list(), cfg.initial_dim)
        dev = torch.device(device) if device is not None else None
        self.ebc: nn.Module = EmbeddingBagCollection(
            tables=self.physical_configs(), is_weighted=is_weighted, device=dev
        )
        self._init_facade(is_weighted, dev)
        if dev is not None and dev.type != "meta":
            self.post.to(dev)

    # ------------------------------------------------------------------ EBC API
    def forward(self, features: KeyedJaggedTensor, groups: FeatureGroups | None = None) -> KeyedTensor:
        """The aligned pooled features; with ``groups``, summed into them (one output per group)."""
        return self.post(self.ebc(features), groups)

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
        return self.post.penalty()

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
        self.post.observe_task_gradient(grad)

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
