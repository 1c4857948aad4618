"""In-memory datasets for the baselines' tests and the benchmarks.

Two generators, both returning a real :class:`torchrec_dimgrow.data.PreparedData` whose
splits hold their arrays in memory, so the baselines, the DimGrow search, the shared
``retrain`` and the benchmarks take them exactly like a prepared real dataset:

* :func:`criteo_like` keeps the *shape* of real Criteo (its 39 cardinalities, scaled down, with
  Zipf-distributed ids) and a weak random label: what the memory benchmark needs, where only
  the table sizes and the batch shapes matter.
* :func:`planted` plants a known answer: pairs of fields interact through a dot product of a
  known rank, one field carries a per-id bias (needs one dim) and the rest is noise (needs
  none). A dimension search that works should give the higher-rank pairs more dims than the
  noise fields.

Nothing here reads a file: the memory benchmark must not measure a loader, and the tests must
not depend on the real-data loaders.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from torchrec_dimgrow.data import PreparedData, Split

# The 39 ERASE/DimGrow Criteo cardinalities (13 discretised numeric + 26 categorical fields).
CRITEO_CARDINALITIES: tuple[int, ...] = (
    63, 113, 126, 51, 224, 148, 100, 79, 104, 9, 32, 57, 82, 1460, 583, 10131227, 2202608, 305, 24,
    12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15,
    286181, 105, 142572,
)  # fmt: skip


def _split(
    fields: list[str], ids: np.ndarray, labels: np.ndarray, fractions: tuple[float, float]
) -> list[Split]:
    """Sequential train/val/test cut (the DimGrow reference's split order)."""
    n = ids.shape[0]
    n_train, n_val = int(n * fractions[0]), int(n * fractions[1])
    cut = [0, n_train, n_train + n_val, n]
    return [
        Split(np.ascontiguousarray(ids[a:b]), labels[a:b].astype(np.float32), None, list(fields))
        for a, b in itertools.pairwise(cut)
    ]


def from_arrays(
    fields: list[str],
    vocab: list[int],
    ids: np.ndarray,
    labels: np.ndarray,
    split: tuple[float, float],
    **info: Any,
) -> PreparedData:
    """A ``PreparedData`` over in-memory (rows x fields) ids and 0/1 labels, cut sequentially."""
    train, val, test = _split(fields, ids, labels, split)
    return PreparedData(
        fields=fields,
        vocab_sizes=vocab,
        num_dense=0,
        train=train,
        val=val,
        test=test,
        source={"format": "synthetic", **info},
    )


def zipf_ids(vocab: int, rows: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """``rows`` ids in [0, vocab) with P(id k) proportional to 1/(k+1)^exponent (bounded Zipf)."""
    if vocab == 1:
        return np.zeros(rows, dtype=np.int64)
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent)
    cdf /= cdf[-1]
    ids = np.searchsorted(cdf, rng.random(rows), side="right")
    return np.minimum(ids, vocab - 1).astype(np.int64)


@dataclass
class CriteoLikeConfig:
    """Shape of the memory benchmark's table set.

    ``scale`` divides every real Criteo cardinality (min 1 row). Ids are Zipf(``exponent``)
    per field, so a few rows are hot as in click logs. The label depends on
    ``informative`` fields (small and large ones alike, as on real Criteo, where the big id
    fields get the most dims) through per-id effects plus one rank-``interaction_rank``
    interaction between two large fields; the other fields are noise. It is a shape for
    memory measurements, not a quality benchmark.
    """

    scale: float = 20.0
    rows: int = 200_000
    exponent: float = 1.1
    seed: int = 0
    split: tuple[float, float] = (0.8, 0.1)
    informative: tuple[int, ...] = (0, 5, 9, 15, 16, 21, 24, 28, 33, 36)
    interaction: tuple[int, int] = (15, 28)
    interaction_rank: int = 4
    signal: float = 0.6


def criteo_like(cfg: CriteoLikeConfig | None = None) -> PreparedData:
    """Synthetic data with Criteo's 39 cardinalities divided by ``cfg.scale``."""
    cfg = cfg or CriteoLikeConfig()
    rng = np.random.default_rng(cfg.seed)
    vocab = [max(1, round(v / cfg.scale)) for v in CRITEO_CARDINALITIES]
    fields = [f"f{i:02d}" for i in range(len(vocab))]
    ids = np.stack([zipf_ids(v, cfg.rows, cfg.exponent, rng) for v in vocab], axis=1)
    score = sum(cfg.signal * rng.normal(size=vocab[i])[ids[:, i]] for i in cfg.informative)
    a, b = cfg.interaction
    r = cfg.interaction_rank
    u, v = rng.normal(size=(vocab[a], r)), rng.normal(size=(vocab[b], r))
    score = score + cfg.signal * (u[ids[:, a]] * v[ids[:, b]]).sum(axis=1) / np.sqrt(r)
    labels = (rng.random(cfg.rows) < 1.0 / (1.0 + np.exp(-score))).astype(np.float32)
    return from_arrays(
        fields, vocab, ids, labels, cfg.split, kind="criteo_like", scale=cfg.scale, rows=cfg.rows
    )


@dataclass
class PlantedConfig:
    """A dataset whose ideal dims are known.

    ``ranks``: one interacting field pair per entry, ``logit += <u_a[id_a], v_b[id_b]>`` with
    vectors of that rank (a pair of rank r is best served by about r dims per side).
    ``bias_fields``: fields with a scalar per-id effect (one dim suffices). ``noise_fields``:
    fields independent of the label (zero dims is right).
    """

    rows: int = 20_000
    vocab: int = 50
    ranks: tuple[int, ...] = (1, 4)
    bias_fields: int = 1
    noise_fields: int = 2
    signal: float = 1.5
    seed: int = 0
    split: tuple[float, float] = (0.8, 0.1)


def planted(cfg: PlantedConfig | None = None) -> PreparedData:
    """Synthetic CTR data with a planted dimension need per field (see :class:`PlantedConfig`)."""
    cfg = cfg or PlantedConfig()
    rng = np.random.default_rng(cfg.seed)
    fields: list[str] = []
    columns: list[np.ndarray] = []
    logit = np.zeros(cfg.rows)
    need: dict[str, int] = {}
    for p, r in enumerate(cfg.ranks):
        a, b = rng.integers(0, cfg.vocab, cfg.rows), rng.integers(0, cfg.vocab, cfg.rows)
        u = rng.normal(size=(cfg.vocab, r)) / np.sqrt(r)
        v = rng.normal(size=(cfg.vocab, r))
        logit += cfg.signal * (u[a] * v[b]).sum(axis=1)
        for side, col in (("a", a), ("b", b)):
            fields.append(f"pair{p}_{side}_r{r}")
            columns.append(col)
            need[fields[-1]] = r
    for i in range(cfg.bias_fields):
        col = rng.integers(0, cfg.vocab, cfg.rows)
        logit += cfg.signal * rng.normal(size=cfg.vocab)[col]
        fields.append(f"bias{i}")
        columns.append(col)
        need[fields[-1]] = 1
    for i in range(cfg.noise_fields):
        fields.append(f"noise{i}")
        columns.append(rng.integers(0, cfg.vocab, cfg.rows))
        need[fields[-1]] = 0
    labels = (rng.random(cfg.rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    ids = np.stack(columns, axis=1).astype(np.int64)
    return from_arrays(fields, [cfg.vocab] * len(fields), ids, labels, cfg.split, kind="planted", need=need)


@dataclass
class HubConfig:
    """Planted per-field ranks that an embedding model can only exploit with that many dims.

    A "hub" field carries an 8-dim latent vector; every other field ``f`` has a latent vector
    of its own rank ``r_f`` and interacts with the hub through a random ``8 x r_f`` map:
    ``logit += signal * <u_f[id_f], P_f^T v_hub[id_hub]>``. Any per-field effect on its own
    would fit in one dim, so rank has to come from an interaction; routing every interaction
    through one shared partner makes the need symmetric and known: ``r_f`` dims for field f,
    ``max r`` for the hub, 0 for the rank-0 (noise) fields.
    """

    rows: int = 30_000
    vocab: int = 20
    ranks: tuple[int, ...] = (0, 0, 1, 2, 4, 8)
    hub_rank: int = 8
    signal: float = 3.0
    seed: int = 0
    split: tuple[float, float] = (0.8, 0.1)


def planted_hub(cfg: HubConfig | None = None) -> PreparedData:
    """Synthetic CTR data with hidden per-field ranks (see :class:`HubConfig`); ``source["need"]``."""
    cfg = cfg or HubConfig()
    rng = np.random.default_rng(cfg.seed)
    hub = rng.integers(0, cfg.vocab, cfg.rows)
    v_hub = rng.normal(size=(cfg.vocab, cfg.hub_rank))
    logit = np.zeros(cfg.rows)
    fields, columns, need = ["hub"], [hub], {"hub": max(cfg.ranks)}
    for i, r in enumerate(cfg.ranks):
        col = rng.integers(0, cfg.vocab, cfg.rows)
        if r > 0:
            u = rng.normal(size=(cfg.vocab, r))
            proj = rng.normal(size=(cfg.hub_rank, r)) / np.sqrt(cfg.hub_rank * r)
            logit += cfg.signal * (u[col] * (v_hub[hub] @ proj)).sum(axis=1)
        fields.append(f"f{i}_r{r}")
        columns.append(col)
        need[fields[-1]] = r
    labels = (rng.random(cfg.rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    ids = np.stack(columns, axis=1).astype(np.int64)
    return from_arrays(
        fields, [cfg.vocab] * len(fields), ids, labels, cfg.split, kind="planted_hub", need=need
    )


@dataclass
class FMConfig:
    """Signal only in pairwise interactions: a factorization-machine teacher over hidden ranks.

    Field ``f`` has a latent vector per id whose first ``ranks[f]`` coordinates are random and
    the rest zero (one latent space shared by all fields), centred over the ids' frequencies
    so no field has a main effect of its own:
    ``logit = signal * sum_{f<g} <u_f[id_f], u_g[id_g]> / sqrt(sum_{f<g} min(r_f, r_g))``.
    A pair needs ``min(r_f, r_g)`` dims per side, so field ``f`` needs ``r_f`` dims (0: noise).
    With one dim per field a model sees only the rank-1 part of each interaction, which is
    where a search that starts every field at dim 1 can stall (the cold-start case).

    ``vocab`` is one row count for every field or one per field; ``exponent`` draws ids
    Zipf(``exponent``) instead of uniformly. Zipf ids over tables of 50-5,000 rows with cheap
    noise fields is the shape on which a search could end at chance AUC before any field grew.
    """

    rows: int = 60_000
    vocab: int | tuple[int, ...] = 20
    ranks: tuple[int, ...] = (0, 0, 1, 2, 4, 8)
    signal: float = 3.0
    seed: int = 0
    split: tuple[float, float] = (0.8, 0.1)
    exponent: float | None = None

    def vocabs(self) -> list[int]:
        if isinstance(self.vocab, int):
            return [self.vocab] * len(self.ranks)
        if len(self.vocab) != len(self.ranks):
            raise ValueError(f"FMConfig: {len(self.vocab)} vocab sizes for {len(self.ranks)} ranks")
        return list(self.vocab)


def fm_interactions(cfg: FMConfig | None = None) -> PreparedData:
    """Synthetic CTR data whose label depends only on field interactions (see :class:`FMConfig`)."""
    cfg = cfg or FMConfig()
    rng = np.random.default_rng(cfg.seed)
    k = max(cfg.ranks)
    vocabs = cfg.vocabs()
    if cfg.exponent is None and isinstance(cfg.vocab, int):
        ids = rng.integers(0, cfg.vocab, (cfg.rows, len(cfg.ranks)))
    elif cfg.exponent is None:
        ids = np.stack([rng.integers(0, v, cfg.rows) for v in vocabs], axis=1)
    else:
        ids = np.stack([zipf_ids(v, cfg.rows, cfg.exponent, rng) for v in vocabs], axis=1)
    latent = []
    for f, (r, v) in enumerate(zip(cfg.ranks, vocabs)):
        u = np.zeros((v, k))
        u[:, :r] = rng.normal(size=(v, r))
        # Centred under the ids' distribution: no per-id main effect through any partner.
        # (Uniform ids: the plain mean over the table, the original form of this generator.)
        weight = (
            np.full(v, 1.0 / v) if cfg.exponent is None else np.bincount(ids[:, f], minlength=v) / cfg.rows
        )
        latent.append(u - weight @ u)
    logit = np.zeros(cfg.rows)
    scale = 0.0
    for f, g in itertools.combinations(range(len(cfg.ranks)), 2):
        logit += (latent[f][ids[:, f]] * latent[g][ids[:, g]]).sum(axis=1)
        scale += min(cfg.ranks[f], cfg.ranks[g])
    logit *= cfg.signal / np.sqrt(max(scale, 1.0))
    labels = (rng.random(cfg.rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    fields = [f"f{i}_r{r}" for i, r in enumerate(cfg.ranks)]
    need = dict(zip(fields, cfg.ranks))
    return from_arrays(fields, vocabs, ids.astype(np.int64), labels, cfg.split, kind="fm", need=need)


@dataclass
class ShapedConfig:
    """Production-shaped quality benchmark: Criteo's 39 fields, known importance and dim needs.

    Cardinalities are Criteo's divided by ``scale`` (min 2 rows), ids Zipf(``exponent``) as in
    click logs. Each field draws a hidden need from ``needs`` (0: noise, 1: a per-id bias
    only, r >= 2: rank-r interactions with every other interacting field, FM-style) and an
    importance weight (log-uniform over ``importance_range``), both from ``seed``:
    ``logit = signal * (sum_f w_f b_f[id_f] + sum_{f<g} <w_f v_f[id_f], w_g v_g[id_g]>) / norm``.
    Both parts are standardised; ``offset`` moves the click rate to about 0.3. The pairwise
    sum is computed with the FM identity, so 1M rows take seconds.
    """

    rows: int = 1_000_000
    scale: float = 200.0
    exponent: float = 1.05
    needs: tuple[int, ...] = (0, 0, 1, 1, 2, 4, 8, 16)
    importance_range: tuple[float, float] = (0.25, 1.0)
    signal: float = 2.0
    offset: float = -1.0
    seed: int = 0
    split: tuple[float, float] = (0.8, 0.1)


def criteo_shaped(cfg: ShapedConfig | None = None) -> PreparedData:
    """Synthetic CTR data shaped like Criteo with hidden per-field needs (see :class:`ShapedConfig`)."""
    cfg = cfg or ShapedConfig()
    rng = np.random.default_rng(cfg.seed)
    vocab = [max(2, round(v / cfg.scale)) for v in CRITEO_CARDINALITIES]
    n = len(vocab)
    need = [int(x) for x in rng.choice(cfg.needs, size=n)]
    lo, hi = np.log(cfg.importance_range[0]), np.log(cfg.importance_range[1])
    weight = np.exp(rng.uniform(lo, hi, size=n))
    k = max(cfg.needs)
    ids = np.empty((cfg.rows, n), dtype=np.int64)
    bias = np.zeros(cfg.rows)
    total = np.zeros((cfg.rows, k))
    squares = np.zeros(cfg.rows)
    for f, (v, r) in enumerate(zip(vocab, need)):
        ids[:, f] = zipf_ids(v, cfg.rows, cfg.exponent, rng)
        if r == 1:
            bias += weight[f] * rng.normal(size=v)[ids[:, f]]
        elif r >= 2:
            u = np.zeros((v, k))
            u[:, :r] = rng.normal(size=(v, r)) * weight[f] / np.sqrt(r)
            rows = u[ids[:, f]]
            total += rows
            squares += (rows * rows).sum(axis=1)
    pairs = 0.5 * ((total * total).sum(axis=1) - squares)
    logit = sum((x - x.mean()) / max(float(x.std()), 1e-9) for x in (bias, pairs))
    logit = cfg.signal * logit / np.sqrt(2.0) + cfg.offset
    labels = (rng.random(cfg.rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    fields = [f"C{i:02d}" for i in range(n)]
    return from_arrays(
        fields,
        vocab,
        ids,
        labels,
        cfg.split,
        kind="criteo_shaped",
        need=dict(zip(fields, need)),
        importance=dict(zip(fields, [round(float(w), 4) for w in weight])),
    )


GENERATORS = ("criteo_shaped", "fm", "fm_zipf", "planted_hub")


def fm_zipf_config(rows: int = 65_000, seed: int = 0) -> FMConfig:
    """Zipf-id, interaction-only data on which searches once ended at chance AUC.

    12 fields of 50-5,000 rows (Zipf exponent 1.0), an FM teacher over hidden ranks
    0,4,2,8,1,6,0,3,5,2,0,8 (three cheap noise fields) at signal 6: with the gates' shuffle
    noise from the first step, 3 of 3 search seeds stayed at chance for all their epochs.
    """
    return FMConfig(
        rows=rows,
        seed=seed,
        vocab=(50, 5000, 120, 800, 2000, 300, 60, 1500, 400, 3000, 90, 200),
        ranks=(0, 4, 2, 8, 1, 6, 0, 3, 5, 2, 0, 8),
        exponent=1.0,
        signal=6.0,
    )


def generate(kind: str, rows: int | None = None, seed: int = 0) -> PreparedData:
    """One of :data:`GENERATORS` with its default config (``rows``/``seed`` overridden)."""
    if kind == "criteo_shaped":
        shaped = ShapedConfig(seed=seed)
        shaped.rows = rows or shaped.rows
        return criteo_shaped(shaped)
    if kind == "fm":
        fm = FMConfig(seed=seed)
        fm.rows = rows or fm.rows
        return fm_interactions(fm)
    if kind == "fm_zipf":
        return fm_interactions(fm_zipf_config(rows or 65_000, seed))
    if kind == "planted_hub":
        return planted_hub(HubConfig(seed=seed, rows=rows or 60_000))
    raise ValueError(f"unknown synthetic dataset {kind!r}; choose one of {', '.join(GENERATORS)}")


def write_parquet(data: PreparedData, prefix: str | Path) -> list[Path]:
    """``PREFIX_{train,val,test}.parquet`` (fields + ``label``) and ``PREFIX_source.json``.

    The files are what ``--format parquet --data PREFIX`` reads, so the CLI's search and
    retrain run on synthetic data exactly as on a real table. Ids are written as ints.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, split in (("train", data.train), ("val", data.val), ("test", data.test)):
        cols = {f: pa.array(split.ids[:, i]) for i, f in enumerate(data.fields)}
        cols["label"] = pa.array(split.labels.astype(np.int64))
        path = Path(f"{prefix}_{name}.parquet")
        pq.write_table(pa.table(cols), path)
        paths.append(path)
    source = Path(f"{prefix}_source.json")
    source.write_text(json.dumps({**data.source, "vocab_sizes": data.vocab_sizes}, indent=1))
    return [*paths, source]


def main(argv: list[str] | None = None) -> int:
    """``python -m torchrec_dimgrow.data.synthetic KIND --out PREFIX [--rows N] [--seed S]``."""
    import argparse

    p = argparse.ArgumentParser(description="write a synthetic dataset as parquet (never commit it)")
    p.add_argument("kind", choices=GENERATORS)
    p.add_argument("--out", required=True, help="file prefix: PREFIX_{train,val,test}.parquet")
    p.add_argument("--rows", type=int, default=None, help="rows in all (default per kind; shaped: 1M)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for path in write_parquet(generate(args.kind, args.rows, args.seed), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
