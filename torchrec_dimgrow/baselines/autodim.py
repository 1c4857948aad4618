"""AutoDim (Zhao et al., WWW'21): a separate-table SuperNet mixed by Gumbel-softmax.

For every field one table per candidate width ``c`` (default: powers of two up to ``d_max``,
e.g. 2, 4, 8, 16). Each candidate's lookup is projected to a common width ``P`` (Linear with
bias), normalised by a BatchNorm without affine parameters (so candidates of different widths
arrive on one scale), and the field's output is the Gumbel-softmax mixture of its candidates
with per-field architecture logits. Weights train on training batches, the logits on
validation batches (first-order DARTS); the temperature anneals as
``max(0.01, 1 - 5e-5 * step)``. The chosen dim of a field is its argmax candidate.

TorchRec layout: one plain EBC holding one table per (field, candidate), named
``f"{field}__d{c}"`` and all reading the field's KJT feature (TorchRec names the outputs
``f"{field}@{table}"``), so the stock sharder shards it; the projections, BatchNorms and logits
live in the dense :class:`AutoDimPost`. ``weight_sharing=True`` is the variant the DimGrow
authors compared against: one ``d_max`` table per field, candidate ``c`` = its first ``c``
columns, and one projection per field whose first ``c`` rows serve candidate ``c``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedTensor

from torchrec_dimgrow.baselines.base import (
    BaselineConfig,
    BaselineSearch,
    Trained,
)
from torchrec_dimgrow.baselines.supernet import (
    SparseSuperNet,
    keyed,
    table_config,
)
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.modules.backbone import Combine


def power_of_two_candidates(d_max: int) -> tuple[int, ...]:
    """2, 4, ..., up to ``d_max`` (``d_max`` itself appended when it is not a power of two)."""
    out = [c for c in (2**k for k in range(1, 31)) if c <= d_max]
    if not out or out[-1] != d_max:
        out.append(d_max)
    return tuple(out)


@dataclass
class AutoDimConfig(BaselineConfig):
    """AutoDim knobs.

    ``candidates``: candidate widths (``None``: powers of two up to ``d_max``; any subset of
    1..d_max is allowed). ``common_dim``: width every candidate is projected to; equal to the
    backbone's ``adapter_dim`` the fields are summed (``combine="sum"``), otherwise
    concatenated. ``init_logit``: initial architecture logit (the reference: 1, i.e. uniform).
    ``temp_decay``/``temp_min``: temperature ``max(temp_min, 1 - temp_decay * step)``.
    ``gate_every``: 1 alternates every step as the AutoDim paper does; the DimGrow authors'
    re-implementation uses 10.
    """

    candidates: tuple[int, ...] | None = None
    common_dim: int = 64
    weight_sharing: bool = False
    init_logit: float = 1.0
    temp_decay: float = 5e-5
    temp_min: float = 0.01

    def resolved_candidates(self) -> tuple[int, ...]:
        cands = (
            tuple(sorted(set(self.candidates))) if self.candidates else power_of_two_candidates(self.d_max)
        )
        bad = [c for c in cands if not 1 <= c <= self.d_max]
        if bad:
            raise ValueError(f"AutoDimConfig: candidates {bad} outside 1..d_max={self.d_max}")
        return cands


def table_name(field: str, width: int) -> str:
    return f"{field}__d{width}"


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    """nn.Linear's default init bound, 1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(max(1, fan_in))
    with torch.no_grad():
        return t.uniform_(-bound, bound)


class AutoDimPost(nn.Module):
    """Projection + BatchNorm per (field, candidate) and the Gumbel-softmax mixture.

    Input: the EBC's KeyedTensor (candidate-major tables, or one ``d_max`` table per field in
    weight-sharing mode). Output: a KeyedTensor with ``common_dim`` columns per field.
    Projections of all fields of one candidate run as one batched ``einsum`` and one
    BatchNorm over ``F * P`` features (equivalent to a BatchNorm per (field, candidate)).
    """

    temperature: torch.Tensor

    def __init__(
        self,
        fields: Sequence[str],
        candidates: Sequence[int],
        common_dim: int,
        weight_sharing: bool,
        d_max: int,
        init_logit: float = 1.0,
        stored: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.fields = list(fields)
        self.candidates = list(candidates)
        self.common_dim = common_dim
        self.weight_sharing = weight_sharing
        self.d_max = d_max
        # stored width of each input table (>= its candidate width, see capacity_block)
        self.stored = (
            list(stored) if stored is not None else ([d_max] if weight_sharing else list(candidates))
        )
        n, p = len(self.fields), common_dim
        if weight_sharing:
            self.shared_weight = nn.Parameter(_uniform_(torch.empty(n, d_max, p), d_max))
            self.weights = nn.ParameterList()
            self.keys = list(self.fields)
        else:
            self.weights = nn.ParameterList(
                [nn.Parameter(_uniform_(torch.empty(n, c, p), c)) for c in candidates]
            )
            shared = len(self.candidates) > 1
            self.keys = [f"{f}@{table_name(f, c)}" if shared else f for c in candidates for f in self.fields]
        self.bias = nn.Parameter(torch.stack([_uniform_(torch.empty(n, p), c) for c in candidates]))
        self.bn = nn.ModuleList([nn.BatchNorm1d(n * p, affine=False) for _ in candidates])
        self.alpha = nn.Parameter(torch.full((n, len(self.candidates)), float(init_logit)))
        self.register_buffer("temperature", torch.tensor(1.0))

    def candidate_inputs(self, pooled: KeyedTensor) -> list[torch.Tensor]:
        """One (B, F, c) tensor per candidate."""
        values = pooled.values()
        b, n = values.shape[0], len(self.fields)
        if list(pooled.keys()) != self.keys:
            by_name = pooled.to_dict()
            values = torch.cat([by_name[k] for k in self.keys], dim=1)
        if self.weight_sharing:
            full = values.view(b, n, self.stored[0])
            return [full[:, :, :c] for c in self.candidates]
        blocks = values.split([n * s for s in self.stored], dim=1)
        return [x.reshape(b, n, s)[:, :, :c] for x, s, c in zip(blocks, self.stored, self.candidates)]

    def mixture_weights(self) -> torch.Tensor:
        """(F, C) candidate weights, each row summing to 1.

        Training: Gumbel-softmax of the logits at the current temperature (fresh noise each
        call, shared by the batch). Evaluation: the noiseless softmax at that temperature.
        """
        tau = float(self.temperature)
        if self.training:
            return nn.functional.gumbel_softmax(self.alpha, tau=tau, hard=False, dim=-1)
        return torch.softmax(self.alpha / tau, dim=-1)

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        inputs = self.candidate_inputs(pooled)
        w = self.mixture_weights()
        b, n, p = inputs[0].shape[0], len(self.fields), self.common_dim
        out = None
        for i, (x, c) in enumerate(zip(inputs, self.candidates)):
            weight = self.shared_weight[:, :c] if self.weight_sharing else self.weights[i]
            h = torch.einsum("bfc,fcp->bfp", x, weight) + self.bias[i]
            h = self.bn[i](h.reshape(b, n * p)).view(b, n, p)
            term = h * w[:, i].view(1, n, 1)
            out = term if out is None else out + term
        assert out is not None
        return keyed(self.fields, p, out)

    def chosen_dims(self) -> dict[str, int]:
        """Argmax candidate per field."""
        idx = self.alpha.detach().argmax(dim=1).tolist()
        return {f: self.candidates[i] for f, i in zip(self.fields, idx)}


class AutoDimSearch(BaselineSearch):
    name = "autodim"
    config_cls = AutoDimConfig
    config: AutoDimConfig

    def _stored(self) -> list[int]:
        cfg = self.config
        if cfg.weight_sharing:
            return [cfg.stored(cfg.d_max)]
        return [cfg.stored(c) for c in cfg.resolved_candidates()]

    def tables(self, fields: Sequence[str], vocab: dict[str, int]) -> list[EmbeddingBagConfig]:
        cfg = self.config
        if cfg.weight_sharing:
            return super().tables(fields, vocab)
        return [
            table_config(table_name(f, c), f, vocab[f], s, cfg.init_std)
            for c, s in zip(cfg.resolved_candidates(), self._stored())
            for f in fields
        ]

    def build_post(self, fields: Sequence[str], vocab: dict[str, int]) -> nn.Module:
        cfg = self.config
        return AutoDimPost(
            fields, cfg.resolved_candidates(), cfg.common_dim, cfg.weight_sharing, cfg.d_max, cfg.init_logit,
            self._stored(),
        )  # fmt: skip

    def head_input(
        self, sparse: SparseSuperNet, fields: Sequence[str], train_cfg: TrainConfig
    ) -> tuple[Combine, int | None]:
        """Sum the projected fields when they already have the adapter's width (no extra layer)."""
        if self.config.common_dim == train_cfg.adapter_dim:
            return "sum", None
        return "concat", self.config.common_dim * len(fields)

    def gate_parameters(self, sparse: SparseSuperNet) -> list[nn.Parameter]:
        return [sparse.post.alpha]

    def on_step(self, sparse: SparseSuperNet, step: int) -> None:
        cfg = self.config
        sparse.post.temperature.fill_(max(cfg.temp_min, 1.0 - cfg.temp_decay * (step + 1)))

    def export_dims(self, trained: Trained, data: PreparedData, train_cfg: TrainConfig) -> dict[str, int]:
        return trained.sparse.post.chosen_dims()

    def extra_info(self, trained: Trained) -> dict[str, Any]:
        post: AutoDimPost = trained.sparse.post  # type: ignore[assignment]
        probs = torch.softmax(post.alpha.detach(), dim=-1)
        return {
            "candidates": post.candidates,
            "arch_probs": {f: [round(float(v), 4) for v in row] for f, row in zip(post.fields, probs)},
            "temperature": float(post.temperature),
        }
