"""The SuperNet baselines' template: the hooks each method implements, one shared search.

A method is a :class:`BaselineSearch` subclass. It implements two hooks, :meth:`build_post`
(the dense module on top of the tables: projections, masks, architecture logits) and
:meth:`export_dims` (the found dim per field, read off the trained SuperNet), and overrides
only what it changes among the optional ones (:meth:`tables`, :meth:`head_input`,
:meth:`arch_parameters`, :meth:`frozen_parameters`, the regularisers, :meth:`on_step`,
:meth:`extra_info`). Everything else is shared: the SuperNet module pattern and table helpers
(:mod:`~torchrec_dimgrow.baselines.supernet`), the sharding (``shard_model``, exactly as the
DimGrow search shards), the epoch loop and early stopping (``training.fit``), the
first-order DARTS architecture step, and the ``dims.json`` output the shared retrain reads.

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
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_dimgrow.artifacts import write_dims_json, write_json_atomic
from torchrec_dimgrow.baselines.supernet import SparseSuperNet, all_reduce_mean, field_tables, round_up
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.distributed.env import DistEnv
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.distributed.runtime import shard_model
from torchrec_dimgrow.modules.backbone import Combine, CTRModel
from torchrec_dimgrow.optim import EmbeddingOptimizer
from torchrec_dimgrow.training import EarlyStopping, ValStream, bce, evaluate, fit


# ----------------------------------------------------------------------------- optimizers
def embedding_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Unsharded path: the table optimizer named by ``cfg.embedding_optimizer``."""
    cls: Any = EmbeddingOptimizer(cfg.embedding_optimizer, cfg.embedding_lr).cls()
    return cls(params, lr=cfg.embedding_lr)


def tensor_bytes(t: Any) -> int:
    """Bytes this rank holds for a tensor or a ShardedTensor (its local shards)."""
    if hasattr(t, "local_shards"):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return 0


def state_bytes(optimizers: Iterable[Any]) -> int:
    """Bytes of every tensor the optimizers keep (moments, Adagrad sums, step counters)."""
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            total += sum(tensor_bytes(v) for v in state.values())
    return total


@dataclass
class Optimizers:
    """Tables (``embedding``; the DMP's fused optimizer when sharded), dense weights, architecture."""

    embedding: Any
    dense: torch.optim.Optimizer
    arch: torch.optim.Optimizer | None
    fused: bool = False

    def stepped(self) -> list[torch.optim.Optimizer]:
        return [o for o in (None if self.fused else self.embedding, self.dense, self.arch) if o is not None]

    def all(self) -> list[Any]:
        return [o for o in (self.embedding, self.dense, self.arch) if o is not None]


# ----------------------------------------------------------------------------- results
@dataclass
class SearchResult:
    """What a search returns (and what the benchmarks record)."""

    method: str
    dims: dict[str, int]
    wall_s: float
    steps: int
    embedding_param_bytes: int
    embedding_state_bytes: int
    optimizer_state_bytes: int
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_dims(path: str | Path, dims: dict[str, int]) -> Path:
    """``dims.json`` in the DimGrow search's format (flat ``{field: dim}``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dims_json(path, {f: int(d) for f, d in dims.items()})
    return path


# ----------------------------------------------------------------------------- the search
@dataclass
class BaselineConfig:
    """Knobs every baseline has. Method configs subclass this.

    ``d_max``: largest dim any field may get. ``init_std``: table init N(0, std) as in the
    reference. ``arch_lr``/``arch_every``: Adam learning rate of the architecture parameters
    and how many training steps pass between two validation-batch updates of them (methods
    without architecture parameters ignore both). ``storage_block``: stored table widths are
    rounded up to a multiple of this and the extra columns are never read; 4 because
    FBGEMM's fused kernel (the sharded path) rejects other widths, the same rule as the
    DimGrow collection's ``capacity_block``, so both pay the same padding.
    """

    def stored(self, width: int) -> int:
        return round_up(width, self.storage_block)

    d_max: int = 16
    init_std: float = 0.01
    arch_lr: float = 1e-3
    arch_every: int = 1
    storage_block: int = 4

    def __post_init__(self) -> None:
        if self.d_max < 1:
            raise ValueError(f"{type(self).__name__}: d_max must be >= 1, got {self.d_max}")
        if self.storage_block < 1:
            raise ValueError(f"{type(self).__name__}: storage_block must be >= 1, got {self.storage_block}")
        if self.arch_every < 1:
            raise ValueError(f"{type(self).__name__}: arch_every must be >= 1, got {self.arch_every}")


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
    which tables to train, how the backbone takes the fields, which parameters are
    architecture parameters and what extra loss each step carries. :meth:`search` runs the
    shared build, train and export.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[BaselineConfig]] = BaselineConfig

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or self.config_cls()
        self.last_trained: Trained | None = None

    # -------------------------------------------------------------- per-method hooks
    @abc.abstractmethod
    def build_post(self, fields: Sequence[str], vocab: dict[str, int]) -> nn.Module:
        """The method's dense module on top of the tables (KeyedTensor in, KeyedTensor out)."""

    @abc.abstractmethod
    def export_dims(self, trained: Trained, data: PreparedData, train_cfg: TrainConfig) -> dict[str, int]:
        """Found dim per field, read off the trained SuperNet."""

    def tables(self, fields: Sequence[str], vocab: dict[str, int]) -> list[EmbeddingBagConfig]:
        """The SuperNet's tables: by default one ``d_max``-wide table per field (stored widths
        rounded up to ``storage_block``), what OptEmbed, SSEDS and DimReg all train."""
        return field_tables(fields, vocab, self.config.stored(self.config.d_max), self.config.init_std)

    def head_input(
        self, sparse: SparseSuperNet, fields: Sequence[str], train_cfg: TrainConfig
    ) -> tuple[Combine, int | None]:
        """How the backbone takes the fields: concatenated ``d_max``-wide fields by default."""
        return "concat", self.config.d_max * len(fields)

    def arch_parameters(self, sparse: SparseSuperNet) -> list[nn.Parameter]:
        """Parameters updated on validation batches (none by default)."""
        return []

    def frozen_parameters(self, sparse: SparseSuperNet) -> list[nn.Parameter]:
        """Parameters no optimizer touches (e.g. SSEDS's all-ones mask)."""
        return []

    def train_regularizer(self, sparse: SparseSuperNet) -> torch.Tensor | None:
        """Extra loss of the training step."""
        return None

    def arch_regularizer(self, sparse: SparseSuperNet) -> torch.Tensor | None:
        """Extra loss of the architecture (validation) step."""
        return None

    def on_step(self, sparse: SparseSuperNet, step: int) -> None:  # noqa: B027 (optional hook)
        """Called after every training step (schedules such as temperature annealing)."""

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
        opts = Optimizers(embedding_optimizer(emb, train_cfg), *self._dense_and_arch(model, emb, train_cfg))
        return Trained(model, model, opts, placement)

    def _dense_and_arch(
        self, model: CTRModel, skip_params: list[nn.Parameter], train_cfg: TrainConfig
    ) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
        sparse: SparseSuperNet = model.sparse  # type: ignore[assignment]
        arch = self.arch_parameters(sparse)
        skip = {id(p) for p in skip_params + arch + self.frozen_parameters(sparse)}
        dense = [p for p in model.parameters() if id(p) not in skip]
        arch_opt = torch.optim.Adam(arch, lr=self.config.arch_lr) if arch else None
        return torch.optim.Adam(dense, lr=train_cfg.lr), arch_opt

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
        dense, arch = self._dense_and_arch(model, fused_params, train_cfg)
        return Trained(model, dmp, Optimizers(dmp.fused_optimizer, dense, arch, fused=True), placement)

    # -------------------------------------------------------------- training
    def evaluate(self, trained: Trained, split: Any, batch_size: int) -> dict[str, float]:
        p = trained.placement
        return evaluate(trained.runner, split, batch_size, p.device, p.rank, p.world_size)

    def train(
        self,
        trained: Trained,
        data: PreparedData,
        train_cfg: TrainConfig,
        step_hook: Callable[[int], None] | None = None,
    ) -> tuple[list[dict[str, float]], int]:
        """Train the SuperNet: weights on train batches, architecture on validation batches.

        Early stopping on validation AUC (patience ``train_cfg.early_stop_patience``); with
        more than one epoch the best epoch's weights are restored (unsharded path) or the
        best epoch's architecture is kept (sharded path: only the small dense state is copied).
        ``train_cfg.max_steps`` caps the total step count.
        """
        p, opts = trained.placement, trained.opts
        val_stream = None
        if opts.arch is not None:
            val_stream = ValStream(data.val, train_cfg.batch_size, train_cfg.seed, p.rank, p.world_size)
        best_state: dict[str, torch.Tensor] | None = None

        def batches(epoch: int) -> Iterable[Batch]:
            return data.train.batches(
                train_cfg.batch_size,
                shuffle=True,
                seed=train_cfg.seed,
                epoch=epoch,
                rank=p.rank,
                world_size=p.world_size,
                drop_last=True,
            )

        def step(batch: Batch, index: int) -> None:
            self._weight_step(trained, batch.to(p.device))
            if val_stream is not None and index % self.config.arch_every == 0:
                self._arch_step(trained, next(val_stream).to(p.device))
            self.on_step(trained.sparse, index)
            if step_hook is not None:
                step_hook(index)

        def snapshot() -> None:
            nonlocal best_state
            best_state = self._snapshot(trained)

        history, steps = fit(
            trained.runner,
            train_cfg.epochs,
            batches,
            step,
            lambda: self.evaluate(trained, data.val, train_cfg.batch_size),
            EarlyStopping(train_cfg.early_stop_patience),
            on_best=snapshot if train_cfg.epochs > 1 else None,
            max_steps=train_cfg.max_steps,
        )
        if best_state is not None:
            self._restore(trained, best_state)
        return history, steps

    def _snapshot(self, trained: Trained) -> dict[str, torch.Tensor]:
        if trained.placement.sharded:
            return copy.deepcopy(trained.sparse.post.state_dict())
        return copy.deepcopy(trained.model.state_dict())

    def _restore(self, trained: Trained, state: dict[str, torch.Tensor]) -> None:
        target = trained.sparse.post if trained.placement.sharded else trained.model
        target.load_state_dict(state)

    @staticmethod
    def _loss(module: nn.Module, batch: Batch) -> torch.Tensor:
        return bce(module(batch.sparse_features), batch.labels)

    def _weight_step(self, trained: Trained, batch: Batch) -> None:
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

    def _arch_step(self, trained: Trained, batch: Batch) -> None:
        """First-order DARTS step: the loss on a validation batch moves only the architecture.

        ``autograd.grad`` with the architecture as the only inputs never runs the table
        backward, so the fused table optimizer does not step on validation data. The forward
        bypasses DDP (it would wait for a full backward), so the gradient is averaged over
        ranks by hand.
        """
        opts = trained.opts
        assert opts.arch is not None
        loss = self._loss(trained.model, batch)
        reg = self.arch_regularizer(trained.sparse)
        if reg is not None:
            loss = loss + reg
        arch = self.arch_parameters(trained.sparse)
        grads = torch.autograd.grad(loss, arch)
        for param, grad in zip(arch, grads):
            param.grad = all_reduce_mean(grad, trained.placement.world_size)
        opts.arch.step()
        opts.arch.zero_grad(set_to_none=True)

    # -------------------------------------------------------------- the search
    def search(
        self,
        data: PreparedData,
        train_cfg: TrainConfig,
        out_dir: str | Path | None = None,
        placement: Placement | None = None,
        step_hook: Callable[[int], None] | None = None,
    ) -> SearchResult:
        """Build, train, export; writes ``out_dir/dims.json`` and ``search.json`` (rank 0)."""
        start = time.perf_counter()
        trained = self.build(data, train_cfg, placement)
        history, steps = self.train(trained, data, train_cfg, step_hook)
        dims = self.export_dims(trained, data, train_cfg)
        result = SearchResult(
            method=self.name,
            dims=dims,
            wall_s=time.perf_counter() - start,
            steps=steps,
            embedding_param_bytes=trained.sparse.table_bytes,
            embedding_state_bytes=state_bytes([trained.opts.embedding]),
            optimizer_state_bytes=state_bytes(trained.opts.all()),
            history=history,
            extra={"config": asdict(self.config), **self.extra_info(trained)},
        )
        if out_dir is not None and trained.placement.rank == 0:
            out = Path(out_dir)
            write_dims(out / "dims.json", dims)
            write_json_atomic(out / "search.json", json.loads(json.dumps(result.to_dict(), default=str)))
        self.last_trained = trained
        return result
