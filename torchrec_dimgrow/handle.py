"""``DimGrowHandle``: drives the search of the collections ``swap_in`` put into a user's model.

The handle is what a user's training loop talks to after :func:`~torchrec_dimgrow.swap.swap_in`
(the module docstring of :mod:`torchrec_dimgrow.swap` shows where each line goes):
:meth:`DimGrowHandle.constraints` for the planner, :meth:`DimGrowHandle.attach` once the
DMP, optimizer and pipeline exist (re-plan stores, the gates' own optimizer, the re-plan
hooks that keep the user's optimizer and pipeline current), :meth:`DimGrowHandle.step`
after every training step (gate step, every ``check_interval`` a check through the
:class:`~torchrec_dimgrow.controller.DimGrowController`), and the found dims /
:meth:`DimGrowHandle.export` at the end.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import ParameterConstraints

from torchrec_dimgrow.config import AlignMode
from torchrec_dimgrow.controller import CheckReport, DimGrowController, total_penalty
from torchrec_dimgrow.distributed.planning import PlanningConfig, constraints_for
from torchrec_dimgrow.distributed.runtime import attach_stores
from torchrec_dimgrow.distributed.table_store import ShardedTableStore
from torchrec_dimgrow.distributed.train_pipeline import PipelineReplanGuard, unpipelined
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.online import FoldedCollection, fold, gather_active_tables
from torchrec_dimgrow.optim import (
    EmbeddingOptimizer,
    embedding_optimizer_of,
    leaf_optimizers,
    remove_parameters,
    replace_optimizer,
)
from torchrec_dimgrow.swap_export import export

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Loss of ``model(batch)``: the tensor itself, or the first item (``DLRMTrain``'s loss)."""
    out = model(batch)
    loss = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError("the model must return a scalar loss or (loss, ...); pass loss_fn= to attach()")
    return loss


# ---------------------------------------------------------------------- the handle
class DimGrowHandle:
    """Drives the search of the collections :func:`swap_in` put into a model."""

    def __init__(
        self, model: nn.Module, collections: dict[str, DimGrowEmbeddingBagCollection], align: AlignMode
    ) -> None:
        self.model = model
        self.collections = collections
        self.align: AlignMode = align
        self._unsharded = {path: coll.ebc for path, coll in collections.items()}
        self.controller: DimGrowController | None = None
        self.stores: dict[str, ShardedTableStore] = {}
        self.trained: nn.Module | None = None
        self.pipeline: Any = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.device = torch.device("cpu")
        self.loss_fn: LossFn = default_loss
        self._old_fused: object = None
        self._old_lr: dict[str, float] = {}

    # ------------------------------------------------------------------ before sharding
    def embedding_parameters(self) -> list[nn.Parameter]:
        """The table weights (what ``apply_optimizer_in_backward`` should be given)."""
        return [p for ebc in self._unsharded.values() for p in ebc.parameters()]

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for coll in self.collections.values() for p in coll.gate_parameters()]

    def constraints(self, planning: PlanningConfig | None = None) -> dict[str, ParameterConstraints]:
        """Planner constraints for the DimGrow tables: fused kernel, re-plannable sharding types.

        Column splits are excluded when the embedding optimizer keeps one state per row.
        Call after ``apply_optimizer_in_backward`` so the optimizer kind is known.
        """
        planning = planning or PlanningConfig()
        spec = embedding_optimizer_of(self.embedding_parameters())
        rowwise = spec.rowwise() if spec is not None else False
        out: dict[str, ParameterConstraints] = {}
        for ebc in self._unsharded.values():
            out.update(constraints_for(ebc.embedding_bag_configs(), planning, rowwise))  # type: ignore[operator]
        return out

    # ------------------------------------------------------------------ attach
    def attach(
        self,
        model: nn.Module,
        pipeline: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        loss_fn: LossFn | None = None,
        embedding_optimizer: EmbeddingOptimizer | None = None,
        planning: PlanningConfig | None = None,
        device: torch.device | None = None,
    ) -> DimGrowHandle:
        """Bind the handle to the model being trained; call once, before the first step.

        Args:
            model: the ``DistributedModelParallel`` (or, single process, the unsharded model).
            pipeline: the train pipeline driving ``model``, if any; re-plans pause and
                re-attach it (:class:`~torchrec_dimgrow.distributed.train_pipeline.PipelineReplanGuard`).
            optimizer: the optimizer the loop steps (default: the pipeline's). The gate
                logits are removed from it; its dense state follows slot moves; under DMP
                the fused optimizer inside it is replaced after every re-plan.
            loss_fn: ``(model, batch) -> scalar loss`` for the gate step; default
                :func:`default_loss` (``DLRMTrain`` returns ``(loss, ...)``).
            embedding_optimizer: the tables' fused optimizer, re-applied at each re-plan;
                default: read from what ``apply_optimizer_in_backward`` attached.
            planning: re-plan settings (sharding types, planner batch size).
            device: compute device (default ``model.device`` for a DMP, else CPU).
        """
        if self.controller is not None:
            raise RuntimeError("DimGrowHandle.attach: already attached")
        self._check_no_fused_dense()
        optimizer = optimizer if optimizer is not None else getattr(pipeline, "_optimizer", None)
        self.trained, self.pipeline, self.optimizer = model, pipeline, optimizer
        self.loss_fn = loss_fn or default_loss
        removed = remove_parameters(optimizer, self.gate_parameters())
        if removed:
            log.info(
                "DimGrow: %d gate parameter(s) moved from the training optimizer to the gate optimizer",
                removed,
            )
        dense = leaf_optimizers(optimizer)
        if isinstance(model, DistributedModelParallel):
            self.device = device or getattr(model, "device", None) or torch.device("cpu")
            self._attach_sharded(model, embedding_optimizer, planning or PlanningConfig())
        else:
            self.device = device or torch.device("cpu")
            for path, coll in self.collections.items():
                if any(p.device.type == "meta" for p in coll.ebc.parameters()):
                    raise ValueError(
                        f"{path}: tables are still on meta; shard the model or build it on a device"
                    )
        self.controller = DimGrowController(
            self.collections,
            self.stores,
            dense_optimizers=dense,
            local_optimizers=dense,
            model=model,
        )
        self.controller.forward_context = lambda: unpipelined(model)
        self.controller.before_replan.append(self._before_replan)
        self.controller.after_replan.append(self._after_replan)
        return self

    def _check_no_fused_dense(self) -> None:
        for coll in self.collections.values():
            for name, p in coll.named_parameters():
                if not name.startswith("ebc.") and hasattr(p, "_in_backward_optimizers"):
                    raise ValueError(
                        f"DimGrow parameter {name} has an in-backward optimizer: apply_optimizer_in_backward "
                        "was given the gates too (e.g. sparse_arch.parameters()); give it handle.embedding_parameters()"
                    )

    def _attach_sharded(
        self, dmp: DistributedModelParallel, spec: EmbeddingOptimizer | None, planning: PlanningConfig
    ) -> None:
        spec = spec or embedding_optimizer_of(self.embedding_parameters())
        if spec is None:
            raise ValueError(
                "no embedding optimizer found on the DimGrow tables: call apply_optimizer_in_backward"
                "(cls, handle.embedding_parameters(), kwargs) before DistributedModelParallel, or pass "
                "embedding_optimizer="
            )
        self.stores = attach_stores(dmp, self.collections, spec, planning, self.device).stores
        for path, store in self.stores.items():
            store.on_rebuild = self._on_rebuild_for(path)

    # ------------------------------------------------------------------ re-plan hooks
    def _before_replan(self) -> None:
        if isinstance(self.trained, DistributedModelParallel):
            self._old_fused = self.trained.fused_optimizer
        self._old_lr = {}
        for path, store in self.stores.items():
            groups = list(store.sharded.fused_optimizer.param_groups)
            if groups:
                self._old_lr[path] = float(groups[0]["lr"])
        if self.pipeline is not None:
            self._guard().before()

    def _on_rebuild_for(self, path: str) -> Callable[[ShardedEmbeddingBagCollection], None]:
        def on_rebuild(new: ShardedEmbeddingBagCollection) -> None:
            """Carry the live learning rate (an LR scheduler may have moved it) to the new tables."""
            lr = self._old_lr.get(path)
            if lr is not None:
                for group in new.fused_optimizer.param_groups:
                    group["lr"] = lr  # type: ignore[index]

        return on_rebuild

    def _after_replan(self) -> None:
        if isinstance(self.trained, DistributedModelParallel) and self._old_fused is not None:
            if not replace_optimizer(self.optimizer, self._old_fused, self.trained.fused_optimizer):
                if self.optimizer is not None:
                    log.warning(
                        "DimGrow: the training optimizer does not contain dmp.fused_optimizer; not updated"
                    )
            self._old_fused = None
        if self.pipeline is not None:
            self._guard().after()

    def _guard(self) -> PipelineReplanGuard:
        guard = getattr(self, "_pipeline_guard", None)
        if guard is None or guard.pipeline is not self.pipeline:
            assert self.trained is not None
            guard = PipelineReplanGuard(self.pipeline, self.trained)
            self._pipeline_guard = guard
        return guard

    # ------------------------------------------------------------------ training loop
    def _ctrl(self) -> DimGrowController:
        if self.controller is None:
            raise RuntimeError("DimGrowHandle: call attach(model, pipeline, optimizer) before training")
        return self.controller

    def penalty(self) -> torch.Tensor:
        """The gate regulariser; what a hand-written gate loss must add."""
        return total_penalty(list(self.collections.values()))

    @contextlib.contextmanager
    def unpipelined(self) -> Iterator[nn.Module]:
        """The trained model with plain forwards (extra forwards, evaluation) between steps."""
        model = self.trained if self.trained is not None else self.model
        with unpipelined(model):
            yield model

    def _loss(self, batch: Any) -> torch.Tensor:
        assert self.trained is not None
        return self.loss_fn(self.trained, batch)

    def gate_step(self, batch: Any) -> float:
        """DARTS-style gate update on ``batch`` (:meth:`DimGrowController.gate_step`).

        Runs outside the pipeline (its prefetched batches are untouched); the dense
        gradients of this backward are discarded.
        """
        return self._ctrl().gate_step(self._loss, batch.to(self.device))

    def step(self, val_batch: Any = None) -> CheckReport | None:
        """Call after every training step (after ``pipeline.progress`` / ``optimizer.step()``).

        The controller's :meth:`~DimGrowController.step`: with ``val_batch`` a gate step on
        it (DARTS mode); without, single-loader mode (the gates step on the gradient the
        training backward left on them, plus the penalty). Then the gates are recorded
        and, every ``check_interval`` steps, importance is all-gathered and the tables
        grow/shrink/re-plan. Returns the check's report when one ran.
        """
        batch = val_batch.to(self.device) if val_batch is not None else None
        return self._ctrl().step(self._loss, batch)

    def gate_due(self) -> bool:
        """Whether the next :meth:`step` runs the gate step (``config.gate_every``)."""
        return self._ctrl().gate_due()

    def end_step(self) -> CheckReport | None:
        """For loops that update the gates themselves: record, count, check when due."""
        return self._ctrl().end_step()

    # ------------------------------------------------------------------ results
    @property
    def replans(self) -> int:
        return self.controller.replans if self.controller is not None else 0

    def dims(self) -> dict[str, int]:
        """Current logical dims (flat when table names are unique across collections)."""
        return _flatten({p: c.dims() for p, c in self.collections.items()})

    def found_dims(self) -> dict[str, int]:
        """Dims to retrain with: active slots whose gate exceeds ``final_threshold``."""
        return _flatten({p: c.export_dims() for p, c in self.collections.items()})

    def serving_weights(self, means: Mapping[str, torch.Tensor] | None = None) -> dict[str, FoldedCollection]:
        """The searched weights *now*, at the found dims, for a serving version (collective).

        Per collection path: :func:`~torchrec_dimgrow.online.fold` of its active columns
        (gathered from every rank's shards) with the gates folded into the projection rows
        and the columns at or below ``final_threshold`` dropped. ``means`` (path -> tables x
        slots column means, e.g. a :class:`~torchrec_dimgrow.online.ColumnMeans`) fixes
        the noise of the gate mixing; without, it is zero and the fold has no bias, which
        :func:`~torchrec_dimgrow.online.load_into_mixed` loads into ``export``'s
        mixed-dim collection. Every rank must call it (the tables are gathered).
        """
        out: dict[str, FoldedCollection] = {}
        for path, coll in sorted(self.collections.items()):
            active = gather_active_tables(coll, self.stores.get(path))
            shape = tuple(coll.gate_values().shape)
            mu = means[path] if means is not None else torch.zeros(shape)
            out[path] = fold(coll, active, mu)
        return out

    def export(
        self, model: nn.Module | None = None, align: AlignMode | None = None, serving: str | None = None
    ) -> nn.Module:
        """:func:`export` with the found dims (default model: the swapped one, if unsharded)."""
        return export(
            model if model is not None else self.model,
            self.found_dims(),
            align=align or self.align,
            serving=serving,
        )


def _flatten(per_path: dict[str, dict[str, int]]) -> dict[str, int]:
    flat: dict[str, int] = {}
    for dims in per_path.values():
        for name, d in dims.items():
            if name in flat:
                raise ValueError(f"table name {name!r} appears in several collections; index dims by path")
            flat[name] = d
    return flat


__all__ = ["DimGrowHandle", "LossFn", "default_loss"]
