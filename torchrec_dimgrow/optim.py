"""Optimizers of a DimGrow model: the tables' fused optimizer and surgery on the user's ones.

* :class:`EmbeddingOptimizer` names the fused (in-backward) optimizer of the tables. A
  re-plan builds new tables and must attach the same optimizer to them, so it is kept as
  a value (name, lr, extra kwargs), not as an optimizer object.
* :func:`embedding_optimizer_of` reads that value back from what
  ``apply_optimizer_in_backward`` attached to a user's tables.
* :meth:`EmbeddingOptimizer.unfused` builds it as a plain torch optimizer (unsharded
  tables); :func:`state_bytes` counts what optimizers keep (the memory accounting).
* :func:`remove_parameters` / :func:`replace_optimizer` edit a user's (possibly nested
  ``CombinedOptimizer``) training optimizer in place: the gate logits leave it, and the
  DMP's rebuilt fused optimizer replaces the old one after a re-plan.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from torchrec_dimgrow.errors import UsageError

#: Fused table optimizers fbgemm's CPU kernel implements (the others need CUDA).
CPU_FUSED_OPTIMIZERS: tuple[str, ...] = ("sgd", "adagrad", "rowwise_adagrad")

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
}


def _rowwise() -> type[torch.optim.Optimizer]:
    from torchrec.optim import RowWiseAdagrad

    return RowWiseAdagrad  # type: ignore[return-value]


@dataclass
class EmbeddingOptimizer:
    """The fused (in-backward) optimizer of the tables, re-applied at every rebuild."""

    name: str = "adagrad"
    lr: float = 0.05
    extra: dict[str, Any] = field(default_factory=dict)

    def cls(self) -> type[torch.optim.Optimizer]:
        if self.name == "rowwise_adagrad":
            return _rowwise()
        try:
            return OPTIMIZERS[self.name]
        except KeyError as exc:
            raise ValueError(f"unknown embedding optimizer {self.name!r}") from exc

    def rowwise(self) -> bool:
        return any(self.optimizer_kinds_rowwise())

    def optimizer_kinds_rowwise(self) -> list[bool]:
        return list(self.state_kinds().values())

    def state_kinds(self) -> dict[str, bool]:
        """Fused optimizer states per table: name -> True if one value per row (row-wise)."""
        return {
            "adagrad": {"momentum1": False},
            "rowwise_adagrad": {"momentum1": True},
            "sgd": {},
            "adam": {"momentum1": False, "momentum2": False},
        }[self.name]

    def check_device(self, device: torch.device) -> None:
        """Refuse a fused optimizer the tables' kernel lacks on ``device``.

        fbgemm's CPU kernel trains fused tables with SGD, Adagrad and RowWiseAdagrad only;
        without this check a CPU run with ``adam`` fails deep inside TorchRec's sharding,
        after the data was prepared, with an assertion naming no flag.
        """
        if device.type == "cpu" and self.name not in CPU_FUSED_OPTIMIZERS:
            raise UsageError(
                f"train.embedding_optimizer {self.name}: the fused CPU kernel (fbgemm-gpu) supports "
                f"{', '.join(CPU_FUSED_OPTIMIZERS)} only; use one of those, or run on CUDA"
            )

    def apply(self, params: Any) -> None:
        apply_optimizer_in_backward(self.cls(), params, {"lr": self.lr, **self.extra})

    def unfused(self, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        """The same optimizer as a plain torch optimizer over ``params`` (unsharded tables
        trained with dense gradients, e.g. the baselines' ``--local`` path)."""
        cls: Any = self.cls()
        return cls(list(params), lr=self.lr, **self.extra)


def tensor_bytes(t: Any) -> int:
    """Bytes this rank holds for a tensor or a ShardedTensor (its local shards)."""
    if hasattr(t, "local_shards"):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards())
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return 0


def state_bytes(optimizers: Sequence[Any]) -> int:
    """Bytes of every tensor the optimizers keep (moments, Adagrad sums, step counters)."""
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            total += sum(tensor_bytes(v) for v in state.values())
    return total


_OPTIMIZER_NAMES: dict[str, str] = {
    "Adagrad": "adagrad",
    "SGD": "sgd",
    "Adam": "adam",
    "RowWiseAdagrad": "rowwise_adagrad",
}


def embedding_optimizer_of(params: Sequence[torch.Tensor]) -> EmbeddingOptimizer | None:
    """The fused optimizer ``apply_optimizer_in_backward`` attached to ``params``, if any.

    The re-plan rebuilds the tables and must re-attach the same optimizer to them.
    """
    for p in params:
        classes = getattr(p, "_optimizer_classes", None)
        if not classes:
            continue
        cls, kwargs = classes[0], dict(p._optimizer_kwargs[0])  # type: ignore[attr-defined]
        name = _OPTIMIZER_NAMES.get(cls.__name__)
        if name is None:
            raise ValueError(
                f"in-backward optimizer {cls.__name__} is not supported by the DimGrow re-plan "
                f"(supported: {sorted(_OPTIMIZER_NAMES)})"
            )
        # TorchRec's sharder writes its own keys ("optimizer": EmbOptimType) into this very
        # dict; keep only what the optimizer class itself accepts.
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
        lr = float(kwargs.pop("lr", EmbeddingOptimizer.lr))
        return EmbeddingOptimizer(name, lr, {k: v for k, v in kwargs.items() if k in accepted})
    return None


def leaf_optimizers(opt: torch.optim.Optimizer | None) -> list[torch.optim.Optimizer]:
    """Torch optimizers inside ``opt`` (through CombinedOptimizer / KeyedOptimizerWrapper).

    Fused embedding optimizers (other ``KeyedOptimizer`` kinds) are left out: their state
    lives in the sharded tables and the re-plan store handles it.
    """
    if opt is None:
        return []
    if isinstance(opt, CombinedOptimizer):
        return [leaf for _, sub in opt.optimizers for leaf in leaf_optimizers(sub)]
    if isinstance(opt, KeyedOptimizerWrapper):
        return [opt._optimizer]
    if isinstance(opt, KeyedOptimizer):
        return []
    return [opt]


def _keyed_wrappers(opt: torch.optim.Optimizer | None) -> list[KeyedOptimizer]:
    if isinstance(opt, CombinedOptimizer):
        return [k for _, sub in opt.optimizers for k in _keyed_wrappers(sub)]
    return [opt] if isinstance(opt, KeyedOptimizerWrapper) else []


def remove_parameters(opt: torch.optim.Optimizer | None, params: Sequence[torch.Tensor]) -> int:
    """Take ``params`` out of ``opt`` (and its state); returns how many entries were removed.

    The gate logits are trained by the handle's own optimizer on the gate loss; left in
    the user's dense optimizer they would also follow the training loss alone.
    """
    ids = {id(p) for p in params}
    removed = 0
    for leaf in leaf_optimizers(opt):
        for group in leaf.param_groups:
            keep = [p for p in group["params"] if id(p) not in ids]
            removed += len(group["params"]) - len(keep)
            group["params"] = keep
        for p in params:
            leaf.state.pop(p, None)
    for keyed in _keyed_wrappers(opt):
        if isinstance(keyed.params, dict):
            for key in [k for k, v in keyed.params.items() if id(v) in ids]:
                del keyed.params[key]
    return removed


def replace_optimizer(opt: torch.optim.Optimizer | None, old: object, new: KeyedOptimizer) -> bool:
    """Swap ``old`` for ``new`` inside a (nested) ``CombinedOptimizer``, in place."""
    if not isinstance(opt, CombinedOptimizer):
        return False
    found = False
    entries = opt.optimizers  # the live list
    for i, (key, sub) in enumerate(entries):
        if sub is old:
            entries[i] = (key, new)
            found = True
        else:
            found = replace_optimizer(sub, old, new) or found
    return found
