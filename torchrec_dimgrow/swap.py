"""Drop DimGrow into an existing TorchRec model and training loop (PEFT-style swap).

A user's TorchRec script keeps its model, its ``DistributedModelParallel``, its optimizer
and its ``TrainPipelineSparseDist``; DimGrow adds the marked lines (the full script is
``examples/dlrm_criteo.py``)::

    model = DLRMTrain(DLRM(EmbeddingBagCollection(tables, device="meta"), ...))
    apply_optimizer_in_backward(Adagrad, model.model.sparse_arch.parameters(), {"lr": 0.05})
    handle = swap_in(model, DimGrowConfig(d_max=16), align="project")          # DimGrow
    planner = EmbeddingShardingPlanner(..., constraints=handle.constraints())   # DimGrow
    dmp = DistributedModelParallel(model, device=device, plan=planner.collective_plan(...))
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense_optimizer])
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    handle.attach(dmp, pipeline=pipeline, optimizer=optimizer)                  # DimGrow
    for _ in range(steps):
        pipeline.progress(train_iter)   # forward, backward, optimizer step (unchanged)
        handle.step(next(val_iter))     # DimGrow: gate step; every check_interval a check
    export(build_model(), handle.found_dims())  # DimGrow: plain TorchRec model at the found dims

Where the lines go, and why:

* ``swap_in`` after the model is built, before the DMP (tables still on ``meta``): every
  ``torchrec.EmbeddingBagCollection`` (exact type) is replaced at the same module path by
  a :class:`~torchrec_dimgrow.modules.collection.DimGrowEmbeddingBagCollection` built
  from the same configs. Its reported configs keep the common width ``D``, so ``DLRM``'s
  constructor checks and ``SparseArch``'s reshape hold. Placed after the script's own
  ``apply_optimizer_in_backward``, the swap carries that fused optimizer over to the new
  tables; placed before, give ``apply_optimizer_in_backward`` the
  ``handle.embedding_parameters()`` (``sparse_arch.parameters()`` would now also hold the
  gates, which ``attach`` refuses).
* ``constraints=handle.constraints()`` in the planner: the fused kernel and sharding types
  the re-plan can copy (``attach`` checks the plan and says so if not).
* ``attach`` once, after the pipeline exists and before the first step: it builds the
  re-plan stores, takes the gate logits out of the user's dense optimizer (they get their
  own Adam at ``gate_lr``, as in the reference) and registers the pipeline and optimizer
  that a re-plan must update.
* ``step`` after every ``pipeline.progress`` (or after ``optimizer.step()`` in a plain
  loop). With a validation batch it is the DARTS-style gate step (validation loss +
  :meth:`DimGrowHandle.penalty`, lookups detached so the tables never train on validation
  data), run outside the pipeline without disturbing its prefetched batches. Without one
  it is the single-loader mode: the gates step on the gradient the training backward
  already left on them, plus the penalty (no second loader, no extra forward). Every
  ``check_interval`` steps it all-gathers importance, decides, applies and re-plans.

The penalty therefore never has to be written into the user's loss. Evaluate as before
(the same pipeline with ``model.eval()``), or through :meth:`DimGrowHandle.unpipelined`.

This module holds ``swap_in``; the handle is :mod:`torchrec_dimgrow.handle` and ``export``
:mod:`torchrec_dimgrow.swap_export`, both re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_dimgrow.config import AlignMode, DimGrowConfig
from torchrec_dimgrow.distributed.runtime import stock_collections
from torchrec_dimgrow.handle import DimGrowHandle, default_loss
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.optim import embedding_optimizer_of
from torchrec_dimgrow.swap_export import export, set_submodule


# ---------------------------------------------------------------------- module surgery
def _owned_by_torchrec(model: nn.Module, path: str) -> bool:
    """Whether an ancestor is a TorchRec module with its own sharder (e.g. the EBC inside a
    ``FeatureProcessedEmbeddingBagCollection``): swapping there would break that sharder."""
    parts = path.split(".")
    for i in range(1, len(parts)):
        owner = model.get_submodule(".".join(parts[:i]))
        if type(owner).__module__.startswith("torchrec.modules"):
            return True
    return False


def _dense_device(model: nn.Module, skip: Sequence[nn.Module]) -> torch.device:
    """Where the rest of the dense model lives (the gates and projections go there too)."""
    skipped = {id(p) for m in skip for p in m.parameters()}
    for p in model.parameters():
        if id(p) not in skipped and p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def swap_in(
    model: nn.Module,
    config: DimGrowConfig | None = None,
    align: AlignMode = "project",
    dense_device: torch.device | str | None = None,
    targets: Sequence[str] | None = None,
) -> DimGrowHandle:
    """Replace the ``EmbeddingBagCollection``\\ s of ``model`` in place by DimGrow collections.

    Same module path, same table configs, same device for the tables (``meta`` stays
    ``meta`` for DMP's lazy init); the gates and projections go to ``dense_device``
    (default: where the model's other parameters are). ``align="project"`` (learned
    per-field projection to the table's width) or ``"pad"`` (zero-pad) present every
    field at its configured width, as ``DLRM`` needs; ``"raw"`` outputs the logical dims
    (only for models that read the widths from ``embedding_bag_configs()``).

    ``targets`` (module paths) restricts the swap, like PEFT's ``target_modules``; by
    default every stock EBC is swapped except those inside another TorchRec module (a
    ``FeatureProcessedEmbeddingBagCollection``'s, say, which its own sharder expects stock).
    Call it before sharding. Returns the :class:`DimGrowHandle` that drives the search.
    """
    if isinstance(model, DistributedModelParallel) or any(
        isinstance(m, ShardedModule) for m in model.modules()
    ):
        raise ValueError("swap_in: call it on the unsharded model, before DistributedModelParallel")
    found = _swap_targets(model, targets)
    config = config or DimGrowConfig()
    dense = (
        torch.device(dense_device)
        if dense_device is not None
        else _dense_device(model, [m for _, m in found])
    )
    swapped: dict[str, DimGrowEmbeddingBagCollection] = {}
    for path, ebc in found:
        coll = DimGrowEmbeddingBagCollection(
            [replace(c) for c in ebc.embedding_bag_configs()],
            config,
            align=align,
            is_weighted=ebc.is_weighted(),
            device=ebc.device,
        )
        coll.post.to(dense)
        spec = embedding_optimizer_of(list(ebc.parameters()))
        if spec is not None:
            spec.apply(coll.ebc.parameters())
        set_submodule(model, path, coll)
        swapped[path] = coll
    return DimGrowHandle(model, swapped, align)


def _swap_targets(
    model: nn.Module, targets: Sequence[str] | None
) -> list[tuple[str, EmbeddingBagCollection]]:
    found = stock_collections(model)
    if targets is not None:
        unknown = sorted(set(targets) - {p for p, _ in found})
        if unknown:
            raise ValueError(f"swap_in: no EmbeddingBagCollection at {unknown}")
        found = [(p, m) for p, m in found if p in set(targets)]
    else:
        found = [(p, m) for p, m in found if not _owned_by_torchrec(model, p)]
    if not found:
        raise ValueError("swap_in: the model contains no torchrec.EmbeddingBagCollection to swap")
    if any(path == "" for path, _ in found):
        raise ValueError(
            "swap_in: the model is itself an EmbeddingBagCollection; build a DimGrowEmbeddingBagCollection"
        )
    return found


__all__ = [
    "DimGrowHandle",
    "default_loss",
    "export",
    "swap_in",
]
