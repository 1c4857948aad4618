"""The export half of the swap: fresh collections at the found dims, at the same module paths.

:func:`~torchrec_dimgrow.swap.swap_in` puts DimGrow collections into a user's model and
:class:`~torchrec_dimgrow.handle.DimGrowHandle` drives their search; :func:`export` is the
way back (PEFT's ``merge_and_unload``): it replaces each collection (DimGrow or stock) by a
plain TorchRec one at the found dims, or, with ``serving``, by TorchRec's quantized one. The
module-path surgery both directions share (:func:`set_submodule`) lives here, below both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_dimgrow.config import AlignMode
from torchrec_dimgrow.distributed.runtime import find_collections, stock_collections
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.mixed_dim import export_collection


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``path`` of ``root`` (replacing what is there)."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _source_configs(module: nn.Module) -> list[EmbeddingBagConfig]:
    if isinstance(module, DimGrowEmbeddingBagCollection):
        return [replace(t) for t in module._user_configs]
    return [replace(t) for t in module.embedding_bag_configs()]  # type: ignore[operator]


def export(
    model: nn.Module,
    dims: Mapping[str, int] | Mapping[str, Mapping[str, int]],
    align: AlignMode = "project",
    device: torch.device | str | None = None,
    serving: str | None = None,
) -> nn.Module:
    """Put fresh collections at ``dims`` into ``model``, in place, at the same module paths.

    With ``serving`` (``fp32``/``fp16``/``int8``/``int4``), ``model`` is instead the model
    trained at ``dims`` (after an earlier export), and its tables are swapped, weights kept,
    for TorchRec's quantized collection (:func:`torchrec_dimgrow.serving.quantize_at_dims`).

    ``model`` is either an unsharded model that still holds DimGrow collections, or a
    freshly built copy of the user's model (stock ``EmbeddingBagCollection``\\ s, e.g. on
    ``meta`` for a DMP retrain): build the model again exactly as before the search and
    export into it. ``dims`` is ``{table: dim}`` (or ``{module path: {table: dim}}``).
    The new tables take the original configs' ``init_fn``; everything else in ``model``
    is untouched. Returns ``model``.

    For ``DLRM`` use ``align="pad"`` or ``"project"`` (one common presented width);
    ``"raw"`` yields a plain ``EmbeddingBagCollection`` for models that take mixed widths.
    """
    if serving is not None:
        from torchrec_dimgrow.serving import quantize_at_dims

        return quantize_at_dims(model, dims, serving)
    targets: list[tuple[str, nn.Module]] = list(find_collections(model)) or list(stock_collections(model))
    if not targets:
        raise ValueError("export: the model contains no DimGrow collection and no EmbeddingBagCollection")
    for path, module in targets:
        if any(isinstance(m, ShardedModule) for m in module.modules()):
            raise ValueError(
                f"export: {path} is sharded; rebuild the model (e.g. on meta) and export into the fresh copy"
            )
        if path == "":
            raise ValueError("export: the model is itself a collection; use export_collection()")
        nested = dims.get(path)
        per_table: Mapping[str, int] = nested if isinstance(nested, Mapping) else dims  # type: ignore[assignment]
        dev = device if device is not None else getattr(module, "device", None)
        weighted = bool(module.is_weighted())  # type: ignore[operator]
        new = export_collection(_source_configs(module), per_table, align, weighted, dev)
        set_submodule(model, path, new)
    return model


__all__ = ["export", "set_submodule"]
