"""DimReg-style gates (optional baseline): ShuffleGate without the shuffle.

A ``d_max`` table per field; every (field, dim) column is multiplied by a gate
``g = sigmoid(tau * theta)`` (theta init 0, tau 5). The regulariser
``reg_weight * mean(g - |g - mean(g)|)`` pushes gates down while rewarding their spread
(polarisation). Found dim = number of gates with theta > 0. This is what the DimGrow
authors' re-implementation does; it isolates what the shuffle noise adds to DimGrow's gates.
``gates_on_val`` moves the gate update onto validation batches (DARTS style) instead of
training them jointly with the weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_dimgrow.baselines.base import (
    BaselineConfig,
    BaselineSearch,
    Trained,
)
from torchrec_dimgrow.baselines.supernet import (
    SparseSuperNet,
    field_blocks,
    keyed,
)
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData


@dataclass
class DimRegConfig(BaselineConfig):
    tau: float = 5.0
    reg_weight: float = 0.1
    gates_on_val: bool = False


class GatePost(nn.Module):
    """Multiplies ``sigmoid(tau * theta)`` (F, d_max) into the lookups."""

    def __init__(self, fields: Sequence[str], d_max: int, tau: float, stored: int | None = None) -> None:
        super().__init__()
        self.fields = list(fields)
        self.d_max = d_max
        self.stored = stored or d_max
        self.tau = tau
        self.theta = nn.Parameter(torch.zeros(len(self.fields), d_max))

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.tau * self.theta)

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        x = field_blocks(pooled, self.fields, self.d_max, self.stored)
        return keyed(self.fields, self.d_max, x * self.gates())

    def regularizer(self) -> torch.Tensor:
        g = self.gates()
        return (g - (g - g.mean()).abs()).mean()


class DimRegSearch(BaselineSearch):
    name = "dimreg"
    config_cls = DimRegConfig
    config: DimRegConfig

    def build_post(self, fields: Sequence[str], vocab: dict[str, int]) -> nn.Module:
        cfg = self.config
        return GatePost(fields, cfg.d_max, cfg.tau, cfg.stored(cfg.d_max))

    def gate_parameters(self, sparse: SparseSuperNet) -> list[nn.Parameter]:
        return [sparse.post.theta] if self.config.gates_on_val else []

    def _reg(self, sparse: SparseSuperNet) -> torch.Tensor:
        return self.config.reg_weight * sparse.post.regularizer()

    def train_regularizer(self, sparse: SparseSuperNet) -> torch.Tensor | None:
        return None if self.config.gates_on_val else self._reg(sparse)

    def gate_regularizer(self, sparse: SparseSuperNet) -> torch.Tensor | None:
        return self._reg(sparse) if self.config.gates_on_val else None

    def export_dims(self, trained: Trained, data: PreparedData, train_cfg: TrainConfig) -> dict[str, int]:
        post = trained.sparse.post
        return {f: int((row > 0).sum()) for f, row in zip(post.fields, post.theta.detach())}

    def extra_info(self, trained: Trained) -> dict[str, Any]:
        post = trained.sparse.post
        return {
            "gates": {
                f: [round(float(v), 4) for v in row] for f, row in zip(post.fields, post.gates().detach())
            }
        }
