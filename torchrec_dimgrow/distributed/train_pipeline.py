"""Keep a TorchRec train pipeline valid around the extra work a DimGrow step does.

* :func:`unpipelined` temporarily gives sharded modules rewired by a
  ``TrainPipelineSparseDist`` their own forward back, so an extra forward (the gate step
  on a validation batch, an evaluation) can run on the model between two
  ``pipeline.progress`` calls without consuming the pipeline's prefetched inputs.
* :class:`PipelineReplanGuard` keeps a pipeline valid across a re-plan: before the
  sharded tables are rebuilt it finishes the in-flight input distribution of the
  prefetched batches and detaches the pipeline; afterwards it re-attaches it (re-tracing
  the model, so the new sharded module is the one pipelined) and redoes the input
  distribution of the next batch through the new module. No prefetched batch is lost and
  no reference to the old sharded module is kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn
from torchrec.distributed.train_pipeline.runtime_forwards import BaseForward, KJTAllToAllForward


def _rewired(model: nn.Module) -> list[tuple[Any, Any]]:
    """(object, instance forward) pairs a train pipeline installed on ``model``.

    ``TrainPipelineSparseDist`` replaces ``forward`` on each pipelined sharded module (a
    ``BaseForward`` that consumes the prefetched input distribution) and on each of their
    KJT all-to-alls (a ``KJTAllToAllForward`` returning split metadata). Both are
    instance attributes, so deleting them restores the class forward.
    """
    found: list[tuple[Any, Any]] = []
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if isinstance(fwd, BaseForward):
            found.append((module, fwd))
        for input_dist in getattr(module, "_input_dists", None) or []:
            kjt_dist = getattr(input_dist, "_dist", None)
            fwd = getattr(kjt_dist, "__dict__", {}).get("forward")
            if isinstance(fwd, KJTAllToAllForward):
                found.append((kjt_dist, fwd))
    return found


@contextlib.contextmanager
def unpipelined(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` with its sharded modules' own forwards, then re-install the pipeline's.

    Between two ``pipeline.progress`` calls the pipeline's prefetched batches keep their
    state untouched: the extra forward does its own (synchronous) input distribution.
    Cheap (attribute swaps only), unlike ``pipeline.detach()``/``attach()``, which
    re-trace the model and restart the next batch's input distribution.
    """
    patched = _rewired(model)
    seen: set[int] = set()
    for obj, _ in patched:
        if id(obj) not in seen:
            seen.add(id(obj))
            del obj.__dict__["forward"]
    try:
        yield model
    finally:
        for obj, fwd in patched:
            obj.forward = fwd


def _finish_input_dists(context: Any) -> None:
    """Wait on every input-distribution request a pipeline context holds, then drop them.

    They were issued through the sharded module about to be replaced; finishing them
    keeps the collectives of every rank in step before the re-plan's own collectives.
    """
    for names, awaitable in list(getattr(context, "fused_splits_awaitables", [])):
        for _, request in zip(names, awaitable.wait()):
            request.wait()
    for request in list(getattr(context, "input_dist_tensors_requests", {}).values()):
        request.wait()
    for name in (
        "fused_splits_awaitables",
        "input_dist_splits_requests",
        "input_dist_tensors_requests",
        "module_contexts",
        "module_contexts_next_batch",
    ):
        value = getattr(context, name, None)
        if value is not None:
            value.clear()


class PipelineReplanGuard:
    """Pause/resume hooks that keep a ``TrainPipelineSparseDist`` valid across a re-plan.

    Register :meth:`before` and :meth:`after` as the controller's replan hooks (the
    :class:`~torchrec_dimgrow.swap.DimGrowHandle` does). ``model`` is the DMP the pipeline
    drives. Only the public pipeline API is used (``contexts``, ``detach``, ``attach``,
    ``wait_sparse_data_dist``); a pipeline without ``contexts`` (e.g. ``TrainPipelineBase``)
    keeps no per-module state and needs nothing.
    """

    def __init__(self, pipeline: Any, model: nn.Module) -> None:
        self.pipeline = pipeline
        self.model = model
        self.paused = False

    def _supported(self) -> bool:
        return all(
            hasattr(self.pipeline, a) for a in ("contexts", "detach", "attach", "wait_sparse_data_dist")
        )

    def before(self) -> None:
        if not self._supported():
            return
        for context in list(self.pipeline.contexts):
            _finish_input_dists(context)
        self.pipeline.detach()
        self.paused = True

    def after(self) -> None:
        if not self.paused:
            return
        self.paused = False
        self.pipeline.attach(self.model)
        if self.pipeline.contexts:
            # attach() re-traced the model and started the next batch's input
            # distribution through the new sharded module; finish its first half as
            # progress() would have done for a batch it prefetched itself.
            self.pipeline.wait_sparse_data_dist(self.pipeline.contexts[0])
