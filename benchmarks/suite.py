"""Quality on a drawn suite: the search with its defaults against the points a practitioner tries first.

    python benchmarks/suite.py --seed 0 --instances 12             # 3 search x 2 retrain seeds
    python -m torchrec_dimgrow bench suite --seed 0 --instances 3 --scale small \\
        --search-seeds 0 --retrain-seeds 0
    python -m torchrec_dimgrow bench suite --seed 0 --set alpha=0.05 --label a005

Draws ``--instances`` datasets from :mod:`torchrec_dimgrow.data.suite` (seed ``--seed``,
size ``--scale``: a preset or ``ROWS,MAX_VOCAB``) and, on each, runs:

* uniform dims (``--uniform``, default 1,2,4,8,16), retrained per retrain seed: the curve;
* the DimGrow search with the package defaults (no budget: what a new user gets; ``--set
  key=value`` overrides DimGrowConfig, ``--label`` names the variant) per search seed, its
  found dims retrained per retrain seed;
* two reference points at the bytes of each search seed's found dims, retrained the same way:
  ``mde``, the MDE power rule (``d_f ~ rows_f^-0.3``), and ``prune``, magnitude pruning of the
  uniform D_max model (see ``_common.reference_dims``).

Per instance it reports:

* ``margin``: the search's test AUC (mean over search seeds of the mean over retrain seeds)
  minus the uniform AUC interpolated in log bytes at its mean bytes (``uniform_reference``);
  ``mde_margin`` / ``prune_margin`` the same for the references, ``beats_*`` whether the
  search's margin is the larger (both are at the search's bytes, so this is the equal-bytes
  comparison);
* ``iso_ratio``: the bytes uniform dims need to reach the search's AUC (``iso_auc_bytes``:
  monotone envelope, log-bytes interpolation) over the search's bytes; > 1 means the search
  saves bytes. ``iso`` says where the AUC fell: ``above`` every uniform point caps the need
  at the largest uniform model (a lower bound on the ratio), ``below`` the smallest caps it
  at the smallest (an upper bound);
* ``learnable``: whether any uniform point's test AUC is 2 standard errors above chance (see
  :func:`learnable`). Where none is, the drawn teacher's signal is not reachable at this size:
  every comparison there is noise and a search cannot learn what no model does, so the means,
  the stall count and the ``beats_*`` counts are over the learnable instances only;
* ``stalled``: seeds whose search stalled (see :func:`stalled`);
* ``spearman``: rank correlation of found dims with the drawn ranks (0 for noise fields), mean
  over seeds where defined (neither side constant);
* ``dims_spread`` / ``bytes_spread``: mean absolute per-field dim difference over seed pairs,
  and max - min bytes over seeds.

The last row holds the means (the geometric mean for ``iso_ratio``, counts for ``beats_*``
and ``stalled``). Every point is cached under ``--work``: a rerun resumes. Output: markdown
on stdout, ``<out>/suite_<seed>[_<label>].{csv,json,md,png}``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    REFERENCES,
    alloc_key,
    block_lookups,
    cached,
    dims_spread,
    embedding_bytes,
    iso_auc_bytes,
    markdown_table,
    mde_allocation,
    mean_std,
    quiet_logs,
    reference_dims,
    retrain_scores,
    uniform_reference,
    write_rows,
)

COLUMNS = [
    "instance",
    "fields",
    "noise",
    "teacher",
    "ctr",
    "bytes",
    "auc",
    "margin",
    "iso_ratio",
    "iso",
    "learnable",
    "stalled",
    "spearman",
    "dims_spread",
    "bytes_spread",
    "mde_margin",
    "prune_margin",
    "beats_mde",
    "beats_prune",
]
STALL_AUC = 0.52


# ---------------------------------------------------------------------- per-instance measures
def stalled(history: Sequence[Mapping[str, float]]) -> bool:
    """Whether a search stalled: its best validation AUC is within noise of chance (below
    :data:`STALL_AUC`), or it never improved on its first epoch's validation AUC *and* never
    grew past its first epoch's total dim.

    Both say the search stayed where it started (dim 1 everywhere by default): the failure a
    search that grows from small dims risks on interaction-only data. The dims condition keeps
    a search that learned everything in its first epoch and then grew (an early peak on small
    data) from being counted.
    """
    if not history:
        return True
    aucs = [float(h["val_auc"]) for h in history]
    if max(aucs) < STALL_AUC:
        return True
    if len(history) < 2:
        return False
    no_gain = max(aucs[1:]) <= aucs[0]
    no_growth = max(int(h["total_dim"]) for h in history[1:]) <= int(history[0]["total_dim"])
    return no_gain and no_growth


def learnable(curve: Sequence[tuple[float, float]], labels: Any) -> bool:
    """Whether the best uniform point's mean test AUC is clearly above chance: more than
    ``LEARNED_Z`` (2) Hanley-McNeil standard errors of an AUC of 0.5 on this test split, the
    bar the search's own "learned" verdict uses on its validation split."""
    from torchrec_dimgrow.training import LEARNED_Z, auc_standard_error

    positives = int(labels.sum())
    se = auc_standard_error(0.5, positives, len(labels) - positives)
    return max(a for _, a in curve) > 0.5 + LEARNED_Z * se


def is_stall(run: Mapping[str, Any]) -> bool:
    """A search run that never learned (the search's own verdict, ``metrics["learned"]``: best
    validation AUC not 2 standard errors above its start) or that :func:`stalled` flags."""
    return not run.get("learned", True) or stalled(run["history"])


def spearman(dims: Mapping[str, float], need: Mapping[str, int]) -> float | None:
    """Spearman correlation of found dims with the drawn ranks; None where either is constant."""
    from scipy.stats import spearmanr

    fields = list(need)
    a, b = [dims[f] for f in fields], [need[f] for f in fields]
    if len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def margin_of(
    runs: Sequence[Mapping[str, Any]], vocab: Mapping[str, int], curve: list[tuple[float, float]]
) -> tuple[float, float, float]:
    """(AUC, mean bytes, margin over the uniform curve) of a point's runs over search seeds."""
    auc = mean_std(mean_std(r["aucs"])[0] for r in runs)[0]
    n_bytes = mean_std(embedding_bytes(vocab, r["dims"]) for r in runs)[0]
    return auc, n_bytes, auc - uniform_reference(curve, n_bytes)


# ---------------------------------------------------------------------- runs
def search_run(data: Any, seed: int, args: argparse.Namespace, env: Any) -> dict[str, Any]:
    """One DimGrow search at the package defaults (plus ``--set``): found dims and history."""
    from torchrec_dimgrow.config import DimGrowConfig, TrainConfig
    from torchrec_dimgrow.data.blocks import BlockConfig
    from torchrec_dimgrow.distributed.planning import PlanningConfig
    from torchrec_dimgrow.recipes.search import SearchOptions, run_search

    tc = TrainConfig(epochs=args.search_epochs, batch_size=args.batch_size, seed=seed)
    dg = DimGrowConfig(**{"d_max": args.d_max, **args.dimgrow_set})
    blocks = BlockConfig(enabled=True) if args.blocks else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        res = run_search(
            data,
            dg,
            tc,
            PlanningConfig(batch_size=args.batch_size),
            env,
            SearchOptions(Path(tmp), quiet=True, blocks=blocks),
        )
    history = [{k: h[k] for k in ("val_auc", "total_dim")} for h in res["metrics"]["history"]]
    return {
        "dims": dict(res["dims"]),
        "history": history,
        "learned": bool(res["metrics"]["learned"]),
        "search_s": round(time.perf_counter() - start, 1),
    }


def instance_dir(args: argparse.Namespace) -> str:
    """The cache folder of a suite: everything a cached point depends on besides the variant."""
    scale = args.scale_value
    return f"suite-s{args.seed}-{scale.rows}x{scale.max_vocab}-d{args.d_max}-b{args.batch_size}-e{args.retrain_epochs}"


def variant_tag(args: argparse.Namespace) -> str:
    """The cache name of a searched variant (its search epochs, ``--label`` and ``--set``)."""
    tag = (
        f"dimgrow-e{args.search_epochs}"
        + ("-blocks" if args.blocks else "")
        + (f"-{args.label}" if args.label else "")
    )
    if not args.set:
        return tag
    return f"{tag}-{hashlib.sha1(';'.join(sorted(args.set)).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Instance:
    """One drawn instance and where its points are cached."""

    data: Any
    vocab: dict[str, int]
    work: Path
    args: argparse.Namespace
    blocks: Any = None  # FieldBlocks of a --blocks run: its searches' dims are per block

    def retrained(
        self, name: str, dims: Mapping[str, int], keep_norms: bool = False, blocks: Any = None
    ) -> dict[str, Any]:
        """``dims`` retrained per retrain seed, cached as ``name`` (a rerun reads it back)."""
        path = self.work / f"{name}-r{self.args.retrain_seeds}.json"
        scores = cached(path, lambda: retrain_scores(dims, self.data, self.args, keep_norms, blocks))
        return {"dims": dict(dims), **scores}

    def vocab_of(self, dims: Mapping[str, int]) -> dict[str, int]:
        """Rows per table of an allocation (per block for a block search's dims)."""
        if self.blocks is not None and set(dims) != set(self.vocab):
            return dict(self.blocks.vocab())
        return self.vocab

    def field_dims(self, dims: Mapping[str, int]) -> dict[str, float]:
        """Per field, its mean dim per row (a block search's blocks averaged by their rows)."""
        vocab = self.vocab_of(dims)
        if vocab is self.vocab:
            return {f: float(d) for f, d in dims.items()}
        rows = dict.fromkeys(self.vocab, 0.0)
        for name, f in zip(self.blocks.names(), self.blocks.field_of()):
            rows[self.blocks.fields[f]] += vocab[name] * dims.get(name, 0)
        return {f: rows[f] / self.vocab[f] for f in self.vocab}


def uniform_points(inst: Instance) -> tuple[list[tuple[float, float]], dict[int, dict[str, Any]]]:
    """The uniform curve (bytes, mean AUC) and its runs; the D_max run keeps its column norms."""
    curve, runs = [], {}
    for d in inst.args.uniform_list:
        dims = dict.fromkeys(inst.data.fields, d)
        runs[d] = inst.retrained(f"uniform{d}", dims, keep_norms=d == inst.args.d_max)
        curve.append((float(embedding_bytes(inst.vocab, dims)), mean_std(runs[d]["aucs"])[0]))
    return curve, runs


def search_points(inst: Instance, env: Any) -> list[dict[str, Any]]:
    """Per search seed: the search (dims, history, time) and its found dims retrained."""
    runs = []
    for s in inst.args.search_seed_list:
        path = inst.work / f"{variant_tag(inst.args)}-s{s}-search.json"
        found = cached(path, lambda s=s: search_run(inst.data, s, inst.args, env))  # type: ignore[misc]
        blocks = inst.blocks if inst.vocab_of(found["dims"]) is not inst.vocab else None
        runs.append(
            {**found, **inst.retrained(f"alloc-{alloc_key(found['dims'])}", found["dims"], blocks=blocks)}
        )
        print(f"  instance {inst.work.name} search seed {s}: dims {list(found['dims'].values())}", flush=True)
    return runs


def reference_points(
    inst: Instance, runs: Sequence[Mapping[str, Any]], norms: Mapping[str, Sequence[float]]
) -> dict[str, list[dict[str, Any]]]:
    """Per reference and search seed: its allocation at that seed's bytes, retrained.

    The references are per field; a block search (``--blocks``) also gets ``mde_blocks``, MDE's
    rule on the same frequency blocks (each sized by its rows per training lookup)."""
    sizes = [embedding_bytes(inst.vocab_of(r["dims"]), r["dims"]) for r in runs]
    out: dict[str, list[dict[str, Any]]] = {}
    for ref in REFERENCES:
        out[ref] = []
        for n_bytes in sizes:
            dims = reference_dims(ref, inst.vocab, n_bytes, inst.args.d_max, norms)
            out[ref].append(inst.retrained(f"alloc-{alloc_key(dims)}", dims))
    if inst.blocks is not None:
        vocab, lookups = dict(inst.blocks.vocab()), block_lookups(inst.data, inst.blocks)
        out["mde_blocks"] = []
        for n_bytes in sizes:
            dims = mde_allocation(vocab, n_bytes, inst.args.d_max, lookups=lookups)
            out["mde_blocks"].append(inst.retrained(f"alloc-{alloc_key(dims)}", dims, blocks=inst.blocks))
    return out


def instance_row(index: int, args: argparse.Namespace, env: Any) -> dict[str, Any]:
    """Every point of one instance, and its row."""
    from torchrec_dimgrow.data.blocks import BlockConfig, field_blocks
    from torchrec_dimgrow.data.suite import draw_instance, summary

    data = draw_instance(args.seed, index, args.scale_value)
    inst = Instance(
        data,
        dict(zip(data.fields, data.vocab_sizes)),
        args.work / instance_dir(args) / f"i{index}",
        args,
        field_blocks(data, BlockConfig(enabled=True)) if args.blocks else None,
    )
    need = data.source["need"]
    curve, uniform = uniform_points(inst)
    runs = search_points(inst, env)
    norms = uniform[args.d_max]["norms"] if args.d_max in uniform else full_norms(inst)
    refs = reference_points(inst, runs, norms)
    points = [*uniform.values(), *runs, *(r for rr in refs.values() for r in rr)]
    compute_s = sum(float(r.get("wall_s", 0.0)) + float(r.get("search_s", 0.0)) for r in points)
    auc, n_bytes, margin = margin_of(runs, inst.vocab_of(runs[0]["dims"]), curve)
    iso_bytes, where = iso_auc_bytes(curve, auc)
    rhos = [x for x in (spearman(inst.field_dims(r["dims"]), need) for r in runs) if x is not None]
    sizes = [embedding_bytes(inst.vocab_of(r["dims"]), r["dims"]) for r in runs]
    info = summary(data)
    row: dict[str, Any] = {
        "instance": index,
        "fields": info["fields"],
        "noise": info["noise"],
        "teacher": info["teacher"],
        "ctr": info["click_rate"],
        "bytes": round(n_bytes),
        "auc": round(auc, 4),
        "margin": round(margin, 4),
        "iso_ratio": round(iso_bytes / n_bytes, 3) if n_bytes > 0 else float("nan"),
        "iso": where,
        "learnable": "yes" if learnable(curve, data.test.labels) else "no",
        "stalled": f"{sum(is_stall(r) for r in runs)}/{len(runs)}",
        "spearman": round(mean_std(rhos)[0], 3) if rhos else "",
        "dims_spread": round(dims_spread([r["dims"] for r in runs]), 3),
        "bytes_spread": max(sizes) - min(sizes),
        "uniform": [{"dim": d, "bytes": b, "auc": a} for d, (b, a) in zip(args.uniform_list, curve)],
        "search_dims": [list(r["dims"].values()) for r in runs],
        "search_aucs": [r["aucs"] for r in runs],
        "search_s": [r["search_s"] for r in runs],
        "compute_s": round(compute_s, 1),  # every point's own wall time, cached or not
        "need": list(need.values()),
        "vocab": data.vocab_sizes,
        "source": {k: v for k, v in data.source.items() if k not in ("need", "zipf", "importance")},
    }
    for ref, ref_runs in refs.items():
        ref_auc, ref_bytes, ref_margin = margin_of(ref_runs, inst.vocab_of(ref_runs[0]["dims"]), curve)
        row[f"{ref}_auc"] = round(ref_auc, 4)
        row[f"{ref}_bytes"] = round(ref_bytes)
        row[f"{ref}_margin"] = round(ref_margin, 4)
        row[f"beats_{ref}"] = "yes" if margin > ref_margin else "no"
        row[f"{ref}_dims"] = [list(r["dims"].values()) for r in ref_runs]
    return row


def full_norms(inst: Instance) -> dict[str, list[float]]:
    """Column norms of one retrain at D_max (first retrain seed) when ``--uniform`` lacks D_max."""
    args = inst.args
    one = argparse.Namespace(**{**vars(args), "retrain_seed_list": args.retrain_seed_list[:1]})
    dims = dict.fromkeys(inst.data.fields, args.d_max)
    path = inst.work / f"norms-d{args.d_max}-r{one.retrain_seed_list[0]}.json"
    return dict(cached(path, lambda: retrain_scores(dims, inst.data, one, True))["norms"])


def means_row(all_rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over the learnable instances; the geometric mean of the iso-AUC ratio; counts of
    the flags (an instance without ``learnable``, from an older record, counts as learnable)."""
    rows = [r for r in all_rows if r.get("learnable", "yes") == "yes"]

    def mean(key: str, digits: int = 4) -> float | str:
        vals = [float(r[key]) for r in rows if r.get(key) not in ("", None)]
        return round(mean_std(vals)[0], digits) if vals else ""

    ratios = [float(r["iso_ratio"]) for r in rows if float(r["iso_ratio"]) > 0]
    seeds = [tuple(map(int, str(r["stalled"]).split("/"))) for r in rows]
    out: dict[str, Any] = {"instance": "mean", "teacher": f"{len(rows)} instances"}
    out["learnable"] = f"{len(rows)}/{len(all_rows)}"
    for key in ("fields", "noise", "ctr", "auc", "margin", "mde_margin", "prune_margin", "dims_spread"):
        out[key] = mean(key)
    refs = [*REFERENCES, *(["mde_blocks"] if rows and "beats_mde_blocks" in rows[0] else [])]
    if "mde_blocks" in refs:
        out["mde_blocks_margin"] = mean("mde_blocks_margin")
    out["spearman"] = mean("spearman", 3)
    out["bytes"] = round(mean_std(float(r["bytes"]) for r in rows)[0]) if rows else ""
    out["bytes_spread"] = round(mean_std(float(r["bytes_spread"]) for r in rows)[0]) if rows else ""
    out["iso_ratio"] = round(math.exp(mean_std(math.log(x) for x in ratios)[0]), 3) if ratios else ""
    out["iso"] = (
        f"{sum(r['iso'] == 'above' for r in rows)} above, {sum(r['iso'] == 'below' for r in rows)} below"
    )
    out["stalled"] = f"{sum(a for a, _ in seeds)}/{sum(b for _, b in seeds)}"
    for ref in refs:
        out[f"beats_{ref}"] = f"{sum(r[f'beats_{ref}'] == 'yes' for r in rows)}/{len(rows)}"
    return out


def plot(rows: Sequence[Mapping[str, Any]], title: str, path: Path) -> None:
    """Per instance: the margins of the search and the references, and the iso-AUC ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.6 * len(rows) + 3), 6), sharex=True)
    for k, (key, label) in enumerate(
        (("margin", "DimGrow"), ("mde_margin", "MDE"), ("prune_margin", "pruned"))
    ):
        ax1.bar(x + (k - 1) * 0.27, [float(r[key]) for r in rows], width=0.27, label=label)
    ax1.axhline(0, color="black", linewidth=0.8)
    ax1.set_ylabel("AUC margin over uniform")
    ax1.legend(fontsize=8)
    ax1.set_title(title)
    capped = [r["iso"] != "inside" for r in rows]  # outside the uniform curve: a bound only
    bars = ax2.bar(x, [float(r["iso_ratio"]) for r in rows], color="tab:gray")
    for bar, cap in zip(bars, capped):
        bar.set_hatch("//" if cap else "")
    ax2.axhline(1, color="black", linewidth=0.8)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3g"))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if any(capped):
        ax2.set_title("hatched: AUC outside the uniform curve, ratio capped (a bound)", fontsize=8)
    ax2.set_ylabel("iso-AUC bytes ratio")
    ax2.set_xticks(x, [str(r["instance"]) for r in rows])
    ax2.set_xlabel("instance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrec_dimgrow bench suite",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--seed", type=int, default=0, help="suite seed: instance i is drawn from (seed, i)")
    p.add_argument("--instances", type=int, default=12)
    p.add_argument(
        "--first",
        type=int,
        default=0,
        help="start at this instance (split a suite over processes sharing --work)",
    )
    p.add_argument("--scale", default="default", help="tiny|small|default|large or ROWS,MAX_VOCAB")
    p.add_argument("--uniform", default="1,2,4,8,16")
    p.add_argument("--search-seeds", default="0,1,2")
    p.add_argument("--retrain-seeds", default="0,1")
    p.add_argument("--d-max", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--search-epochs", type=int, default=10)
    p.add_argument("--retrain-epochs", type=int, default=20)
    p.add_argument(
        "--set", action="append", default=[], help="DimGrowConfig override key=value (needs --label)"
    )
    p.add_argument("--label", default="", help="names this variant's rows, cache and output files")
    p.add_argument(
        "--blocks", action="store_true", help="search per frequency block (blocks.enabled; needs --label)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("runs/bench/suite"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed flags plus their derived lists; a bad flag exits with a one-line error."""
    from torchrec_dimgrow.data.suite import parse_scale
    from torchrec_dimgrow.runconfig import parse_overrides

    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.scale_value = parse_scale(args.scale)
        args.uniform_list = [int(x) for x in args.uniform.split(",") if x]
        args.search_seed_list = [int(s) for s in args.search_seeds.split(",") if s]
        args.retrain_seed_list = [int(s) for s in args.retrain_seeds.split(",") if s]
        args.dimgrow_set = parse_overrides(args.set)
    except ValueError as e:
        p.error(str(e))
    if args.instances < 1 or not args.search_seed_list or not args.retrain_seed_list or not args.uniform_list:
        p.error("--instances, --search-seeds, --retrain-seeds and --uniform must each give at least one")
    if (args.set or args.blocks) and not args.label:
        p.error("--set and --blocks change the search: give a --label so its rows and cache are told apart")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    logging.getLogger("torchrec_dimgrow").setLevel(logging.WARNING)  # per-epoch search lines
    import torch

    from torchrec_dimgrow.distributed.env import destroy_distributed, init_distributed

    torch.set_num_threads(args.threads)
    env = init_distributed("gloo")
    start = time.perf_counter()
    try:
        rows = [instance_row(i, args, env) for i in range(args.first, args.instances)]
    finally:
        destroy_distributed()
    table = [*rows, means_row(rows)]
    stem = f"suite_{args.seed}{'_' + args.label if args.label else ''}"
    command = "python -m torchrec_dimgrow bench suite " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {
        "command": command,
        "scale": asdict(args.scale_value),
        "wall_s": round(time.perf_counter() - start, 1),
        "compute_s": round(sum(r["compute_s"] for r in rows), 1),  # as if nothing were cached
    }
    extra = ["mde_blocks_margin", "beats_mde_blocks"] if args.blocks else []
    text = markdown_table(table, [*COLUMNS, *extra])
    print(text)
    write_rows(table, args.out, stem, meta)
    (args.out / f"{stem}.md").write_text(f"`{command}` ({meta['wall_s']} s)\n\n{text}\n")
    plot(
        rows,
        f"suite seed {args.seed}{' ' + args.label if args.label else ''}: per instance",
        args.out / f"{stem}.png",
    )
    print(f"\n{command} -> {args.out}/{stem}.{{csv,json,md,png}}  ({meta['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
