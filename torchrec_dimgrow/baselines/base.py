"""Shared interface and training loop of the SuperNet baselines.

Every baseline is built like :class:`~torchrec_dimgrow.DimGrowEmbeddingBagCollection`: a plain
:class:`torchrec.EmbeddingBagCollection` child (``.ebc``, so TorchRec's stock sharder and planner
shard it under ``DistributedModelParallel``) followed by a dense ``.post`` module holding
whatever the method adds (projections, masks, architecture logits). ``post`` returns a
``KeyedTensor`` keyed by field, so the same :class:`~torchrec_dimgrow.modules.backbone.CTRModel`
backbone sits on top of every method.

A search is a :class:`BaselineSearch`: it builds that module, trains it the way its paper does
(weights on training batches; architecture parameters on validation batches where the paper
says so) and returns the found dim per field. The dims are written in the same ``dims.json``
format as the DimGrow search, so the retrain step is shared by all methods.

Two placements, one loop:

* ``env=None``: plain modules in this process, tables trained by a torch optimizer with dense
  gradients (what the unit tests use; cheap to build).
* ``env=DistEnv``: exactly how the DimGrow search runs. The EBC is built on the meta device,
  gets the same fused in-backward table optimizer, is planned by TorchRec's planner and
  sharded by the stock sharder inside ``DistributedModelParallel``. Memory comparisons
  between DimGrow and the baselines use this path, so they differ only in the method.
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
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_dimgrow.artifacts import write_dims_json, write_json_atomic
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.distributed.env import DistEnv
from torchrec_dimgrow.distributed.planning import PlanningConfig, plan_collection
from torchrec_dimgrow.modules.backbone import Combine, CTRModel
from torchrec_dimgrow.optim import EmbeddingOptimizer
from torchrec_dimgrow.training import bce, cycle_batches, evaluate, is_better


def vocab_dict(data: PreparedData) -> dict[str, int]:
    return {f: int(v) for f, v in zip(data.fields, data.vocab_sizes, strict=True)}


# ----------------------------------------------------------------------------- module pattern
class SparseSuperNet(nn.Module):
    """``post(ebc(features))``: a plain EBC (sharded by the stock sharder) + a dense module.

    ``table_bytes`` is fixed at construction from the configs (fp32), so it stays right after
    DMP has replaced ``ebc`` by its sharded version.
    """

    post: Any  # the method's dense module (typed loosely: each method has its own)

    def __init__(self, ebc: EmbeddingBagCollection, post: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc
        self.post = post
        self.table_configs = list(ebc.embedding_bag_configs())
        self.table_bytes = sum(4 * c.num_embeddings * c.embedding_dim for c in self.table_configs)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.post(self.ebc(features))


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """N(0, std) table init, the DimGrow reference's (and its baselines') choice."""

    def init(weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return weight.normal_(0.0, std)

    return init


def round_up(width: int, block: int) -> int:
    return max(block, -(-width // block) * block)


def table_config(name: str, feature: str, rows: int, dim: int, std: float) -> EmbeddingBagConfig:
    return EmbeddingBagConfig(
        name=name, embedding_dim=dim, num_embeddings=rows, feature_names=[feature], init_fn=normal_init(std)
    )


def field_tables(
    fields: Sequence[str], vocab: dict[str, int], width: int, std: float
) -> list[EmbeddingBagConfig]:
    """One ``width``-wide table per field, named after it: the SuperNets' shared storage."""
    return [table_config(f, f, vocab[f], width, std) for f in fields]


def field_blocks(
    pooled: KeyedTensor, fields: Sequence[str], width: int, stored: int | None = None
) -> torch.Tensor:
    """Pooled embeddings as (B, F, width), fields in ``fields`` order.

    Each field is stored ``stored`` (default ``width``) columns wide; only the first
    ``width`` are returned. A plain EBC (sharded or not) returns its keys in table order,
    which is ``fields`` order for the one-table-per-field baselines; the dict fallback
    covers any other order.
    """
    stored = stored or width
    values = pooled.values()
    if list(pooled.keys()) == list(fields):
        x = values.view(values.shape[0], len(fields), stored)
    else:
        by_name = pooled.to_dict()
        x = torch.stack([by_name[f] for f in fields], dim=1)
    return x if stored == width else x[:, :, :width]


def keyed(fields: Sequence[str], width: int, x: torch.Tensor) -> KeyedTensor:
    """(B, F, width) -> KeyedTensor with one ``width``-wide key per field."""
    return KeyedTensor(
        keys=list(fields), length_per_key=[width] * len(fields), values=x.reshape(x.shape[0], -1)
    )


def all_reduce_mean(t: torch.Tensor, world_size: int) -> torch.Tensor:
    """Average ``t`` over ranks (identity on one rank): keeps architecture state identical."""
    if world_size > 1:
        dist.all_reduce(t)
        t = t / world_size
    return t


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


def embedding_bytes_for(dims: dict[str, int], vocab: dict[str, int], bytes_per_value: int = 4) -> int:
    """Σ vocab_f × dim_f × 4: the size of the model the dims describe."""
    return sum(vocab[f] * d * bytes_per_value for f, d in dims.items())


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

    Subclasses say how to build the SuperNet (:meth:`build_sparse`), which parameters are
    architecture parameters, what extra loss the training step carries, and how to read the
    dims off the trained SuperNet (:meth:`export_dims`). :meth:`search` runs the shared loop.
    """

    name: ClassVar[str]
    combine: Combine = "concat"
    config_cls: ClassVar[type[BaselineConfig]] = BaselineConfig

    def __init__(self, config: BaselineConfig | None = None) -> None:
        self.config = config or self.config_cls()
        self.last_trained: Trained | None = None

    # -------------------------------------------------------------- per-method hooks
    @abc.abstractmethod
    def build_sparse(
        self, fields: Sequence[str], vocab: dict[str, int], device: torch.device | None = None
    ) -> SparseSuperNet:
        """The SuperNet's sparse module (plain EBC on ``device`` + dense post module)."""

    @abc.abstractmethod
    def output_width(self, sparse: SparseSuperNet) -> int:
        """Width of one field in the KeyedTensor the sparse module returns."""

    @abc.abstractmethod
    def export_dims(self, trained: Trained, data: PreparedData, train_cfg: TrainConfig) -> dict[str, int]:
        """Found dim per field, read off the trained SuperNet."""

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
    def build_model(self, sparse: SparseSuperNet, fields: Sequence[str], train_cfg: TrainConfig) -> CTRModel:
        width = self.output_width(sparse)
        in_dim = width * len(fields) if self.combine == "concat" else None
        return CTRModel(
            sparse,
            combine=self.combine,
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
        sparse = self.build_sparse(list(data.fields), vocab_dict(data), ebc_device)
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
        table_opt.apply(sparse.ebc.parameters())
        planning = placement.planning or PlanningConfig(batch_size=train_cfg.batch_size)
        group = dist.GroupMember.WORLD
        module_plan = plan_collection(
            sparse.ebc, "sparse.ebc", placement.world_size, device, planning, group, table_opt.rowwise()
        )
        dmp = DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(group),
            device=device,
            plan=ShardingPlan({"sparse.ebc": module_plan}),
            sharders=[EmbeddingBagCollectionSharder()],  # type: ignore[list-item]
        )
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
            val_stream = cycle_batches(data.val, train_cfg.batch_size, train_cfg.seed, p.rank, p.world_size)
        history: list[dict[str, float]] = []
        best_auc, best_state, bad, step = float("nan"), None, 0, 0
        for epoch in range(train_cfg.epochs):
            trained.runner.train()
            batches = data.train.batches(
                train_cfg.batch_size,
                shuffle=True,
                seed=train_cfg.seed,
                epoch=epoch,
                rank=p.rank,
                world_size=p.world_size,
                drop_last=True,
            )
            for batch in batches:
                self._weight_step(trained, batch.to(p.device))
                if val_stream is not None and step % self.config.arch_every == 0:
                    self._arch_step(trained, next(val_stream).to(p.device))
                self.on_step(trained.sparse, step)
                if step_hook is not None:
                    step_hook(step)
                step += 1
                if train_cfg.max_steps is not None and step >= train_cfg.max_steps:
                    break
            metrics = self.evaluate(trained, data.val, train_cfg.batch_size)
            history.append(
                {"epoch": epoch, "step": step, "val_auc": metrics["auc"], "val_logloss": metrics["logloss"]}
            )
            if is_better(metrics["auc"], best_auc):
                best_auc, bad = metrics["auc"], 0
                if train_cfg.epochs > 1:
                    best_state = self._snapshot(trained)
            else:
                bad += 1
            if bad >= train_cfg.early_stop_patience:
                break
            if train_cfg.max_steps is not None and step >= train_cfg.max_steps:
                break
        if best_state is not None:
            self._restore(trained, best_state)
        return history, step

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
