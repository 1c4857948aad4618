"""Serving bytes, AUC and lookup latency of found dims at fp32/fp16/int8/int4 (issue 14).

One dataset per run. The found dims come from one DimGrow search (CLI defaults, ``--search-seed``;
reused from ``WORK/search/dims.json`` when present, or given with ``--dims``). Every row's model
is retrained over ``--seeds`` with the ``retrain`` recipe (which saves it), exported with
``export_serving`` (TorchRec's quantized EBC, odd dims zero-padded, TorchScript) and the *loaded
artifact* is evaluated on the test split. Rows:

* ``uniform 16 fp32``: today's default;
* ``found fp32/fp16/int8/int4``: the same retrained models, served at each precision;
* ``uniform u fp32`` / ``uniform v int8``: the largest uniform dims whose serving bytes do not
  exceed the found dims' int8 bytes (what else the same serving memory buys).

Columns: kernel bytes (FBGEMM's row size incl. int scale/bias, 1-byte row alignment as TorchRec's
CPU kernel), test AUC mean ± std over seeds, the AUC change from quantization (paired per seed,
against the same retrained models evaluated in float; the fp32 rows check the export), and the lookup time per batch of the quantized collection
alone (``--latency-batch`` examples, median of repeats; measured on the shared, loaded machine:
compare within a table only).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from torchrec_dimgrow.config import TrainConfig
from torchrec_dimgrow.data import PreparedData, prepare
from torchrec_dimgrow.data.synthetic import PlantedConfig, planted, write_parquet
from torchrec_dimgrow.recipes.retrain import retrain
from torchrec_dimgrow.saved_model import load_model
from torchrec_dimgrow.serving import export_serving, quantize_model, row_bytes, served_dim
from torchrec_dimgrow.training import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, markdown_table, mean_std, pm, quiet_logs, write_rows

COLUMNS = [
    "model",
    "serving",
    "total_dim",
    "serving_bytes",
    "bytes_vs_uniform16",
    "padding_bytes",
    "test_auc",
    "auc_change_from_quant",
    "lookup_us_per_batch",
]


def kernel_bytes(vocab: dict[str, int], dims: dict[str, int], serving: str) -> int:
    return sum(n * row_bytes(served_dim(dims[f], serving), serving) for f, n in vocab.items() if dims[f] > 0)


def largest_uniform(vocab: dict[str, int], serving: str, budget: int) -> int:
    """The largest uniform dim whose serving bytes fit ``budget`` (at least 1)."""
    u = 1
    while kernel_bytes(vocab, dict.fromkeys(vocab, u + 1), serving) <= budget:
        u += 1
    return u


def dataset(args: argparse.Namespace, work: Path) -> tuple[list[str], PreparedData]:
    """CLI data flags and the prepared data (planted data is written as parquet first)."""
    if args.planted:
        prefix = work / "planted"
        if not Path(f"{prefix}_train.parquet").is_file():
            write_parquet(planted(PlantedConfig(rows=args.planted_rows, seed=0)), prefix)
        flags = ["--data", str(prefix), "--format", "parquet"]
    else:
        flags = ["--data", args.data, "--format", args.format]
    data = prepare(flags[1], flags[3], work / "data")
    return flags, data


def found_dims(args: argparse.Namespace, flags: list[str], work: Path) -> dict[str, int]:
    path = args.dims or work / "search" / "dims.json"
    if not path.is_file():
        cmd = [sys.executable, "-m", "torchrec_dimgrow", "search", *flags, "--out", str(work / "search"),
               "--cache-dir", str(work / "data"), "--seed", str(args.search_seed), "--quiet"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"search failed:\n{proc.stderr[-3000:]}")
    return {k: int(v) for k, v in json.loads(path.read_text()).items()}


def trained(dims: dict[str, int], data: PreparedData, seed: int, out: Path) -> tuple[torch.nn.Module, float]:
    """Retrain (or reuse a finished retrain in ``out``); the model and its float test AUC."""
    if not (out / "metrics.json").is_file():
        retrain(dims, data, TrainConfig(epochs=20, batch_size=256, seed=seed, early_stop_patience=2), out)
    model, _ = load_model(out)
    return model, float(json.loads((out / "metrics.json").read_text())["test_auc"])


def served_auc(
    model: torch.nn.Module, data: PreparedData, serving: str, out: Path
) -> tuple[float, dict[str, Any]]:
    """Test AUC of the exported TorchScript artifact, loaded back from disk."""
    meta = export_serving(
        model, data.fields, serving, out, field_rows=dict(zip(data.fields, data.vocab_sizes))
    )
    artifact = torch.jit.load(str(out / "serving.pt"))
    test = evaluate(
        artifact,
        data.test,
        1024,
        forward=lambda m, b: m(
            {"values": b.sparse_features.values(), "lengths": b.sparse_features.lengths()}
        ),
    )
    return test["auc"], meta


@torch.no_grad()
def lookup_us(model: torch.nn.Module, data: PreparedData, serving: str, batch: int, repeats: int) -> float:
    """Median time of one batch's lookup in the quantized collection alone, in microseconds."""
    served, _ = quantize_model(copy.deepcopy(model), serving)
    lookup = served.sparse
    batches = [b.sparse_features for _, b in zip(range(20), data.test.batches(batch))]
    for kjt in batches[:3]:
        lookup(kjt)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for kjt in batches:
            lookup(kjt)
        times.append((time.perf_counter() - start) / len(batches))
    return 1e6 * statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset path or prefix (with --format)")
    src.add_argument("--planted", action="store_true", help="planted synthetic data (data.synthetic.planted)")
    p.add_argument("--format", default=None)
    p.add_argument("--planted-rows", type=int, default=50_000)
    p.add_argument("--name", default=None, help="names the output files (default: the data's name)")
    p.add_argument("--dims", type=Path, default=None, help="found dims (default: run a search)")
    p.add_argument("--search-seed", type=int, default=0)
    p.add_argument("--seeds", default="0,1,2", help="retrain seeds")
    p.add_argument("--latency-batch", type=int, default=512)
    p.add_argument("--latency-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("runs/bench/serving"))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.data and not args.format:
        p.error("--data needs --format")
    quiet_logs()
    torch.set_num_threads(args.threads)
    name = args.name or ("planted" if args.planted else Path(args.data).name)
    work = args.work / name
    flags, data = dataset(args, work)
    seeds = [int(s) for s in args.seeds.split(",")]
    vocab = dict(zip(data.fields, data.vocab_sizes))
    dims = found_dims(args, flags, work)
    budget = kernel_bytes(vocab, dims, "int8")
    u32, u8 = largest_uniform(vocab, "fp32", budget), largest_uniform(vocab, "int8", budget)
    plan = [
        ("uniform 16", dict.fromkeys(vocab, 16), ["fp32"]),
        ("found", dims, ["fp32", "fp16", "int8", "int4"]),
        (f"uniform {u32}", dict.fromkeys(vocab, u32), ["fp32"]),
        (f"uniform {u8}", dict.fromkeys(vocab, u8), ["int8"]),
    ]
    base = kernel_bytes(vocab, dict.fromkeys(vocab, 16), "fp32")
    rows: list[dict[str, Any]] = []
    for label, d, servings in plan:
        tag = label.replace(" ", "")
        models = [trained(d, data, s, work / f"{tag}-seed{s}") for s in seeds]
        for serving in servings:
            aucs, meta = [], {}
            for s, (model, _) in zip(seeds, models):
                auc, meta = served_auc(model, data, serving, work / f"{tag}-seed{s}" / f"serve-{serving}")
                aucs.append(auc)
            change = [a - f for a, (_, f) in zip(aucs, models)]  # paired: same model, float vs served
            rows.append(
                {
                    "model": label,
                    "serving": serving,
                    "total_dim": sum(d.values()),
                    "serving_bytes": meta["serving_bytes"],
                    "bytes_vs_uniform16": round(meta["serving_bytes"] / base, 4),
                    "padding_bytes": meta["padding_bytes"],
                    "test_auc": pm(aucs),
                    "auc_mean": mean_std(aucs)[0],
                    "auc_change_from_quant": pm(change),
                    "lookup_us_per_batch": round(
                        lookup_us(models[0][0], data, serving, args.latency_batch, args.latency_repeats), 1
                    ),
                    "dims": " ".join(f"{f}:{v}" for f, v in d.items()),
                }
            )
            print(markdown_table(rows[-1:], COLUMNS), flush=True)
    print(f"\n{name}: found dims {dims}\n")
    print(markdown_table(rows, COLUMNS))
    write_rows(rows, args.out, f"serving_{name}", {"argv": sys.argv, "found_dims": dims})


if __name__ == "__main__":
    main()
