"""The SuperNet baselines' template: the hooks each method implements, its build and its steps.

A method is a :class:`BaselineSearch` subclass. It implements two hooks, :meth:`build_post`
(the dense module on top of the tables: projections, masks, architecture logits) and
:meth:`export_dims` (the found dim per field, read off the trained SuperNet), and overrides
only what it changes among the optional ones (:meth:`tables`, :meth:`head_input`,
:meth:`gate_parameters`, :meth:`frozen_parameters`, the regularisers, :meth:`on_step`,
:meth:`trains`, :meth:`extra_info`). Everything else is shared: the SuperNet module pattern
and table helpers (:mod:`~torchrec_dimgrow.baselines.supernet`), the build with its
optimizers and the sharding (``shard_model``, exactly as the DimGrow search shards), the
weight step and the first-order DARTS gate step (:meth:`BaselineSearch.weight_step`,
:meth:`BaselineSearch.gate_step`). The run itself (the epoch loop ``training.fit``, early
stopping, export and the output files) is the recipe :mod:`torchrec_dimgrow.recipes.baseline`.

"Gate parameters" are what DimGrow calls its gates and the SuperNet papers their
architecture parameters: the ones a validation batch updates (AutoDim's logits, DimReg's
gates with ``gates_on_val``), with the same knobs as DimGrow (``gate_lr``, ``gate_every``).

Two placements, one loop:

* ``env=None``: plain modules in this process, tables trained by a torch optimizer with dense
  gradients (what the unit tests use; cheap to build).
* ``env=DistEnv``: the EBC is built on the meta device, gets the same fused in-backward table
  optimizer, and is planned and sharded by ``shard_model`` like the DimGrow search's. Memory
  comparisons between DimGrow and the baselines use this path, so they differ only in the
  method.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_dimgrow.baselines.supernet import SparseSuperNet, all_reduce_mean, field_tables, round_up
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.distributed.env import DistEnv
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.distributed.runtime import shard_model
from torchrec_dimgrow.modules.backbone import Combine, CTRModel
from torchrec_dimgrow.optim import EmbeddingOptimizer
from torchrec_dimgrow.training import bce, evaluate


# ----------------------------------------------------------------------------- optimizers
@dataclass
class Optimizers:
    """Tables (``embedding``; the DMP's fused optimizer when sharded), dense weights, gates."""

    embedding: Any
    dense: torch.optim.Optimizer
    gate: torch.optim.Optimizer | None
    fused: bool = False

    def stepped(self) -> list[torch.optim.Optimizer]:
        return [o for o in (None if self.fused else self.embedding, self.dense, self.gate) if o is not None]

    def all(self) -> list[Any]:
        return [o for o in (self.embedding, self.dense, self.gate) if o is not None]


# ----------------------------------------------------------------------------- the search
@dataclass
class BaselineConfig:
    """Knobs every baseline has. Method configs subclass this.

    ``d_max``: largest dim any field may get. ``init_std``: table init N(0, std) as in the
    reference. ``gate_lr``/``gate_every``: Adam learning rate of the gate (architecture)
    parameters and how many training steps pass between two validation-batch updates of them
    (methods without gate parameters ignore both), as in ``DimGrowConfig``.
    ``capacity_block``: stored table widths are rounded up to a multiple of this and the extra
    columns are never read; 4 because FBGEMM's fused kernel (the sharded path) rejects other
    widths, the same knob as ``DimGrowConfig.capacity_block``, so both pay the same padding.
    """

    def stored(self, width: int) -> int:
        return round_up(width, self.capacity_block)

    d_max: int = 16
    init_std: float = 0.01
    gate_lr: float = 1e-3
    gate_every: int = 1
    capacity_block: int = 4

    def __post_init__(self) -> None:
        if self.d_max < 1:
            raise ValueError(f"{type(self).__name__}: d_max must be >= 1, got {self.d_max}")
        if self.capacity_block < 1:
            raise ValueError(f"{type(self).__name__}: capacity_block must be >= 1, got {self.capacity_block}")
        if self.gate_every < 1:
            raise ValueError(f"{type(self).__name__}: gate_every must be >= 1, got {self.gate_every}")


@dataclass
class Placement:
    """Where the SuperNet lives: ``env=None`` plain modules, else sharded like the DimGrow search."""

    env: DistEnv | None = None
    planning: PlanningConfig | None = None

    @property
    def sharded(self) -> bool:
        return self.env is not None

    @property
    def device(self) -> torch.device:
        return self.env.device if self.env is not None else torch.device("cpu")

    @property
    def rank(self) -> int:
        return self.env.rank if self.env is not None else 0

    @property
    def world_size(self) -> int:
        return self.env.world_size if self.env is not None else 1


@dataclass
class Trained:
    """A built (and possibly sharded) SuperNet with its optimizers."""

    model: CTRModel  # the unwrapped model (its ``sparse.ebc`` is sharded in place)
    runner: nn.Module  # what to call: the DMP when sharded, else ``model``
    opts: Optimizers
    placement: Placement

    @property
    def sparse(self) -> SparseSuperNet:
        return self.model.sparse  # type: ignore[return-value]


class BaselineSearch(abc.ABC):
    """Template of a SuperNet dimension search.

    Subclasses implement :meth:`build_post` and :meth:`export_dims`; the optional hooks say
    which tables to train, how the backbone takes the fields, which parameters are gate
    parameters and what extra loss each step carries. The recipe
    :func:`~torchrec_dimgrow.recipes.baseline.run_baseline` runs the shared build, training
    and export.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[BaselineConfig]] = BaselineConfig

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or self.config_cls()

    # -------------------------------------------------------------- per-method hooks
    @abc.abstractmethod
    def build_post(self, fields: Sequence[str], vocab: dict[str, int]) -> nn.Module:
        """The method's dense module on top of the tables (KeyedTensor in, KeyedTensor out)."""

    @abc.abstractmethod
    def export_dims(self, trained: Trained, data: PreparedData, train_cfg: TrainConfig) -> dict[str, int]:
        """Found dim per field, read off the trained SuperNet."""

    def tables(self, fields: Sequence[str], vocab: dict[str, int]) -> list[EmbeddingBagConfig]:
        """The SuperNet's tables: by default one ``d_max``-wide table per field (stored widths
        rounded up to ``capacity_block``), what OptEmbed, SSEDS and DimReg all train."""
        return field_tables(fields, vocab, self.config.stored(self.config.d_max), self.config.init_std)

    def head_input(
        self, sparse: SparseSuperNet, fields: Sequence[str], train_cfg: TrainConfig
    ) -> tuple[Combine, int | None]:
        """How the backbone takes the fields: concatenated ``d_max``-wide fields by default."""
        return "concat", self.config.d_max * len(fields)

    def gate_parameters(self, sparse: SparseSuperNet) -> list[nn.Parameter]:
        """Parameters updated on validation batches (none by default)."""
        return []

    def frozen_parameters(self, sparse: SparseSuperNet) -> list[nn.Parameter]:
        """Parameters no optimizer touches (e.g. SSEDS's all-ones mask)."""
        return []

    def train_regularizer(self, sparse: SparseSuperNet) -> torch.Tensor | None:
        """Extra loss of the training step."""
        return None

    def gate_regularizer(self, sparse: SparseSuperNet) -> torch.Tensor | None:
        """Extra loss of the gate (validation) step."""
        return None

    def on_step(self, sparse: SparseSuperNet, step: int) -> None:  # noqa: B027 (optional hook)
        """Called after every training step (schedules such as temperature annealing)."""

    def trains(self) -> bool:
        """Whether the run trains the SuperNet before :meth:`export_dims` (every search does)."""
        return True

    def extra_info(self, trained: Trained) -> dict[str, Any]:
        """Method-specific facts worth keeping with the result (architecture weights...)."""
        return {}

    # -------------------------------------------------------------- building
    def build_sparse(
        self, fields: Sequence[str], vocab: dict[str, int], device: torch.device | None = None
    ) -> SparseSuperNet:
        """The SuperNet: a plain EBC of :meth:`tables` on ``device`` + :meth:`build_post`."""
        post = self.build_post(fields, vocab)
        return SparseSuperNet(EmbeddingBagCollection(tables=self.tables(fields, vocab), device=device), post)

    def build_model(self, sparse: SparseSuperNet, fields: Sequence[str], train_cfg: TrainConfig) -> CTRModel:
        combine, in_dim = self.head_input(sparse, fields, train_cfg)
        return CTRModel(
            sparse,
            combine=combine,
            adapter_dim=train_cfg.adapter_dim,
            in_dim=in_dim,
            hidden=tuple(train_cfg.hidden),
            dropout=train_cfg.dropout,
        )

    def build(
        self, data: PreparedData, train_cfg: TrainConfig, placement: Placement | None = None
    ) -> Trained:
        """SuperNet + backbone + optimizers, seeded by ``train_cfg.seed``; sharded if asked."""
        placement = placement or Placement()
        torch.manual_seed(train_cfg.seed)
        ebc_device = torch.device("meta") if placement.sharded else None
        sparse = self.build_sparse(list(data.fields), data.vocab(), ebc_device)
        model = self.build_model(sparse, list(data.fields), train_cfg)
        if placement.sharded:
            return self._shard(model, train_cfg, placement)
        emb = list(sparse.ebc.parameters())
        table_opt = EmbeddingOptimizer(train_cfg.embedding_optimizer, train_cfg.embedding_lr)
        opts = Optimizers(table_opt.unfused(emb), *self._dense_and_gate(model, emb, train_cfg))
        return Trained(model, model, opts, placement)

    def _dense_and_gate(
        self, model: CTRModel, skip_params: list[nn.Parameter], train_cfg: TrainConfig
    ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
        sparse: SparseSuperNet = model.sparse  # type: ignore[assignment]
        gates = self.gate_parameters(sparse)
        skip = {id(p) for p in skip_params + gates + self.frozen_parameters(sparse)}
        dense = [p for p in model.parameters() if id(p) not in skip]
        gate_opt = torch.optim.Adam(gates, lr=self.config.gate_lr) if gates else None
        return torch.optim.Adam(dense, lr=train_cfg.lr), gate_opt

    def _shard(self, model: CTRModel, train_cfg: TrainConfig, placement: Placement) -> Trained:
        """DMP with the fused table optimizer, planned and sharded as the DimGrow search is."""
        assert placement.env is not None
        sparse: SparseSuperNet = model.sparse  # type: ignore[assignment]
        device = placement.device
        sparse.post.to(device)
        model.head.to(device)
        if isinstance(model.adapter, nn.Module):
            model.adapter.to(device)
        table_opt = EmbeddingOptimizer(train_cfg.embedding_optimizer, train_cfg.embedding_lr)
        planning = placement.planning or PlanningConfig(batch_size=train_cfg.batch_size)
        dmp = shard_model(model, device, planning, table_opt).dmp
        named = dict(in_backward_optimizer_filter(dmp.named_parameters()))
        kept = {id(p) for p in named.values()}
        fused_params = [p for p in model.parameters() if id(p) not in kept]
        dense, gate = self._dense_and_gate(model, fused_params, train_cfg)
        return Trained(model, dmp, Optimizers(dmp.fused_optimizer, dense, gate, fused=True), placement)

    # -------------------------------------------------------------- steps
    def evaluate(self, trained: Trained, split: Any, batch_size: int) -> dict[str, float]:
        p = trained.placement
        return evaluate(trained.runner, split, batch_size, p.device, p.rank, p.world_size)

    def snapshot(self, trained: Trained) -> dict[str, torch.Tensor]:
        """What the best epoch keeps: the whole model (unsharded) or the small dense ``post``."""
        if trained.placement.sharded:
            return copy.deepcopy(trained.sparse.post.state_dict())
        return copy.deepcopy(trained.model.state_dict())

    def restore(self, trained: Trained, state: dict[str, torch.Tensor]) -> None:
        target = trained.sparse.post if trained.placement.sharded else trained.model
        target.load_state_dict(state)

    @staticmethod
    def _loss(module: nn.Module, batch: Batch) -> torch.Tensor:
        return bce(module(batch.sparse_features), batch.labels)

    def weight_step(self, trained: Trained, batch: Batch) -> None:
        """One training step of tables and dense weights (plus :meth:`train_regularizer`)."""
        opts = trained.opts
        for opt in opts.stepped():
            opt.zero_grad(set_to_none=True)
        loss = self._loss(trained.runner, batch)
        reg = self.train_regularizer(trained.sparse)
        if reg is not None:
            loss = loss + reg
        loss.backward()  # the fused table optimizer (sharded path) steps inside backward
        if not opts.fused:
            opts.embedding.step()
        opts.dense.step()

    def gate_step(self, trained: Trained, batch: Batch) -> None:
        """First-order DARTS step: the loss on a validation batch moves only the gate parameters.

        ``autograd.grad`` with the gates as the only inputs never runs the table backward, so
        the fused table optimizer does not step on validation data. The forward bypasses DDP
        (it would wait for a full backward), so the gradient is averaged over ranks by hand.
        """
        opts = trained.opts
        assert opts.gate is not None
        loss = self._loss(trained.model, batch)
        reg = self.gate_regularizer(trained.sparse)
        if reg is not None:
            loss = loss + reg
        gates = self.gate_parameters(trained.sparse)
        grads = torch.autograd.grad(loss, gates)
        for param, grad in zip(gates, grads):
            param.grad = all_reduce_mean(grad, trained.placement.world_size)
        opts.gate.step()
        opts.gate.zero_grad(set_to_none=True)
