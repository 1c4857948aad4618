"""Quality per byte: test AUC against embedding bytes for uniform dims, DimGrow and SuperNets.

    python -m torchrec_dimgrow bench frontier --data movielens --budgets 0.2,0.3
    python -m torchrec_dimgrow bench frontier --data planted --budgets 0.1,0.2,0.3,0.5 \\
        --search-seeds 0,1,2 --retrain-seeds 0,1,2
    python -m torchrec_dimgrow bench frontier --data shaped --rows 1000000 ...

On one dataset, runs: uniform dims (``--uniform``, default 1,2,4,8,16); DimGrow at every
``--budgets`` fraction of the D_max model and without a budget; SSEDS at the same budgets
(its parameter budget); AutoDim and OptEmbed-D at their natural sizes. Every searched point
is run for each search seed and retrained (the shared ``retrain`` recipe) for each retrain
seed. Bytes are as stored, 4 x sum(vocab x dim), the figure ``metrics.json`` reports.

For every searched point it reports the **margin over the uniform curve at equal bytes**:
the point's AUC (mean over search seeds of the mean over retrain seeds) minus the uniform
AUC interpolated linearly in log bytes between the two neighbouring uniform dims (beyond the
ends, the nearest end's AUC: a conservative reference). It also reports how far the found
dims move between search seeds: the mean absolute per-field difference over seed pairs and
the bytes spread (max - min), and the **iso-AUC bytes ratio**: the bytes uniform dims need for
the point's AUC (monotone envelope of the curve, log-bytes interpolation) over the point's
bytes, with ``iso`` saying whether the AUC fell inside the curve or above / below its ends (a
lower / upper bound then). Error bars: std over search seeds of the per-search mean
AUC (over retrain seeds where a point has one search, e.g. uniform dims).

``--fixed`` adds hand-picked allocations (per-field dims), retrained the same way, with
their margin: how far any allocation gets above the uniform curve on the dataset.

``--random N`` adds, at every budget, N random allocations that fill the budget (per-field
weights drawn log-normal, scaled to the largest size that fits; see :func:`random_allocation`),
the random-search baseline of architecture search. Two rows per budget: their mean, and the one
with the best *validation* AUC (an honest pick: its test AUC was not used to choose it), which
estimates how far any per-field allocation of that size gets above the uniform curve.

``--methods ...,mde,prune`` adds two reference points next to every DimGrow point, each at
the bytes of every search seed's found dims and retrained the same way: the MDE power rule
(``d_f ~ rows_f^-0.3``, Ginart et al.) and post-hoc magnitude pruning of the retrained
uniform D_max model (largest column L2 norms that fit). See ``_common.reference_dims``.

``--data`` takes a dataset name (movielens, criteo, avazu: the samples in ../shared/data;
planted: the planted-hub data; fm: interaction-only; fmzipf: interaction-only with Zipf ids and
cheap noise fields, where searches once stalled; shaped: Criteo-shaped, ``--rows``) or a
path with ``--format``. Each point's result is cached under ``--work`` (rerun to resume or
add seeds); the table goes to stdout and ``<out>/frontier_<data>.{csv,json,png}``.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REFERENCES,
    alloc_key,
    cached,
    dims_spread,
    embedding_bytes,
    fit_scale,
    iso_auc_bytes,
    markdown_table,
    mean_std,
    quiet_logs,
    reference_dims,
    retrain_scores,
    uniform_reference,
    write_rows,
)
from quality import DATASETS, QualityConfig, load_dataset

SYNTHETIC = {"fm": "fm", "fmzipf": "fm_zipf", "shaped": "criteo_shaped"}
COLUMNS = [
    "method",
    "budget",
    "bytes",
    "auc",
    "auc_std",
    "margin",
    "iso_ratio",
    "iso",
    "dims_spread",
    "bytes_spread",
    "runs",
    "dims",
]


# ---------------------------------------------------------------------- runs
def load(args: argparse.Namespace) -> tuple[str, Any]:
    """(name, PreparedData) for ``--data``."""
    if args.data in SYNTHETIC:
        from torchrec_dimgrow.data.synthetic import generate

        return args.data, generate(SYNTHETIC[args.data], args.rows, args.data_seed)
    if args.data in DATASETS:
        return args.data, load_dataset(args.data, QualityConfig(cache_dir=str(args.work / "cache")))
    if not args.format:
        raise SystemExit(f"error: --data {args.data!r} is not a known dataset name; give --format for a path")
    from torchrec_dimgrow.data import prepare

    return Path(args.data).name, prepare(args.data, args.format, args.work / "cache" / Path(args.data).name)


def search(
    method: str, budget: float | None, seed: int, data: Any, args: argparse.Namespace, env: Any
) -> dict:
    """Found dims of one search (DimGrow or a baseline)."""
    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.distributed.planning import PlanningConfig

    tc = TrainConfig(epochs=args.search_epochs, batch_size=args.batch_size, seed=seed)
    planning = PlanningConfig(batch_size=args.batch_size)
    if method == "dimgrow":
        from torchrec_dimgrow.recipes.search import SearchOptions, run_search

        dg = DimGrowConfig(d_max=args.d_max, budget=budget, **args.dimgrow_set)
        with tempfile.TemporaryDirectory() as tmp:
            res = run_search(data, dg, tc, planning, env, SearchOptions(Path(tmp), quiet=True))
        return dict(res["dims"])
    from torchrec_dimgrow.baselines import Placement, make_baseline
    from torchrec_dimgrow.recipes.baseline import run_baseline

    extra: dict[str, Any] = {}
    if method == "sseds" and budget is not None:
        full = sum(data.vocab_sizes) * args.d_max
        extra["param_budget"] = int(budget * full)
    found = run_baseline(
        make_baseline(method, d_max=args.d_max, **extra), data, tc, placement=Placement(env, planning)
    )
    return dict(found.dims)


def voted_point(
    tag: str, budget: float | None, seed: int, data: Any, args: argparse.Namespace, env: Any, work: Path
) -> dict:
    """One DimGrow point from ``--search-votes`` searches: their vote, retrained.

    Each search's dims are cached on their own (``-search.json``), so points with more votes
    or other retrain seeds reuse them.
    """
    from torchrec_dimgrow.budget import resolve_budget
    from torchrec_dimgrow.policy import vote_dims

    k = args.search_votes
    votes = []
    for s in range(seed * k, seed * k + k):
        found = cached(
            work / f"{tag}-b{budget}-s{s}-search.json",
            lambda s=s: {"dims": search("dimgrow", budget, s, data, args, env)},  # type: ignore[misc]
        )
        votes.append([found["dims"][f] for f in data.fields])
    costs = [4 * v for v in data.vocab_sizes]
    cap = resolve_budget(budget, sum(costs) * args.d_max)
    dims = dict(zip(data.fields, vote_dims(votes, costs, cap)))
    return {"dims": dims, "votes": votes, "aucs": retrain_aucs(dims, data, args)}


def retrain_aucs(dims: Mapping[str, int], data: Any, args: argparse.Namespace) -> list[float]:
    return retrain_scores(dims, data, args)["aucs"]


def random_allocation(
    vocab: Mapping[str, int], n_bytes: int, d_max: int, rng: random.Random
) -> dict[str, int]:
    """A random per-field allocation of about ``n_bytes``: log-normal weights w_f, dims
    ``min(d_max, round(c * w_f))`` with the largest scale ``c`` whose bytes fit.

    Log-normal weights (sigma 1) give allocations from near-uniform to a few fields holding
    most dims, independent of the tables' sizes: the unbiased baseline a search must beat.
    """
    weights = {f: rng.lognormvariate(0.0, 1.0) for f in vocab}

    def dims_at(c: float) -> dict[str, int]:
        return {f: min(d_max, round(c * w)) for f, w in weights.items()}

    hi = 4.0 * d_max / min(weights.values())  # dims_at(hi) is d_max everywhere
    return dims_at(fit_scale(dims_at, vocab, n_bytes, hi))


def summarise(
    method: str,
    budget: float | None,
    runs: list[dict],
    vocab: Mapping[str, int],
    curve: list[tuple[float, float]],
) -> dict[str, Any]:
    """One table row over the search seeds of a point."""
    per_search = [mean_std(r["aucs"])[0] for r in runs]
    sizes = [embedding_bytes(vocab, r["dims"]) for r in runs]
    auc, std = mean_std(per_search)
    if len(runs) == 1:  # uniform dims, or one search seed: the spread over retrain seeds
        std = mean_std(runs[0]["aucs"])[1]
    mean_bytes = mean_std(sizes)[0]
    row: dict[str, Any] = {
        "method": method,
        "budget": "" if budget is None else budget,
        "bytes": round(mean_bytes),
        "auc": round(auc, 4),
        "auc_std": round(std, 4),
        "runs": f"{len(runs)}x{len(runs[0]['aucs'])}",
        "dims": " | ".join(" ".join(str(r["dims"][f]) for f in vocab) for r in runs),
        "per_search_auc": per_search,
        "per_search_bytes": sizes,
    }
    if method != "uniform":
        row["margin"] = round(auc - uniform_reference(curve, mean_bytes), 4) if curve else ""
        if curve and mean_bytes > 0:
            iso_bytes, row["iso"] = iso_auc_bytes(curve, auc)
            row["iso_ratio"] = round(iso_bytes / mean_bytes, 3)
        row["dims_spread"] = round(dims_spread([r["dims"] for r in runs]), 3)
        row["bytes_spread"] = max(sizes) - min(sizes)
    return row


@dataclass(frozen=True)
class Retrains:
    """What every retrained allocation of one run shares: the data, the cache and the curve."""

    data: Any
    vocab: Mapping[str, int]
    work: Path
    curve: list[tuple[float, float]]
    args: argparse.Namespace


def fixed_row(spec: str, ctx: Retrains) -> dict[str, Any]:
    """The row of one hand-picked allocation (``--fixed``): retrained like a uniform point,
    with its margin over the uniform curve."""
    fields = list(ctx.data.fields)
    dims_list = [int(d) for d in spec.split(",")]
    if len(dims_list) != len(fields):
        raise SystemExit(f"error: --fixed {spec!r}: {len(dims_list)} dims for {len(fields)} fields {fields}")
    dims = dict(zip(fields, dims_list))
    key = ctx.work / f"fixed{'-'.join(map(str, dims_list))}-r{ctx.args.retrain_seeds}.json"
    r = cached(key, lambda: {"dims": dims, "aucs": retrain_aucs(dims, ctx.data, ctx.args)})
    return {**summarise("fixed", None, [r], ctx.vocab, ctx.curve), "budget": spec}


def random_rows(budget: float, n: int, ctx: Retrains) -> list[dict[str, Any]]:
    """``--random``: the mean of ``n`` random allocations filling ``budget``, and the best by
    validation AUC."""
    args, vocab = ctx.args, ctx.vocab
    cap = int(budget * embedding_bytes(vocab, dict.fromkeys(vocab, args.d_max)))
    runs = []
    for i in range(n):
        rng = random.Random(f"{args.random_seed}-{budget}-{i}")
        dims = random_allocation(vocab, cap, args.d_max, rng)
        key = ctx.work / f"alloc{'-'.join(str(dims[f]) for f in vocab)}-r{args.retrain_seeds}.json"
        runs.append(cached(key, lambda dims=dims: {"dims": dims, **retrain_scores(dims, ctx.data, args)}))  # type: ignore[misc]
        print(f"  random budget {budget} #{i}: {runs[-1]}", flush=True)
    best = max(runs, key=lambda r: mean_std(r["val_aucs"])[0])
    return [
        summarise(f"random x{n}", budget, runs, vocab, ctx.curve),
        summarise("random, best val", budget, [best], vocab, ctx.curve),
    ]


REFERENCE_LABELS = {"mde": "MDE", "prune": "pruned"}


def full_width_norms(ctx: Retrains, uniform_runs: Mapping[int, dict]) -> dict[str, list[float]]:
    """Column norms of the uniform D_max model: those of its first retrain when that run kept
    them, else of one retrain at D_max (first retrain seed), cached."""
    args = ctx.args
    full = uniform_runs.get(args.d_max, {})
    if "norms" in full:
        return dict(full["norms"])
    seed = args.retrain_seed_list[0]
    one = argparse.Namespace(**{**vars(args), "retrain_seed_list": [seed]})
    dims = dict.fromkeys(ctx.vocab, args.d_max)
    path = ctx.work / f"norms-d{args.d_max}-r{seed}.json"
    return dict(cached(path, lambda: retrain_scores(dims, ctx.data, one, True))["norms"])


def reference_runs(ref: str, runs: list[dict], ctx: Retrains, uniform_runs: Mapping[int, dict]) -> list[dict]:
    """A reference point (``mde`` or ``prune``) at the bytes of each search seed's found dims,
    retrained like any allocation."""
    norms = full_width_norms(ctx, uniform_runs) if ref == "prune" else None
    out = []
    for r in runs:
        dims = reference_dims(ref, ctx.vocab, embedding_bytes(ctx.vocab, r["dims"]), ctx.args.d_max, norms)
        key = ctx.work / f"{ref}-{alloc_key(dims)}-r{ctx.args.retrain_seeds}.json"
        out.append(cached(key, lambda dims=dims: {"dims": dims, **retrain_scores(dims, ctx.data, ctx.args)}))  # type: ignore[misc]
        print(f"  {ref} at {embedding_bytes(ctx.vocab, r['dims'])} bytes: {out[-1]['aucs']}", flush=True)
    return out


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        pts = sorted((r["bytes"], r["auc"], r["auc_std"]) for r in rows if r["method"] == m)
        xs, ys, es = zip(*pts)
        joined = len(xs) > 1 and m not in ("fixed", "random, best val")  # separate allocations
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m, linestyle="-" if joined else "none")
    ax.set_xscale("log")
    ax.set_xlabel("embedding bytes (log)")
    ax.set_ylabel("test AUC (mean over search seeds)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrec_dimgrow bench frontier",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="movielens|criteo|avazu|planted|fm|fmzipf|shaped or a path")
    p.add_argument("--format", default="", help="format of a --data path")
    p.add_argument("--rows", type=int, default=None, help="rows of a synthetic dataset")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--budgets", default="0.1,0.2,0.3,0.5", help="fractions of the D_max model")
    p.add_argument("--uniform", default="1,2,4,8,16")
    p.add_argument(
        "--fixed",
        default="",
        help="hand-picked allocations to retrain next to the uniform dims: per-field dims in the "
        "dataset's field order, comma-separated, allocations separated by ';' (e.g. '3,3,2;4,2,2')",
    )
    p.add_argument(
        "--random",
        type=int,
        default=0,
        help="N random allocations filling each budget, retrained like the others (0: none)",
    )
    p.add_argument("--random-seed", type=int, default=0)
    p.add_argument(
        "--methods",
        default="dimgrow,sseds,autodim,optembed",
        help="searches (dimgrow, sseds, autodim, optembed) and reference points at each DimGrow "
        "point's bytes: mde (the MDE power rule, rows^-0.3), prune (magnitude pruning of the "
        "retrained D_max model)",
    )
    p.add_argument("--no-unbudgeted", action="store_true", help="skip DimGrow without a budget")
    p.add_argument("--search-seeds", default="0,1,2")
    p.add_argument(
        "--search-votes",
        type=int,
        default=1,
        help="DimGrow points vote over K searches each (search seed i uses seeds i*K .. i*K+K-1; "
        "see torchrec_dimgrow.policy.vote_dims); 1: one search per point",
    )
    p.add_argument("--retrain-seeds", default="0,1,2")
    p.add_argument("--d-max", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--search-epochs", type=int, default=10)
    p.add_argument("--retrain-epochs", type=int, default=20)
    p.add_argument("--set", action="append", default=[], help="DimGrowConfig override key=value")
    p.add_argument("--label", default="", help="names this variant's DimGrow rows and cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("runs/bench/frontier"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.retrain_seed_list = [int(s) for s in args.retrain_seeds.split(",") if s]
    search_seeds = [int(s) for s in args.search_seeds.split(",") if s]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    quiet_logs()
    import torch

    from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed
    from torchrec_dimgrow.runconfig import parse_overrides

    args.dimgrow_set = parse_overrides(args.set)

    torch.set_num_threads(args.threads)
    name, data = load(args)
    vocab = data.vocab()
    work = args.work / f"{name}{'-' + str(args.rows) if args.rows else ''}-d{args.d_max}"
    env = init_distributed("gloo")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        curve: list[tuple[float, float]] = []
        uniform_runs: dict[int, dict] = {}
        for d in [int(x) for x in args.uniform.split(",") if x]:
            dims = dict.fromkeys(data.fields, d)
            keep = d == args.d_max and "prune" in methods  # pruning starts from this model
            r = cached(
                work / f"uniform{d}-r{args.retrain_seeds}.json",
                lambda dims=dims, keep=keep: {"dims": dims, **retrain_scores(dims, data, args, keep)},  # type: ignore[misc]
            )
            uniform_runs[d] = r
            rows.append(
                {**summarise("uniform", None, [r], vocab, []), "method": "uniform", "budget": f"dim {d}"}
            )
            curve.append((rows[-1]["bytes"], rows[-1]["auc"]))
        ctx = Retrains(data, vocab, work, curve, args)
        for spec in [a for a in args.fixed.split(";") if a.strip()]:
            rows.append(fixed_row(spec, ctx))
        for budget in budgets if args.random else []:
            rows += random_rows(budget, args.random, ctx)
        points: list[tuple[str, float | None]] = []
        if "dimgrow" in methods:
            points += [("dimgrow", b) for b in budgets] + ([] if args.no_unbudgeted else [("dimgrow", None)])
        if "sseds" in methods:
            points += [("sseds", b) for b in budgets]
        points += [(m, None) for m in ("autodim", "optembed") if m in methods]
        for method, budget in points:
            tag = f"{method}{'-' + args.label if args.label and method == 'dimgrow' else ''}"
            runs = []
            for seed in search_seeds:
                key = work / f"{tag}-b{budget}-s{seed}-r{args.retrain_seeds}.json"

                def compute(method: str = method, budget: float | None = budget, seed: int = seed) -> dict:
                    dims = search(method, budget, seed, data, args, env)
                    return {"dims": dims, "aucs": retrain_aucs(dims, data, args)}

                if method == "dimgrow" and args.search_votes > 1:
                    key = work / f"{tag}-v{args.search_votes}-b{budget}-s{seed}-r{args.retrain_seeds}.json"
                    compute = functools.partial(voted_point, tag, budget, seed, data, args, env, work)
                runs.append(cached(key, compute))
                print(f"  {tag} budget {budget} seed {seed}: {runs[-1]}", flush=True)
            label = (
                "DimGrow"
                if method == "dimgrow"
                else {"sseds": "SSEDS", "autodim": "AutoDim", "optembed": "OptEmbed-D"}[method]
            )
            label += f" {args.label}" if args.label and method == "dimgrow" else ""
            label += f" ({args.search_votes} votes)" if method == "dimgrow" and args.search_votes > 1 else ""
            label += " (no budget)" if method == "dimgrow" and budget is None else ""
            rows.append(summarise(label, budget, runs, vocab, curve))
            if method == "dimgrow":
                for ref in [m for m in REFERENCES if m in methods]:
                    ref_runs = reference_runs(ref, runs, ctx, uniform_runs)
                    rows.append(
                        summarise(f"{REFERENCE_LABELS[ref]} at {label} bytes", budget, ref_runs, vocab, curve)
                    )
    finally:
        destroy_distributed()
    stem = f"frontier_{name}{'_' + args.label if args.label else ''}"
    stem += f"_votes{args.search_votes}" if args.search_votes > 1 else ""
    command = "python -m torchrec_dimgrow bench frontier " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    meta = {"command": command, "fields": list(vocab), "wall_s": round(time.perf_counter() - start, 1)}
    print(markdown_table(rows, COLUMNS))
    write_rows(rows, args.out, stem, meta)
    plot(rows, f"{name}: test AUC vs embedding bytes", args.out / f"{stem}.png")
    print(f"\n{command} -> {args.out}/{stem}.{{csv,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
