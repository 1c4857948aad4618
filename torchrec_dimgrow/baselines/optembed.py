"""OptEmbed-D (Lyu et al., CIKM'22), the dimension part: one SuperNet, then evolution.

SuperNet: one ``d_max`` table per field. During training every sample and field keeps a
random prefix of its embedding (length uniform in 1..d_max, the rest zeroed), so that after
training any per-field prefix length is a usable sub-network. Evaluation uses one fixed
length per field (``eval_dims``). Afterwards an evolutionary search over the per-field
lengths, scored by validation AUC of the *trained SuperNet* with those prefixes (no
retraining inside the search): an initial random population of keep + mutations +
crossovers, then ``iterations`` rounds of "keep the top ``keep``, add ``mutations``
(each gene redrawn with probability ``m_prob``) and ``crossovers`` (single cut point)". The
reference setting: 30 iterations, top 15 kept, 10 mutations with p = 0.1, 10 crossovers.

The row-pruning half of OptEmbed (learned L1-norm thresholds) is out of scope: it selects
feature values, not dims (the authors' ``mode_supernet="embed"`` switch).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
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
    field_blocks,
    keyed,
)
from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.training import auc_logloss, gather_1d


@dataclass
class OptEmbedConfig(BaselineConfig):
    """OptEmbed-D knobs (evolution defaults from the reference implementation).

    ``max_eval_rows``: validation rows used to score candidates (``None``: all).
    ``cache_lookups``: compute the validation lookups once (fast: each candidate then costs
    only the dense part) or per candidate (the reference; no extra memory).
    """

    iterations: int = 30
    keep: int = 15
    mutations: int = 10
    crossovers: int = 10
    m_prob: float = 0.1
    max_eval_rows: int | None = None
    cache_lookups: bool = True
    evo_seed: int = 0


def prefix_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """0/1 mask with ``mask[..., k] = k < lengths[...]`` (a prefix of the given length)."""
    return (torch.arange(width, device=lengths.device) < lengths.unsqueeze(-1)).to(torch.float32)


class OptEmbedPost(nn.Module):
    """Random per-(sample, field) prefix masks in training, fixed ``eval_dims`` in eval."""

    eval_dims: torch.Tensor

    def __init__(self, fields: Sequence[str], d_max: int, stored: int | None = None) -> None:
        super().__init__()
        self.fields = list(fields)
        self.d_max = d_max
        self.stored = stored or d_max
        self.register_buffer("eval_dims", torch.full((len(self.fields),), d_max, dtype=torch.int64))
        self.last_lengths: torch.Tensor | None = None

    def draw_lengths(self, batch: int, device: torch.device) -> torch.Tensor:
        """(B, F) prefix lengths, uniform in 1..d_max."""
        return torch.randint(1, self.d_max + 1, (batch, len(self.fields)), device=device)

    def lookups(self, pooled: KeyedTensor) -> torch.Tensor:
        """(B, F, d_max) unmasked lookups."""
        return field_blocks(pooled, self.fields, self.d_max, self.stored)

    def forward(self, pooled: KeyedTensor) -> KeyedTensor:
        x = self.lookups(pooled)
        if self.training:
            lengths = self.draw_lengths(x.shape[0], x.device)
            self.last_lengths = lengths
            mask = prefix_mask(lengths, self.d_max)
        else:
            mask = prefix_mask(self.eval_dims, self.d_max).unsqueeze(0)
        return keyed(self.fields, self.d_max, x * mask)

    def set_eval_dims(self, dims: Sequence[int]) -> None:
        if len(dims) != len(self.fields) or min(dims) < 0 or max(dims) > self.d_max:
            raise ValueError(
                f"eval dims must be {len(self.fields)} values in 0..{self.d_max}, got {list(dims)}"
            )
        self.eval_dims.copy_(torch.tensor(list(dims), dtype=torch.int64))


Candidate = tuple[int, ...]


@dataclass
class Evolution:
    """The reference evolutionary search over per-field dims (maximises ``score``)."""

    num_fields: int
    d_max: int
    iterations: int = 30
    keep: int = 15
    mutations: int = 10
    crossovers: int = 10
    m_prob: float = 0.1
    seed: int = 0

    def run(self, score: Callable[[Candidate], float]) -> tuple[Candidate, float, list[dict[str, float]]]:
        rng = random.Random(self.seed)
        cache: dict[Candidate, float] = {}

        def cached(c: Candidate) -> float:
            if c not in cache:
                cache[c] = score(c)
            return cache[c]

        pop = [self._random(rng) for _ in range(self.keep + self.mutations + self.crossovers)]
        best: tuple[float, Candidate] = (-1.0, pop[0])
        history: list[dict[str, float]] = []
        for it in range(self.iterations):
            ranked = sorted(set(pop), key=cached, reverse=True)
            if cached(ranked[0]) > best[0]:
                best = (cached(ranked[0]), ranked[0])
            history.append({"iteration": float(it), "best_auc": best[0], "evaluated": float(len(cache))})
            parents = ranked[: self.keep]
            pop = parents + [self._mutate(rng.choice(parents), rng) for _ in range(self.mutations)]
            pop += [
                self._crossover(rng.choice(parents), rng.choice(parents), rng) for _ in range(self.crossovers)
            ]
        return best[1], best[0], history

    def _random(self, rng: random.Random) -> Candidate:
        return tuple(rng.randint(1, self.d_max) for _ in range(self.num_fields))

    def _mutate(self, cand: Candidate, rng: random.Random) -> Candidate:
        return tuple(rng.randint(1, self.d_max) if rng.random() < self.m_prob else d for d in cand)

    def _crossover(self, a: Candidate, b: Candidate, rng: random.Random) -> Candidate:
        cut = rng.randint(1, max(1, self.num_fields - 1))
        return a[:cut] + b[cut:]


class OptEmbedSearch(BaselineSearch):
    name = "optembed"
    config_cls = OptEmbedConfig
    config: OptEmbedConfig

    def __init__(self, config: OptEmbedConfig | None = None) -> None:
        super().__init__(config)
        self._evolution: dict[str, Any] = {}

    def build_post(self, fields: Sequence[str], vocab: dict[str, int]) -> nn.Module:
        return OptEmbedPost(fields, self.config.d_max, self.config.stored(self.config.d_max))

    @torch.no_grad()
    def _val_lookups(
        self, trained: Trained, data: PreparedData, batch_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's validation batches as ((B, F, d_max) lookups, labels), up to ``max_eval_rows``.

        Every rank reads the same number of batches (the sharded lookup is a collective), so
        the stop is decided by batch count, not by this rank's row count.
        """
        sparse, p = trained.sparse, trained.placement
        trained.runner.eval()
        limit = self.config.max_eval_rows
        per_rank = None if limit is None else max(1, limit // p.world_size)
        max_batches = None if per_rank is None else math.ceil(per_rank / batch_size)
        rows = 0
        batches = data.val.batches(batch_size, rank=p.rank, world_size=p.world_size)
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                return
            batch = batch.to(p.device)
            x = sparse.post.lookups(sparse.ebc(batch.sparse_features))
            y = batch.labels.reshape(-1).float()
            take = y.numel() if per_rank is None else max(0, min(y.numel(), per_rank - rows))
            rows += take
            yield x[:take], y[:take]

    def score_fn(self, trained: Trained, data: PreparedData, batch_size: int) -> Callable[[Candidate], float]:
        """Validation AUC of the SuperNet restricted to a candidate's prefixes.

        With ``cache_lookups`` the validation lookups are computed once and only the dense
        part runs per candidate; without, every candidate re-reads the tables batch by batch
        (the reference's way, and no extra memory). On N ranks every rank scores its slice
        and the scores are all-gathered, so all ranks agree on the AUC.
        """
        model, post = trained.model, trained.sparse.post
        fields, d = post.fields, post.d_max
        cached = list(self._val_lookups(trained, data, batch_size)) if self.config.cache_lookups else None

        @torch.no_grad()
        def score(cand: Candidate) -> float:
            batches = cached if cached is not None else self._val_lookups(trained, data, batch_size)
            logits, labels = [], []
            mask: torch.Tensor | None = None
            for x, y in batches:
                if mask is None:
                    mask = prefix_mask(torch.tensor(cand, device=x.device), d).unsqueeze(0)
                logits.append(model.head(model.embed(keyed(fields, d, x * mask))).float())
                labels.append(y)
            scores, ys = gather_1d(torch.cat(logits)), gather_1d(torch.cat(labels))
            return auc_logloss(scores.cpu(), ys.cpu())["auc"]

        return score

    def export_dims(self, trained: Trained, data: PreparedData, train_cfg: TrainConfig) -> dict[str, int]:
        cfg = self.config
        fields = list(data.fields)
        evo = Evolution(
            len(fields),
            cfg.d_max,
            cfg.iterations,
            cfg.keep,
            cfg.mutations,
            cfg.crossovers,
            cfg.m_prob,
            cfg.evo_seed,
        )
        best, auc, history = evo.run(self.score_fn(trained, data, train_cfg.batch_size))
        trained.sparse.post.set_eval_dims(best)
        self._evolution = {"best_val_auc": auc, "history": history}
        return dict(zip(fields, (int(v) for v in best)))

    def extra_info(self, trained: Trained) -> dict[str, Any]:
        return {"evolution": self._evolution}
