"""The DimGrow step, usable from any training loop, TorchRec train pipelines included.

:class:`DimGrowController` is the one place a DimGrow step happens: after the loop's own
training step, :meth:`DimGrowController.step` runs the gate step (validation batch,
DARTS-style, or the training batch's own gradient in single-loader mode), records the
gates, and every ``check_interval`` steps runs :meth:`DimGrowController.check` (all-gather,
decide, apply, re-plan, agree). It holds the gate optimizer, the importance windows, the
policy state and the re-plan counters, and saves them with ``state_dict``. Keeping a
``TrainPipelineSparseDist`` valid around that step is
:mod:`torchrec_dimgrow.distributed.train_pipeline`'s job.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_dimgrow.distributed.importance import ImportanceAccumulator, check_agreement, gather_importance
from torchrec_dimgrow.modules.collection import ChangeReport, DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.table_store import LocalTableStore, TableStore
from torchrec_dimgrow.policy import DimChange, PolicyState, capacity_for, decide

log = logging.getLogger(__name__)

ReplanHook = Callable[[], None]
LossFn = Callable[[Any], torch.Tensor]


def total_penalty(collections: Sequence[DimGrowEmbeddingBagCollection]) -> torch.Tensor:
    """Sum of the collections' gate penalties: the one regulariser of every gate loss."""
    total = collections[0].penalty()
    for coll in collections[1:]:
        total = total + coll.penalty()
    return total


@dataclass
class TrackedCollection:
    """One DimGrow collection under search: its store, policy counters and importance window."""

    path: str
    collection: DimGrowEmbeddingBagCollection
    store: TableStore
    policy: PolicyState
    importance: ImportanceAccumulator


@dataclass
class CheckReport:
    """What one check did, per collection path (empty dicts when nothing changed)."""

    step: int
    changes: dict[str, list[DimChange]] = field(default_factory=dict)
    reports: dict[str, ChangeReport] = field(default_factory=dict)

    @property
    def replanned(self) -> bool:
        return any(r.replanned for r in self.reports.values())

    @property
    def changed(self) -> bool:
        return any(self.changes.values())


class DimGrowController:
    """The DimGrow step of a training loop, for every DimGrow collection of a model.

    One step, after the loop's own training step (forward, backward, optimizer step), is
    :meth:`step`: the gate step (:meth:`gate_step`), then the gates are recorded and every
    ``check_interval`` steps :meth:`check` runs (all-gather importance, decide, apply on
    every rank, re-plan the tables whose capacity changed, verify agreement). The search
    recipe, the DLRM :class:`~torchrec_dimgrow.swap.DimGrowHandle` and a user's own loop
    all drive this one object; sharded and unsharded models differ only in their stores.

    Args:
        collections: module path -> collection (paths only name them in reports; every rank
            must pass the same paths, they fix the order of the collectives).
        stores: path -> table store (``ShardedTableStore`` under DMP, e.g. from
            ``shard_model(...).stores``). A missing path gets a ``LocalTableStore`` over
            ``local_optimizers`` (the collection must then be unsharded).
        dense_optimizers: torch optimizers holding the collections' dense parameters
            (projections); their per-slot state follows every slot move, and the gate
            step discards the dense gradients of their parameters.
        local_optimizers: optimizers holding unsharded table weights (single process).
        gate_optimizer: optimizer of the gate logits; default one Adam parameter group per
            collection at that collection's ``config.gate_lr`` (the reference setting).
        model: the module the gate loss runs through; the gate step discards every gradient
            its backward leaves there (default: only ``dense_optimizers``' parameters).
    """

    def __init__(
        self,
        collections: Mapping[str, DimGrowEmbeddingBagCollection],
        stores: Mapping[str, TableStore] | None = None,
        dense_optimizers: Sequence[torch.optim.Optimizer] = (),
        local_optimizers: Sequence[torch.optim.Optimizer] = (),
        gate_optimizer: torch.optim.Optimizer | None = None,
        model: nn.Module | None = None,
    ) -> None:
        if not collections:
            raise ValueError("DimGrowController: no DimGrow collection to search")
        stores = stores or {}
        self.local_optimizers = list(local_optimizers)
        self.tracked = [
            TrackedCollection(
                path,
                coll,
                stores.get(path) or self._local_store(path, coll),
                PolicyState(coll.dims_list()),
                ImportanceAccumulator(tuple(coll.gate_values().shape)),  # type: ignore[arg-type]
            )
            for path, coll in sorted(collections.items())
        ]
        self.dense_optimizers = list(dense_optimizers)
        self.model = model
        self.gate_optimizer = gate_optimizer or torch.optim.Adam(
            [
                {"params": t.collection.gate_parameters(), "lr": t.collection.config.gate_lr}
                for t in self.tracked
            ]
        )
        #: Wraps the gate step's forward and backward (the handle runs them outside a
        #: train pipeline's rewired forwards: ``distributed.train_pipeline.unpipelined``).
        self.forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
        self.steps = 0
        self.before_replan: list[ReplanHook] = []
        self.after_replan: list[ReplanHook] = []
        self.replans = 0
        self.replan_seconds = 0.0
        self.replan_bytes_moved = 0
        self.last_report: CheckReport | None = None

    def _local_store(self, path: str, coll: DimGrowEmbeddingBagCollection) -> TableStore:
        if not isinstance(coll.ebc, EmbeddingBagCollection):
            raise ValueError(
                f"DimGrowController: {path or 'the collection'} is sharded ({type(coll.ebc).__name__}); "
                "pass its ShardedTableStore in stores= (shard_model(...).stores)"
            )
        return LocalTableStore(coll.ebc, self.local_optimizers)

    # ------------------------------------------------------------------ the step
    def step(self, loss_fn: LossFn | None = None, batch: Any = None) -> CheckReport | None:
        """The whole DimGrow step; call it once after every training step.

        With ``batch``: the DARTS-style :meth:`gate_step` on it (``loss_fn(batch)`` is the
        task loss, e.g. BCE on a validation batch). Without: the single-loader gate update
        from the gradient the training backward already left on the gates. Then the gates
        are recorded and, every ``check_interval`` steps, :meth:`check` runs. Returns the
        check's report when one ran. With ``config.gate_every`` = k only every k-th call
        steps the gates (``batch`` is ignored otherwise; :meth:`gate_due` says whether the
        next call will).
        """
        single_loader = batch is None
        # For the next training backward; whether the last one computed the gate gradient.
        had_training_grad = self._training_gate_grad(single_loader)
        if not self.gate_due():  # the training gradient on the gates is stale by the next gate step
            self.clear_gate_grads()
            return self.end_step()
        if not single_loader:
            if loss_fn is None:
                raise ValueError("DimGrowController.step: a gate batch needs its loss_fn")
            self.gate_step(loss_fn, batch)
        elif had_training_grad:
            self.gate_step_from_training_grad()
        else:
            # The last training backward ran without a gate gradient (a DARTS step came
            # before): this call switches it back on, the next one steps the gates.
            log.info(
                "DimGrow: single-loader mode from the next step on (this step's gates had no training gradient)"
            )
        return self.end_step()

    def _training_gate_grad(self, on: bool) -> bool:
        """Whether training backwards compute the gates' gradient (was it on?), then set it.

        Only single-loader mode reads that gradient; in DARTS mode :meth:`gate_step` clears
        it unread, so it is switched off there (a batch-sized product and sum per step).
        """
        was = all(t.collection.post.training_gate_grad for t in self.tracked)
        for t in self.tracked:
            t.collection.post.training_gate_grad = on
        return was

    def gate_step(self, loss_fn: LossFn, batch: Any) -> float:
        """DARTS-style gate update: ``loss_fn(batch) + penalty`` moves the gates only.

        Whatever the training backward left on the gates is dropped first; inside, every
        collection detaches its lookups (tables and their fused optimizer never see this
        batch); the dense gradients of this backward are discarded afterwards. Returns the
        task loss.
        """
        self.clear_gate_grads()
        with self.forward_context(), self.gate_mode():
            loss = loss_fn(batch)
            (loss + self.penalty()).backward()
        self.update_gates(add_penalty=False)  # the penalty is in this backward already
        self._drop_dense_grads()
        return float(loss.detach())

    def gate_step_from_training_grad(self) -> None:
        """Single-loader mode: step the gates on the training backward's gradient plus the penalty."""
        if any(theta.grad is None for theta in self.gate_parameters()):
            raise RuntimeError(
                "DimGrow single-loader step: the gates have no gradient; call step() right after the "
                "training backward, or pass a gate batch"
            )
        self.update_gates(add_penalty=True)

    def _drop_dense_grads(self) -> None:
        for opt in self.dense_optimizers:
            opt.zero_grad(set_to_none=True)
        if self.model is not None:
            for p in self.model.parameters():
                p.grad = None

    # ------------------------------------------------------------------ gate step pieces
    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for t in self.tracked for p in t.collection.gate_parameters()]

    def penalty(self) -> torch.Tensor:
        """Sum of the collections' gate penalties (the regulariser of the gate loss)."""
        return total_penalty([t.collection for t in self.tracked])

    @contextlib.contextmanager
    def gate_mode(self) -> Iterator[None]:
        """Every collection detaches its lookups: a backward reaches gates, never tables."""
        with contextlib.ExitStack() as stack:
            for t in self.tracked:
                stack.enter_context(t.collection.gate_step())
            yield

    def clear_gate_grads(self) -> None:
        for theta in self.gate_parameters():
            theta.grad = None

    def update_gates(self, add_penalty: bool = True) -> None:
        """One gate-optimizer step from the gradient now in ``theta.grad``.

        ``add_penalty`` backpropagates :meth:`penalty` first, so the caller's backward
        only has to carry the task loss (single-loader mode: the training backward the
        pipeline already ran). Pass ``False`` when the penalty was in that loss already.
        """
        if add_penalty:
            pen = self.penalty()
            if pen.requires_grad:
                pen.backward()
        for t in self.tracked:
            for theta in t.collection.gate_parameters():
                if theta.grad is not None:
                    t.collection.observe_gate_gradient(theta.grad)
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)

    def record(self) -> None:
        """Add the current gates to every importance window."""
        for t in self.tracked:
            t.importance.add(t.collection.gate_values())

    @property
    def gate_every(self) -> int:
        """Steps per gate step: the smallest ``config.gate_every`` of the tracked collections."""
        return min(t.collection.config.gate_every for t in self.tracked)

    def gate_due(self) -> bool:
        """Whether the step now running (the ``steps + 1``-th) is a gate step.

        Decided from the step count alone, so every rank agrees and a resumed run keeps
        the same schedule.
        """
        return (self.steps + 1) % self.gate_every == 0

    def _check_due(self, t: TrackedCollection) -> bool:
        """A multiple of ``check_interval`` fell within the training steps since the last gate step."""
        every, k = t.collection.config.check_interval, self.gate_every
        return self.steps // every > (self.steps - k) // every

    def end_step(self) -> CheckReport | None:
        """After a gate step: record the gates, count the step, run the check when one is due.

        After a step without a gate step (``gate_every`` > 1) only the count moves: the
        gates did not change, so there is nothing new to record or decide.
        """
        gated = self.gate_due()
        if gated:
            self.record()
        self.steps += 1
        if gated and any(self._check_due(t) for t in self.tracked):
            return self.check()
        return None

    # ------------------------------------------------------------------ check
    def _decide(self, t: TrackedCollection) -> list[DimChange]:
        """Gather this collection's window on every rank, run the pure policy on it."""
        table = gather_importance(t.importance.mean())
        t.importance.reset()
        rows = [table[i].tolist() for i in range(len(t.policy.dims))]
        coll = t.collection
        t.policy, changes = decide(
            rows, t.policy, coll.config, coll.max_dims, coll.dim_costs(), coll.budget_bytes()
        )
        return changes

    @staticmethod
    def _will_replan(t: TrackedCollection, dims: Sequence[int]) -> bool:
        """Whether setting the collection to ``dims`` changes any capacity (a rebuild)."""
        cfg = t.collection.config
        caps = t.collection.capacity_list()
        return any(capacity_for(d, c, cfg) != c for d, c in zip(dims, caps))

    def check(self) -> CheckReport:
        """All-gather importance, decide, apply identically on every rank, verify agreement.

        Collections whose check is due are checked; the ``before_replan`` hooks run once
        before the first rebuild and ``after_replan`` once after the last, so a pipeline
        is paused and resumed once however many tables are rebuilt.
        """
        report = CheckReport(self.steps)
        due = [t for t in self.tracked if self._check_due(t)]
        for t in due:
            report.changes[t.path] = self._decide(t)
        replan = any(report.changes[t.path] and self._will_replan(t, t.policy.dims) for t in due)
        self._apply_report(report, due, replan)
        self.last_report = report
        return report

    def _apply_report(self, report: CheckReport, tracked: list[TrackedCollection], replan: bool) -> None:
        """Apply ``report.changes`` of ``tracked`` with the re-plan hooks around them once."""
        if replan:
            for hook in self.before_replan:
                hook()
        try:
            for t in tracked:
                if report.changes[t.path]:
                    report.reports[t.path] = self._apply(t, report.changes[t.path])
        finally:
            if replan:
                for hook in self.after_replan:
                    hook()
        if report.replanned:
            self.replans += 1
            self.replan_seconds += sum(r.replan_seconds for r in report.reports.values())
            self.replan_bytes_moved += sum(r.bytes_moved for r in report.reports.values())

    def _apply(self, t: TrackedCollection, changes: list[DimChange]) -> ChangeReport:
        coll = t.collection
        result = coll.apply_changes(changes, t.store, [*self.dense_optimizers, self.gate_optimizer])
        check_agreement(coll.dims_list(), what=f"{t.path or 'collection'} dims")
        check_agreement(coll.capacity_list(), what=f"{t.path or 'collection'} capacities")
        return result

    def restart(self, dims: Mapping[str, Sequence[int]]) -> CheckReport:
        """Set every collection to ``dims`` (path -> per-table dims) and forget all evidence.

        The start of a search's learn-first epochs: the tables keep their trained columns
        (a dim above its target drops its last slots, below it reactivates the stored ones,
        re-planning where capacity changes), and gates, gate optimizer, importance windows,
        policy counters and the auto penalty start afresh, as at step 0. Every rank passes
        the same ``dims``.
        """
        report = CheckReport(self.steps)
        for t in self.tracked:
            report.changes[t.path] = _changes_to(t.collection.dims_list(), dims[t.path])
        replan = any(report.changes[t.path] and self._will_replan(t, dims[t.path]) for t in self.tracked)
        self._apply_report(report, self.tracked, replan)
        for t in self.tracked:
            t.policy = PolicyState(t.collection.dims_list())
            t.importance.reset()
            t.collection.post.reset_gate_state()
        self.gate_optimizer.state.clear()
        self.last_report = report
        return report

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything the controller adds to a run besides the model's own tensors.

        Gate optimizer, step and re-plan counters, and per collection its policy counters
        and the current importance window: with these (and the model) a resumed run takes
        the same decisions as the uninterrupted one.
        """
        return {
            "steps": self.steps,
            "replans": self.replans,
            "replan_seconds": self.replan_seconds,
            "replan_bytes_moved": self.replan_bytes_moved,
            "gate_optimizer": self.gate_optimizer.state_dict(),
            "collections": {
                t.path: {"policy": asdict(t.policy), "importance": t.importance.state_dict()}
                for t in self.tracked
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state["collections"]
        missing = sorted({t.path for t in self.tracked} - set(saved))
        if missing:
            raise ValueError(f"DimGrowController.load_state_dict: no state for collections {missing}")
        self.steps = int(state["steps"])
        self.replans = int(state["replans"])
        self.replan_seconds = float(state["replan_seconds"])
        self.replan_bytes_moved = int(state["replan_bytes_moved"])
        self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        for t in self.tracked:
            t.policy = PolicyState(**saved[t.path]["policy"])
            t.importance.load_state_dict(saved[t.path]["importance"])

    # ------------------------------------------------------------------ results
    def dims(self) -> dict[str, dict[str, int]]:
        return {t.path: t.collection.dims() for t in self.tracked}

    def found_dims(self) -> dict[str, dict[str, int]]:
        """Exported dims (active slots whose gate exceeds ``final_threshold``) per collection."""
        return {t.path: t.collection.export_dims() for t in self.tracked}


def _changes_to(current: Sequence[int], target: Sequence[int]) -> list[DimChange]:
    """The grow/shrink changes that take ``current`` dims to ``target`` (a shrink drops the last slot)."""
    if len(current) != len(target):
        raise ValueError(f"restart: {len(target)} dims given for {len(current)} tables")
    changes: list[DimChange] = []
    for t, (now, want) in enumerate(zip(current, target)):
        if want > now:
            changes.append(DimChange(t, "grow", want - 1, now, want))
        for d in range(now, want, -1):
            changes.append(DimChange(t, "shrink", d - 1, d, d - 1))
    return changes
