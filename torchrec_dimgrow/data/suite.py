"""A drawn family of synthetic CTR datasets, to judge the search on data nobody tuned it to.

The fixed generators in :mod:`torchrec_dimgrow.data.synthetic` each plant one answer; a
default tuned on them can still fail on the next dataset. :func:`draw_instance` draws one
dataset per ``(seed, index)`` from a broad family (the ranges live in :class:`Family`):

* 8-40 fields, 0-30% of them noise (no effect on the label);
* cardinalities log-uniform from 3 to ``scale.max_vocab`` (a machine-sized cap), ids
  Zipf-distributed with a per-field exponent in 0.6-1.3, as in click logs;
* a teacher mixing three parts with drawn weights: per-id main effects, FM interactions and a
  DCN-style cross ``x0 * (W x0 + b)`` (low-rank ``W``, as in DCN-V2) over the fields' latent
  vectors. A signal field's latent vector lives in a random rank-``r_f`` subspace of one
  shared latent space, so ``r_f`` dims serve it; a quarter of the instances have no main
  effects at all (the hardest case for a search that starts every field at dim 1);
* a logit scaled to a drawn signal strength, its offset set by bisection so the base rate is
  the drawn click rate (2-40%); labels ~ Bernoulli(sigmoid(logit)).

``data.source`` records the ground truth (per-field rank, noise fields, importance, Zipf
exponents, teacher weights, click rate); nothing is written to disk.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.data.synthetic import from_arrays, zipf_ids

PARTS = ("main", "fm", "dcn")


@dataclass(frozen=True)
class SuiteScale:
    """How big one instance is: ``rows`` in all (80/10/10 split) and the largest table.

    The default (16k training rows) is sized so a whole suite (12 instances, 3 search x 2
    retrain seeds) fits an afternoon on one shared CPU core; a bigger machine raises both
    (``large``: tables up to 10^6 rows).
    """

    rows: int = 20_000
    max_vocab: int = 2_000

    def __post_init__(self) -> None:
        if self.rows < 100 or self.max_vocab < 3:
            raise ValueError(f"SuiteScale: need rows >= 100 and max_vocab >= 3, got {self}")


SCALES: dict[str, SuiteScale] = {
    "tiny": SuiteScale(rows=3_000, max_vocab=200),
    "small": SuiteScale(rows=10_000, max_vocab=1_000),
    "default": SuiteScale(),
    "large": SuiteScale(rows=2_000_000, max_vocab=1_000_000),
}


def parse_scale(text: str) -> SuiteScale:
    """A preset name (:data:`SCALES`) or ``ROWS,MAX_VOCAB``."""
    if text in SCALES:
        return SCALES[text]
    parts = text.split(",")
    if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
        return SuiteScale(rows=int(parts[0]), max_vocab=int(parts[1]))
    raise ValueError(f"scale {text!r}: give one of {', '.join(SCALES)} or ROWS,MAX_VOCAB")


@dataclass(frozen=True)
class Family:
    """The ranges every instance is drawn from (one place for the suite's defaults)."""

    fields: tuple[int, int] = (8, 40)
    noise_share: tuple[float, float] = (0.0, 0.3)
    min_vocab: int = 3
    zipf: tuple[float, float] = (0.6, 1.3)
    ranks: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    importance: tuple[float, float] = (0.25, 1.0)
    latent_dim: int = 16
    interaction_only: float = 0.25  # share of instances without main effects
    signal: tuple[float, float] = (0.8, 2.5)
    click_rate: tuple[float, float] = (0.02, 0.4)
    split: tuple[float, float] = (0.8, 0.1)


@dataclass
class Teacher:
    """The drawn label model. ``logit(ids)`` depends on signal fields only (rank > 0)."""

    ranks: list[int]
    importance: list[float]
    weights: dict[str, float]
    bias: list[np.ndarray]  # per field: per-id main effect
    codes: list[np.ndarray]  # per field: (vocab, rank) latent coordinates
    bases: list[np.ndarray]  # per field: (latent_dim, rank) orthonormal subspace
    cross_u: np.ndarray  # DCN low-rank W = U V^T over the concatenated latents
    cross_v: np.ndarray
    cross_b: np.ndarray
    cross_out: np.ndarray
    signal: float
    self_cross: bool = True  # False: W's within-field blocks are left out (no per-id effect)
    offset: float = 0.0
    centre: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    spread: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    @property
    def signal_fields(self) -> list[int]:
        return [f for f, r in enumerate(self.ranks) if r > 0]

    def parts(self, ids: np.ndarray, chunk: int = 65_536) -> np.ndarray:
        """(rows, 3) raw main / FM / DCN scores, computed in row chunks to bound memory."""
        out = np.empty((ids.shape[0], len(PARTS)))
        for start in range(0, ids.shape[0], chunk):
            out[start : start + chunk] = self._parts(ids[start : start + chunk])
        return out

    def _parts(self, ids: np.ndarray) -> np.ndarray:
        rows = ids.shape[0]
        main = np.zeros(rows)
        latents = []
        for f in self.signal_fields:
            main += self.importance[f] * self.bias[f][ids[:, f]]
            latents.append(self.importance[f] * (self.codes[f][ids[:, f]] @ self.bases[f].T))
        stack = np.stack(latents, axis=1)  # rows x signal fields x latent_dim
        total = stack.sum(axis=1)
        fm = 0.5 * ((total * total).sum(axis=1) - (stack * stack).sum(axis=(1, 2)))
        # x0 . (W x0 + b) with W = U V^T, without the rows x width product W x0
        x0 = stack.reshape(rows, -1)
        dcn = (((x0 * self.cross_out) @ self.cross_u) * (x0 @ self.cross_v)).sum(axis=1)
        dcn += x0 @ (self.cross_out * self.cross_b)
        if not self.self_cross:  # less W's diagonal blocks: a field only meets the others
            k = stack.shape[2]
            for j in range(stack.shape[1]):
                cut = slice(j * k, (j + 1) * k)
                xj = x0[:, cut]
                dcn -= (((xj * self.cross_out[cut]) @ self.cross_u[cut]) * (xj @ self.cross_v[cut])).sum(
                    axis=1
                )
        return np.stack([main, fm, dcn], axis=1)

    def combine(self, parts: np.ndarray) -> np.ndarray:
        """The weighted sum of the standardised parts (mean 0, about unit variance)."""
        z = (parts - np.asarray(self.centre)) / np.asarray(self.spread)
        return z @ np.sqrt([self.weights[p] for p in PARTS])

    def standard(self, ids: np.ndarray) -> np.ndarray:
        return self.combine(self.parts(ids))

    def logit(self, ids: np.ndarray) -> np.ndarray:
        return self.signal * self.standard(ids) + self.offset


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def calibrate_offset(scores: np.ndarray, rate: float, iters: int = 80) -> float:
    """The offset ``b`` with ``mean(sigmoid(scores + b)) == rate`` (bisection: the mean is
    increasing in ``b``)."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"calibrate_offset: rate must be in (0, 1), got {rate}")
    lo, hi = -40.0 - float(scores.max()), 40.0 - float(scores.min())
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _sigmoid(scores + mid).mean() < rate else (lo, mid)
    return 0.5 * (lo + hi)


def _orthonormal(rng: np.random.Generator, n: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, r)))
    return q


def zipf_pmf(vocab: int, exponent: float) -> np.ndarray:
    """P(id k) of :func:`~torchrec_dimgrow.data.synthetic.zipf_ids`."""
    w = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent
    return w / w.sum()


def draw_teacher(rng: np.random.Generator, vocab: list[int], zipf: list[float], fam: Family) -> Teacher:
    """Ranks, importance, mixing weights and the parameters of all three parts.

    Latent codes are centred under each field's id distribution, so the FM part and the
    cross-field DCN terms have mean 0 given any one field's id: with no main part, no bias and
    no within-field DCN blocks (an interaction-only teacher), no field has a per-id effect.
    """
    n = len(vocab)
    n_noise = int(np.floor(rng.uniform(*fam.noise_share) * n))
    noise = set(rng.choice(n, size=n_noise, replace=False).tolist())
    ranks = [0 if f in noise else int(rng.choice(fam.ranks)) for f in range(n)]
    lo, hi = np.log(fam.importance)
    importance = [float(np.exp(rng.uniform(lo, hi))) for _ in range(n)]
    mix = rng.dirichlet(np.ones(len(PARTS)))
    interaction_only = bool(rng.random() < fam.interaction_only)
    if interaction_only:
        mix[0] = 0.0
        mix /= mix.sum()
    k = fam.latent_dim
    codes, bases, bias = [], [], []
    for f in range(n):
        r = max(ranks[f], 1)
        c = rng.normal(size=(vocab[f], r))
        codes.append(c - zipf_pmf(vocab[f], zipf[f]) @ c)
        bases.append(_orthonormal(rng, k, r))
        bias.append(rng.normal(size=vocab[f]))
    width = k * (n - n_noise)
    return Teacher(
        ranks=ranks,
        importance=importance,
        weights={p: float(w) for p, w in zip(PARTS, mix)},
        bias=bias,
        codes=codes,
        bases=bases,
        cross_u=rng.normal(size=(width, k)) / np.sqrt(width),
        cross_v=rng.normal(size=(width, k)) / np.sqrt(width),
        cross_b=rng.normal(size=width) * (0.0 if interaction_only else 0.1),
        cross_out=rng.normal(size=width),
        signal=float(rng.uniform(*fam.signal)),
        self_cross=not interaction_only,
    )


def draw_instance(
    seed: int, index: int, scale: SuiteScale | None = None, family: Family | None = None
) -> PreparedData:
    """Instance ``index`` of suite ``seed``: the same arrays every time for the same arguments."""
    return draw_with_teacher(seed, index, scale, family)[0]


def draw_with_teacher(
    seed: int, index: int, scale: SuiteScale | None = None, family: Family | None = None
) -> tuple[PreparedData, Teacher]:
    """:func:`draw_instance` and the teacher that labelled it (to check the ground truth)."""
    scale = scale or SuiteScale()
    fam = family or Family()
    if fam.min_vocab > scale.max_vocab:
        raise ValueError(f"draw_instance: max_vocab {scale.max_vocab} < min_vocab {fam.min_vocab}")
    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(fam.fields[0], fam.fields[1] + 1))
    lo, hi = np.log(fam.min_vocab), np.log(scale.max_vocab)
    vocab = [round(float(np.exp(rng.uniform(lo, hi)))) for _ in range(n)]
    zipf = [float(rng.uniform(*fam.zipf)) for _ in range(n)]
    teacher = draw_teacher(rng, vocab, zipf, fam)
    rate = float(rng.uniform(*fam.click_rate))
    ids = np.stack([zipf_ids(v, scale.rows, a, rng) for v, a in zip(vocab, zipf)], axis=1)
    parts = teacher.parts(ids)
    teacher.centre = parts.mean(axis=0).tolist()
    teacher.spread = np.maximum(parts.std(axis=0), 1e-12).tolist()
    score = teacher.signal * teacher.combine(parts)
    teacher.offset = calibrate_offset(score, rate)
    labels = (rng.random(scale.rows) < _sigmoid(score + teacher.offset)).astype(np.float32)
    fields = [f"f{i:02d}" for i in range(n)]
    kind = "interaction_only" if teacher.weights["main"] == 0.0 else "mixed"
    data = from_arrays(
        fields,
        vocab,
        ids,
        labels,
        fam.split,
        kind="suite",
        seed=seed,
        index=index,
        scale=asdict(scale),
        teacher=kind,
        weights=teacher.weights,
        signal=round(teacher.signal, 4),
        offset=round(teacher.offset, 4),
        click_rate=round(rate, 4),
        need=dict(zip(fields, teacher.ranks)),
        noise_fields=[f for f, r in zip(fields, teacher.ranks) if r == 0],
        importance={f: round(w, 4) for f, w, r in zip(fields, teacher.importance, teacher.ranks) if r},
        zipf=dict(zip(fields, [round(a, 4) for a in zipf])),
    )
    return data, teacher


def summary(data: PreparedData) -> dict[str, Any]:
    """The ground truth of an instance in one line's worth of numbers."""
    s = data.source
    return {
        "fields": len(data.fields),
        "noise": len(s["noise_fields"]),
        "max_vocab": max(data.vocab_sizes),
        "teacher": s["teacher"],
        "click_rate": s["click_rate"],
        "signal": s["signal"],
    }
