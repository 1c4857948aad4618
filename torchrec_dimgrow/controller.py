"""The DimGrow search step, usable from any training loop, TorchRec train pipelines included.

:class:`DimGrowController` owns what the search adds to a training step: the gate
optimizer, the importance window, the policy state and the check (all-gather, decide,
apply, re-plan) of every DimGrow collection of a model. It never runs the user's
forward: the caller produces the gate gradient (validation batch, DARTS-style, or the
training batch's own backward in single-loader mode) and calls
:meth:`~DimGrowController.update_gates` and :meth:`~DimGrowController.end_step`.
Keeping a ``TrainPipelineSparseDist`` valid around that step is
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

from torchrec_dimgrow.distributed.importance import ImportanceAccumulator, check_agreement, gather_importance
from torchrec_dimgrow.modules.collection import ChangeReport, DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.table_store import TableStore
from torchrec_dimgrow.policy import DimChange, PolicyState, capacity_for, decide

log = logging.getLogger(__name__)

ReplanHook = Callable[[], None]


@dataclass
class TrackedCollection:
    """One DimGrow collection under search: its store, policy counters and importance window."""

    path: str
    collection: DimGrowEmbeddingBagCollection
    store: TableStore | None
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
    """Gate optimizer, importance and grow/shrink/re-plan checks of a model's DimGrow collections.

    Args:
        collections: module path -> collection (paths only name them in reports; every rank
            must pass the same paths, they fix the order of the collectives).
        stores: path -> table store (``ShardedTableStore`` under DMP). ``None`` (or a
            missing path) uses a ``LocalTableStore`` over ``local_optimizers``.
        dense_optimizers: torch optimizers holding the collections' dense parameters
            (projections); their per-slot state follows every slot move.
        local_optimizers: optimizers holding unsharded table weights (single process).
        gate_optimizer: optimizer of the gate logits; default one Adam parameter group per
            collection at that collection's ``config.gate_lr`` (the reference setting).
    """

    def __init__(
        self,
        collections: Mapping[str, DimGrowEmbeddingBagCollection],
        stores: Mapping[str, TableStore] | None = None,
        dense_optimizers: Sequence[torch.optim.Optimizer] = (),
        local_optimizers: Sequence[torch.optim.Optimizer] = (),
        gate_optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not collections:
            raise ValueError("DimGrowController: no DimGrow collection to search")
        stores = stores or {}
        self.tracked = [
            TrackedCollection(
                path,
                coll,
                stores.get(path),
                PolicyState(coll.post.dims_list()),
                ImportanceAccumulator(tuple(coll.post.gate.theta.shape)),  # type: ignore[arg-type]
            )
            for path, coll in sorted(collections.items())
        ]
        self.dense_optimizers = list(dense_optimizers)
        self.local_optimizers = list(local_optimizers)
        self.gate_optimizer = gate_optimizer or torch.optim.Adam(
            [
                {"params": [t.collection.post.gate.theta], "lr": t.collection.config.gate_lr}
                for t in self.tracked
            ]
        )
        self.steps = 0
        self.before_replan: list[ReplanHook] = []
        self.after_replan: list[ReplanHook] = []
        self.replans = 0
        self.last_report: CheckReport | None = None

    # ------------------------------------------------------------------ gate step pieces
    def gate_parameters(self) -> list[nn.Parameter]:
        return [t.collection.post.gate.theta for t in self.tracked]

    def penalty(self) -> torch.Tensor:
        """Sum of the collections' gate penalties (the regulariser of the gate loss)."""
        total = self.tracked[0].collection.penalty()
        for t in self.tracked[1:]:
            total = total + t.collection.penalty()
        return total

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
            theta = t.collection.post.gate.theta
            if theta.grad is not None:
                t.collection.post.observe_task_gradient(theta.grad)
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)

    def record(self) -> None:
        """Add the current gates to every importance window."""
        for t in self.tracked:
            t.importance.add(t.collection.gate_values())

    def end_step(self) -> CheckReport | None:
        """Record the gates, count the step, and run the check when one is due."""
        self.record()
        self.steps += 1
        if any(self.steps % t.collection.config.check_interval == 0 for t in self.tracked):
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
            rows, t.policy, coll.config, coll.post.d_max, coll.dim_costs(), coll.budget_bytes()
        )
        return changes

    @staticmethod
    def _will_replan(t: TrackedCollection) -> bool:
        """Whether applying the policy's new dims changes any capacity (a rebuild)."""
        cfg = t.collection.config
        caps = t.collection.post.capacity_list()
        return any(capacity_for(d, c, cfg) != c for d, c in zip(t.policy.dims, caps))

    def check(self) -> CheckReport:
        """All-gather importance, decide, apply identically on every rank, verify agreement.

        Collections whose check is due are checked; the ``before_replan`` hooks run once
        before the first rebuild and ``after_replan`` once after the last, so a pipeline
        is paused and resumed once however many tables are rebuilt.
        """
        report = CheckReport(self.steps)
        due = [t for t in self.tracked if self.steps % t.collection.config.check_interval == 0]
        for t in due:
            report.changes[t.path] = self._decide(t)
        replan = any(report.changes[t.path] and self._will_replan(t) for t in due)
        if replan:
            for hook in self.before_replan:
                hook()
        try:
            for t in due:
                if report.changes[t.path]:
                    report.reports[t.path] = self._apply(t, report.changes[t.path])
        finally:
            if replan:
                for hook in self.after_replan:
                    hook()
        if report.replanned:
            self.replans += 1
        self.last_report = report
        return report

    def _apply(self, t: TrackedCollection, changes: list[DimChange]) -> ChangeReport:
        coll = t.collection
        store = t.store
        if store is None:
            from torchrec_dimgrow.modules.table_store import LocalTableStore

            store = LocalTableStore(coll.ebc, self.local_optimizers)
        result = coll.apply_changes(changes, store, [*self.dense_optimizers, self.gate_optimizer])
        check_agreement(coll.post.dims_list(), what=f"{t.path or 'collection'} dims")
        check_agreement(coll.post.capacity_list(), what=f"{t.path or 'collection'} capacities")
        return result

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
