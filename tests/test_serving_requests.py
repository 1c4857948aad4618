"""What the exported serving model does with requests: malformed ones raise, raw values map by vocab.json.

The model runs in a child process that imports only torch and fbgemm_gpu, as a server would:
a request that crashed the kernel would kill the child, which the parent sees as its exit status.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from torchrec_dimgrow.recipes.export import export_saved
from torchrec_dimgrow.saved_model import build_model, save_model, spec_for

FIELDS = ["a", "b", "c", "d"]
ROWS = [40, 30, 20, 10]
DIMS = {"a": 3, "b": 0, "c": 4, "d": 5}  # b is dropped: its ids are still checked against its 30 rows
PREFIX = "builtins.ValueError: serving request: "
REPO = Path(__file__).resolve().parent.parent

CHILD = """
import sys, torch, fbgemm_gpu  # noqa: F401  the server side: torch + fbgemm_gpu only
torch.set_num_threads(1)
for model_path, requests_path, results_path in zip(*[iter(sys.argv[1:])] * 3):
    model = torch.jit.load(model_path)
    results = []
    for request in torch.load(requests_path):
        try:
            results.append(("ok", model(request).detach()))
        except Exception as exc:  # noqa: BLE001  every refusal is recorded, none may kill us
            results.append(("error", str(exc).strip().splitlines()[-1]))
    torch.save(results, results_path)
assert not any(k.startswith("torchrec_dimgrow") for k in sys.modules), "package imported"
"""


def _valid(rng: random.Random, batch: int) -> dict[str, torch.Tensor]:
    """A well-formed request of ``batch`` examples, int32 or int64 tensors; half of them with
    equal bags (0, 1 or 2 ids each: the model's fast path), the others 0-3 ids per bag."""
    equal = rng.choice([0, 1, 2]) if rng.random() < 0.5 else None
    lengths = [rng.randint(0, 3) if equal is None else equal for _ in range(len(FIELDS) * batch)]
    values = [rng.randrange(ROWS[i // batch]) for i, n in enumerate(lengths) for _ in range(n)]
    vdtype, ldtype = rng.choice([torch.int64, torch.int32]), rng.choice([torch.int64, torch.int32])
    request = {"values": torch.tensor(values, dtype=vdtype), "lengths": torch.tensor(lengths, dtype=ldtype)}
    if rng.random() < 0.2:  # a strided (non-contiguous) view of the same numbers
        request = {k: torch.stack([v, v]).t()[:, 0] for k, v in request.items()}
    return request


def _feature_at(request: dict[str, torch.Tensor], position: int) -> int:
    """Index of the feature whose bag holds value ``position`` (lengths are feature-major)."""
    batch = request["lengths"].numel() // len(FIELDS)
    ends = request["lengths"].to(torch.int64).view(len(FIELDS), batch).sum(1).cumsum(0)
    return int(torch.searchsorted(ends, position, right=True))


def _malformed(rng: random.Random, kind: str) -> tuple[dict[str, torch.Tensor], str]:
    """A request broken in one way, and the pattern its refusal must match."""
    request = _valid(rng, rng.randint(1, 8))
    values, lengths = request["values"].to(torch.int64), request["lengths"].to(torch.int64)
    m = values.numel()
    if kind == "negative length":
        at = rng.randrange(lengths.numel())
        bad = rng.choice([-1, -7, -(2**31), -(2**62)])
        lengths[at] = bad
        return {"values": values, "lengths": lengths}, rf"lengths: negative length {bad} at position {at}$"
    if kind == "huge length":
        at = rng.randrange(lengths.numel())
        lengths[at] = rng.choice([2**30, 2**31 - 1, 2**62, 2**63 - 1])
        return {
            "values": values,
            "lengths": lengths,
        }, rf"length {int(lengths[at])} at position \d+ exceeds the {m} values sent$"
    if kind == "lengths overflow":  # the sum wraps to 0 in int64, matching 0 values
        return {
            "values": values[:0],
            "lengths": torch.full((len(FIELDS),), 2**62),
        }, r"length 4611686018427387904 at position 0 exceeds the 0 values sent$"
    if kind == "wrong count":
        cut = rng.randint(1, len(FIELDS) - 1)
        shorter = lengths[:-cut] if rng.random() < 0.5 else torch.cat([lengths, lengths[:cut]])
        return {"values": values, "lengths": shorter}, r"not a multiple of the 4 input features"
    if kind == "values short":
        keep = rng.randrange(m) if m else 0
        if m == 0:
            return {"values": values, "lengths": lengths.clone().fill_(0)}, "__valid__"  # nothing to cut
        expect = rf"(values has {keep} entries but the lengths sum to {m}|exceeds the {keep} values sent)$"
        return {"values": values[:keep], "lengths": lengths}, expect
    if kind == "values long":
        extra = torch.zeros(rng.randint(1, 5), dtype=torch.int64)
        return {
            "values": torch.cat([values, extra]),
            "lengths": lengths,
        }, rf"values has {m + extra.numel()} entries but the lengths sum to {m}$"
    if kind in ("id too large", "id negative"):
        if m == 0:
            values, lengths = (
                torch.zeros(len(FIELDS), dtype=torch.int64),
                torch.ones(len(FIELDS), dtype=torch.int64),
            )
            m = len(FIELDS)
        at = rng.randrange(m)
        f = _feature_at({"values": values, "lengths": lengths}, at)
        bad = (
            ROWS[f] + rng.choice([0, 1, 2**31, 2**40])
            if kind == "id too large"
            else rng.choice([-1, -(2**40)])
        )
        values[at] = bad
        return {
            "values": values,
            "lengths": lengths,
        }, rf"values: id {bad} at position {at} \(feature '{FIELDS[f]}'\) is outside \[0, {ROWS[f]}\)$"
    if kind == "wrong dtype":
        key = rng.choice(["values", "lengths"])
        dtype, name = rng.choice([(torch.float32, "float32"), (torch.float64, "float64"), (torch.int8, "int8"),
                                  (torch.bool, "bool"), (torch.uint8, "uint8"), (torch.int16, "int16")])  # fmt: skip
        request = {"values": values, "lengths": lengths}
        request[key] = request[key].to(dtype)
        return request, rf"{key} must be int32 or int64, got {name}$"
    if kind == "not 1-D":
        key = rng.choice(["values", "lengths"])
        request = {"values": values, "lengths": lengths}
        request[key] = request[key].view(1, -1) if rng.random() < 0.5 else torch.tensor(3)
        return request, rf"{key} must be 1-D, got shape \[.*\]$"
    if kind == "empty batch with values":
        values = values if m else torch.zeros(3, dtype=torch.int64)
        return {
            "values": values,
            "lengths": lengths[:0],
        }, rf"values has {values.numel()} entries but the batch is empty$"
    if kind == "sparse or meta":
        key = rng.choice(["values", "lengths"])
        request = {"values": values, "lengths": lengths}
        if rng.random() < 0.5:
            request[key] = request[key].to_sparse()
            return request, rf"{key} must be a dense \(strided\) tensor$"
        request[key] = request[key].to("meta")
        return request, rf"{key} is on meta, the model on cpu$"
    if kind == "missing key":
        key = rng.choice(["values", "lengths"])
        return {
            k: v for k, v in {"values": values, "lengths": lengths}.items() if k != key
        }, rf"missing key '{key}'"
    if kind == "unexpected key":
        return {"values": values, "lengths": lengths, "weights": values}, r"unexpected key 'weights'"
    raise AssertionError(kind)


KINDS = [
    "negative length", "huge length", "lengths overflow", "wrong count", "values short", "values long",
    "id too large", "id negative", "wrong dtype", "not 1-D", "sparse or meta", "empty batch with values",
    "missing key", "unexpected key",
]  # fmt: skip


def requests(seed: int, count: int) -> list[tuple[dict[str, torch.Tensor], str]]:
    """``count`` requests, about 40% well-formed (empty batches among them), the rest broken."""
    rng = random.Random(seed)
    out: list[tuple[dict[str, torch.Tensor], str]] = []
    for _ in range(count):
        if rng.random() < 0.4:
            out.append((_valid(rng, rng.choice([0, 1, 2, 5, 16])), "__valid__"))
        else:
            out.append(_malformed(rng, rng.choice(KINDS)))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """fp32 and int8 exports of one saved model with a dropped field, and the float model."""
    root = tmp_path_factory.mktemp("served")
    spec = spec_for(FIELDS, ROWS, DIMS)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    with torch.no_grad():
        for p in model.sparse.parameters():
            p.normal_(0.0, 0.5)  # spread embeddings: int8 rounding is visible in the logits
    save_model(model, spec, root / "run")
    for serving in ("fp32", "int8"):
        export_saved(root / "run", serving, root / serving)
    return root, model


def _run_child(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_a_thousand_random_requests_never_kill_the_server(
    exported: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    root, float_model = exported
    plans = {serving: requests(seed, 1000) for seed, serving in enumerate(("fp32", "int8"))}
    args: list[str] = []
    for serving, plan in plans.items():
        torch.save([r for r, _ in plan], tmp_path / f"{serving}-requests.pt")
        args += [str(root / serving / "serving.pt"), str(tmp_path / f"{serving}-requests.pt"),
                 str(tmp_path / f"{serving}-results.pt")]  # fmt: skip
    proc = _run_child(args)
    assert proc.returncode == 0, f"the serving process died (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    for serving, plan in plans.items():
        results = torch.load(tmp_path / f"{serving}-results.pt")
        artifact = torch.jit.load(str(root / serving / "serving.pt"))
        kinds = {"valid": 0, "refused": 0}
        for i, ((request, expect), (status, out)) in enumerate(zip(plan, results, strict=True)):
            if expect != "__valid__":
                kinds["refused"] += 1
                assert status == "error" and out.startswith(PREFIX), (serving, i, expect, status, out)
                assert re.search(expect, out), (serving, i, expect, out)
                continue
            kinds["valid"] += 1
            assert status == "ok", (serving, i, out)
            with torch.no_grad():
                reference = artifact.model(request)  # the same lookup without the checks
            assert torch.equal(out, reference.detach()), (serving, i)
            if request["lengths"].numel():
                with torch.no_grad():
                    want = float_model(_kjt(request))
                bound = 1e-5 if serving == "fp32" else 0.05  # int8: test_serving's logit bound
                assert (out - want).abs().max() <= bound, (serving, i)
        assert kinds["valid"] > 300 and kinds["refused"] > 500, kinds


def _kjt(request: dict[str, torch.Tensor]) -> Any:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    return KeyedJaggedTensor(
        keys=FIELDS, values=request["values"].to(torch.int64), lengths=request["lengths"].to(torch.int64)
    )


def _readme_client() -> str:
    """The README's client block (raw values -> vocab.json -> model), exactly as documented."""
    text = (REPO / "README.md").read_text()
    start = text.index("```python\n", text.index("this block is what `tests/test_serving_requests.py` runs"))
    return text[start + len("```python\n") : text.index("```\n", start + 10)]


def _write_raw(prefix: Path) -> None:
    """Parquet splits with string, int and nullable/empty fields; test rows include unseen values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    sizes = {"train": 400, "val": 80, "test": 80}
    for split, n in sizes.items():
        pool = 30 if split == "train" else 40  # u30..u39, items 20..26 and rome never appear in train
        users = [f"u{rng.randrange(pool)}" for _ in range(n)]
        items = [rng.randrange(pool * 2 // 3) for _ in range(n)]
        cities = [rng.choice(["paris", "oslo", "lima", "", None, *(["rome"] if split == "test" else [])])
                  for _ in range(n)]  # fmt: skip
        labels = [i % 2 for i in range(n)]
        table = pa.table({"user": users, "item": items, "city": cities, "label": labels})
        pq.write_table(table, f"{prefix}_{split}.parquet")


def test_a_client_with_vocab_json_scores_raw_rows_as_the_package_does(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from torchrec_dimgrow.data import prepare

    _write_raw(tmp_path / "raw")
    data = prepare(tmp_path / "raw", "parquet", tmp_path / "run" / "data")  # where retrain prepares it
    assert data.fields == ["user", "item", "city"]
    spec = spec_for(data.fields, data.vocab_sizes, {"user": 3, "item": 0, "city": 2})
    torch.manual_seed(1)
    save_model(build_model(spec).eval(), spec, tmp_path / "run")
    meta = export_saved(tmp_path / "run", "fp32", tmp_path / "serve")
    assert meta["vocab"] == "vocab.json" and meta["source_vocab"].endswith("run/data/vocab.json")
    vocab = json.loads((tmp_path / "serve" / "vocab.json").read_text())
    assert vocab["fields"] == data.fields and vocab["unseen_id"] == 0

    # The package's path: its reader + vocab encode the test split, the artifact scores it.
    ids = torch.from_numpy(data.test.ids[:]).to(torch.int64)
    assert (ids == 0).any(dim=0).all(), "every field needs unseen/rare test values for this test"
    artifact = torch.jit.load(str(tmp_path / "serve" / "serving.pt"))
    with torch.no_grad():
        want = artifact(
            {"values": ids.t().reshape(-1), "lengths": torch.ones(ids.numel(), dtype=torch.int64)}
        )

    # The client's path: raw rows, vocab.json and the model, in a process without this package.
    raw = pq.read_table(f"{tmp_path / 'raw'}_test.parquet").drop(["label"]).to_pylist()
    (tmp_path / "rows.json").write_text(json.dumps(raw))
    client = re.sub(r"(?m)^examples = .*$", f"examples = json.load(open({str(tmp_path / 'rows.json')!r}))",
                    _readme_client().replace("DIR3", str(tmp_path / "serve")))  # fmt: skip
    assert f"json.load(open({str(tmp_path / 'rows.json')!r}))" in client
    client += (
        "import sys\n"
        "assert not any(k.startswith('torchrec_dimgrow') for k in sys.modules), 'package imported'\n"
        "print(json.dumps({'ids': values.tolist(), 'logits': logits.tolist()}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", client], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ids"] == ids.t().reshape(-1).tolist()
    assert torch.equal(torch.tensor(got["logits"]), want)
