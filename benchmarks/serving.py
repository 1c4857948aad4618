"""Serving bytes, AUC and lookup latency of found dims at fp32/fp16/int8/int4.

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

``--request-cost`` measures instead what validating a request costs: per ``--latency-batch``
request (real rows: the first 20 batches of the train split, which every dataset fills), three
calls timed back to back in rotating order over ``--request-rounds`` rounds:

* ``torchrec``: the same model exported as TorchRec ships it (``torchrec.fx`` trace of the
  quantized EBC, FBGEMM's kernel bounds check in its default ``WARNING`` mode, which repairs a
  bad id to row 0) and no request checks: what serving costs without this package's checks;
* ``checked``: the exported artifact, ``model(request)``: the request checks, then the lookup
  with FBGEMM's own check off (the request checks cover it);
* ``lookup``: the artifact's ``model.model(request)``: the lookup alone, nothing checked.

``check_pct`` is the median paired difference checked - torchrec over torchrec: the price of
validation a user pays; ``own_check_pct`` (checked - lookup over lookup) is the request checks'
own cost. Times are the
thread's CPU time (one intra-op thread, no I/O: the latency on a core of its own), so that other
processes on a shared machine do not count. The model is the
found dims' (``--dims``, else the ``found_dims`` recorded in ``results/serving_NAME.json``, else a
search) with untrained weights: latency does not depend on the values of the weights.
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
from torchrec_dimgrow.saved_model import build_model, load_model, spec_for
from torchrec_dimgrow.serving import (
    ServingModel,
    export_serving,
    quantize_model,
    row_bytes,
    script,
    served_dim,
)
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
               "--set", f"data.cache_dir={work / 'data'}", "--seed", str(args.search_seed), "--quiet"]  # fmt: skip
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
    meta = export_serving(model, data.fields, serving, out, field_rows=data.vocab())
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


REQUEST_COLUMNS = [
    "model",
    "serving",
    "bags",
    "batch",
    "request_us_torchrec",
    "request_us_checked",
    "request_us_lookup",
    "check_us",
    "check_pct",
    "own_check_pct",
]


def recorded_dims(args: argparse.Namespace, name: str, flags: list[str], work: Path) -> dict[str, int]:
    """``--dims``, else the found dims the main mode recorded for this dataset, else a search."""
    recorded = Path(__file__).parent / "results" / f"serving_{name}.json"
    if args.dims is None and recorded.is_file():
        return {k: int(v) for k, v in json.loads(recorded.read_text())["meta"]["found_dims"].items()}
    return found_dims(args, flags, work)


@torch.no_grad()
def request_cost(
    artifact: torch.jit.ScriptModule,
    torchrec_default: torch.jit.ScriptModule,
    requests: list[dict[str, torch.Tensor]],
    rounds: int,
) -> dict[str, float]:
    """Median request times of the three calls (see the module doc) and the paired check costs (us)."""
    calls = {"checked": artifact, "torchrec": torchrec_default, "lookup": artifact.model}
    order = list(calls)
    times: dict[str, list[float]] = {k: [] for k in calls}
    over_torchrec, over_lookup = [], []
    for request in requests[:3]:
        for fn in calls.values():
            fn(request)
    for r in range(rounds):
        for request in requests:
            one: dict[str, float] = {}
            for variant in order[r % 3 :] + order[: r % 3]:  # each call leads in turn
                start = time.thread_time()
                calls[variant](request)
                one[variant] = 1e6 * (time.thread_time() - start)
                times[variant].append(one[variant])
            over_torchrec.append(one["checked"] - one["torchrec"])
            over_lookup.append(one["checked"] - one["lookup"])
    torchrec_us, lookup_us = statistics.median(times["torchrec"]), statistics.median(times["lookup"])
    cost = statistics.median(over_torchrec)
    return {
        "request_us_torchrec": round(torchrec_us, 1),
        "request_us_checked": round(statistics.median(times["checked"]), 1),
        "request_us_lookup": round(lookup_us, 1),
        "check_us": round(cost, 1),
        "check_pct": round(100 * cost / torchrec_us, 2),
        "own_check_pct": round(100 * statistics.median(over_lookup) / lookup_us, 2),
    }


def varied_bags(request: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The same ids in bags of 0-3 (each one-id bag repeated 0-3 times): the checks' general path."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, request["lengths"].shape, generator=g)
    return {"values": request["values"].repeat_interleave(lengths), "lengths": lengths}


def request_cost_rows(
    args: argparse.Namespace, name: str, flags: list[str], data: PreparedData, work: Path
) -> None:
    """The ``--request-cost`` table: check cost per request at the found dims (fp32, int8) and
    uniform 16, for one id per bag (the data as it is) and for bags of 0-3 ids."""
    dims = recorded_dims(args, name, flags, work)
    rows_of = data.vocab()
    one_id = [
        {"values": b.sparse_features.values(), "lengths": b.sparse_features.lengths()}
        for _, b in zip(range(20), data.train.batches(args.latency_batch, drop_last=True))
    ]
    varied = [varied_bags(r, i) for i, r in enumerate(one_id)]
    rows: list[dict[str, Any]] = []
    for label, d, serving, bags, requests in [
        ("found", dims, "fp32", "1 id", one_id),
        ("found", dims, "int8", "1 id", one_id),
        ("uniform 16", dict.fromkeys(rows_of, 16), "fp32", "1 id", one_id),
        ("found", dims, "fp32", "0-3 ids", varied),
    ]:
        torch.manual_seed(0)
        model = build_model(spec_for(data.fields, data.vocab_sizes, d)).eval()
        out = work / "request-cost" / f"{label.replace(' ', '')}-{serving}"
        export_serving(model, data.fields, serving, out, field_rows=rows_of)
        artifact = torch.jit.load(str(out / "serving.pt"))
        served, _ = quantize_model(copy.deepcopy(model), serving)  # as TorchRec ships it
        torchrec_default = script(ServingModel(served, data.fields))
        rows.append({"model": label, "serving": serving, "bags": bags, "batch": args.latency_batch,
                     **request_cost(artifact, torchrec_default, requests, args.request_rounds)})  # fmt: skip
        print(markdown_table(rows[-1:], REQUEST_COLUMNS), flush=True)
    print(markdown_table(rows, REQUEST_COLUMNS))
    write_rows(rows, args.out, f"serving_requests_{name}", {"argv": sys.argv, "found_dims": dims})


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
    p.add_argument("--request-cost", action="store_true", help="only the request checks' cost (see above)")
    p.add_argument("--request-rounds", type=int, default=30)
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
    if args.request_cost:
        request_cost_rows(args, name, flags, data, work)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    vocab = data.vocab()
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
