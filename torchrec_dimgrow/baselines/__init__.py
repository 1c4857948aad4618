"""SuperNet embedding-dimension-search baselines, built on plain TorchRec EBCs.

``BASELINES`` maps a method name to its :class:`BaselineSearch` class; :func:`make_baseline`
builds one with config overrides; :func:`torchrec_dimgrow.recipes.baseline.run_baseline` runs
it. Every search returns per-field dims in the DimGrow ``dims.json`` format, so the shared
retrain recipe evaluates all methods the same way.
"""

from __future__ import annotations

from typing import Any

from torchrec_dimgrow.baselines.autodim import AutoDimConfig, AutoDimPost, AutoDimSearch
from torchrec_dimgrow.baselines.base import (
    BaselineConfig,
    BaselineSearch,
    Placement,
)
from torchrec_dimgrow.baselines.dimreg import DimRegConfig, DimRegSearch
from torchrec_dimgrow.baselines.optembed import Evolution, OptEmbedConfig, OptEmbedPost, OptEmbedSearch
from torchrec_dimgrow.baselines.sseds import MaskPost, SSEDSConfig, SSEDSSearch
from torchrec_dimgrow.baselines.supernet import (
    SparseSuperNet,
)
from torchrec_dimgrow.baselines.uniform import UniformConfig, UniformSearch

BASELINES: dict[str, type[BaselineSearch]] = {
    "uniform": UniformSearch,
    "autodim": AutoDimSearch,
    "optembed": OptEmbedSearch,
    "sseds": SSEDSSearch,
    "dimreg": DimRegSearch,
}


def make_baseline(name: str, **overrides: Any) -> BaselineSearch:
    """``BASELINES[name]`` with its config built from the defaults plus ``overrides``."""
    try:
        cls = BASELINES[name]
    except KeyError as exc:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}") from exc
    known = set(cls.config_cls.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{name}: unknown config keys {unknown}; known: {sorted(known)}")
    return cls(cls.config_cls(**overrides))


__all__ = [
    "BASELINES",
    "AutoDimConfig",
    "AutoDimPost",
    "AutoDimSearch",
    "BaselineConfig",
    "BaselineSearch",
    "DimRegConfig",
    "DimRegSearch",
    "Evolution",
    "MaskPost",
    "OptEmbedConfig",
    "OptEmbedPost",
    "OptEmbedSearch",
    "Placement",
    "SSEDSConfig",
    "SSEDSSearch",
    "SparseSuperNet",
    "UniformConfig",
    "UniformSearch",
    "make_baseline",
]
