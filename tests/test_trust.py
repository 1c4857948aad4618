"""Bad flags, bad files, bad checkpoints: one ``error:`` line, exit code 2, nothing left behind.

Flag and file checks call ``main([...])`` in-process (they fail before any process group
or model exists); the few runs that must train reuse one prepared Criteo sample and one
small finished search (module fixtures). Multi-rank cases are in tests/test_cli.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.dist_utils import child_env, dcp_tensors, same_tensors
from torchrec_dimgrow.cli import main
from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.data import prepare
from torchrec_dimgrow.manifest import verify
from torchrec_dimgrow.optim import EmbeddingOptimizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO = str(DATA / "criteo" / "criteo_head8k")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Criteo sample prepared once; every run below reuses it through data.cache_dir."""
    path = tmp_path_factory.mktemp("prepared") / "data"
    prepare(CRITEO, "criteo", path)
    return path


def search_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "search", "--data", CRITEO, "--format", "criteo", "--set", f"data.cache_dir={cache}", "--out", str(out),
        "--epochs", "1", "--batch-size", "64", "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-rank search with two checkpoints kept (steps 10 and 12)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    rc = main(
        search_args(
            cache,
            out,
            "--set",
            "train.max_steps=12",
            "--set",
            "run.checkpoint_every=5",
            "--set",
            "dimgrow.alpha=0.05",
        )
    )
    assert rc == 0
    return out


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


# ------------------------------------------------------------------ 5/6: setting ranges
@pytest.mark.parametrize(
    ("flag", "value", "expect"),
    [
        ("--d-max", "0", "dimgrow.d_max must be in [1, 256], got 0"),
        ("--d-max", "1000", "dimgrow.d_max must be in [1, 256], got 1000"),
        ("--set", "dimgrow.alpha=-1", "dimgrow.alpha must be >= 0, got -1"),
        ("--set", "dimgrow.check_interval=0", "dimgrow.check_interval must be >= 1, got 0"),
        ("--set", "dimgrow.grow_threshold=2", "dimgrow.grow_threshold must be in (0, 1], got 2"),
        ("--seed", "-1", "train.seed must be in [0, 4294967295], got -1"),
        ("--set", "train.lr=-1", "train.lr must be > 0, got -1"),
        ("--set", "train.lr=nan", "train.lr must be > 0, got nan"),
        ("--set", "run.threads=-1", "run.threads must be in [1, 4096], got -1"),
        ("--set", "run.threads=0", "run.threads must be in [1, 4096], got 0"),
        ("--set", "train.max_steps=0", "train.max_steps must be >= 1, got 0"),
        ("--set", "run.checkpoint_every=-1", "run.checkpoint_every must be >= 0, got -1"),
        ("--epochs", "0", "train.epochs must be >= 1, got 0"),
        ("--set", "dimgrow.initial_dim=0", "dimgrow.initial_dim must be in [1, 256], got 0"),
        (
            "--set",
            "dimgrow.shrink_threshold=0.7",
            "dimgrow.shrink_threshold (0.7) must be below dimgrow.grow_threshold (0.6)",
        ),
    ],
)
def test_out_of_range_flag_is_one_line_naming_it_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, expect: str
) -> None:
    out = tmp_path / "out"
    args = ["search", "--data", CRITEO, "--format", "criteo", "--out", str(out), flag, value]
    assert main(args) == 2
    assert one_error_line(capsys) == f"error: {expect}"
    assert not out.exists()


def test_bad_resume_path_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert (
        main(["search", "--data", CRITEO, "--format", "criteo", "--out", str(out), "--resume", str(out)]) == 2
    )
    assert "no DimGrow checkpoint" in one_error_line(capsys)
    assert not out.exists()


def test_directory_given_as_a_split_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split in ("train", "val", "test"):
        (tmp_path / f"d_{split}.tsv").mkdir()
    out = tmp_path / "out"
    assert main(["search", "--data", str(tmp_path / "d"), "--format", "criteo", "--out", str(out)]) == 2
    assert "is a directory, expected a file" in one_error_line(capsys)
    assert not out.exists()


def test_fused_optimizer_without_a_cpu_kernel_is_refused_before_any_work(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fbgemm's CPU kernel has no fused Adam: refused by setting name, not by an fbgemm assertion."""
    out = tmp_path / "out"
    assert main(search_args(cache, out, "--set", "train.embedding_optimizer=adam")) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: train.embedding_optimizer adam:") and "rowwise_adagrad" in line, line
    assert not out.exists()
    EmbeddingOptimizer("adam").check_device(torch.device("cuda"))  # CUDA has the kernel
    EmbeddingOptimizer("rowwise_adagrad").check_device(torch.device("cpu"))


@pytest.mark.parametrize(
    ("backend", "gpus", "expect"),
    [
        ("nccl", 0, "error: run.backend nccl needs CUDA GPUs"),
        ("nccl", 1, None),  # rank 0 of 1 with one GPU: accepted (the NCCL build decides below)
        ("foo", 0, "error: run.backend / DIMGROW_BACKEND: unknown backend 'foo'"),
    ],
)
def test_backend_this_process_cannot_run_is_refused_by_flag(
    monkeypatch: pytest.MonkeyPatch, backend: str, gpus: int, expect: str | None
) -> None:
    """``run.backend=nccl`` without GPUs failed in init_process_group with a RuntimeError trace."""
    from torchrec_dimgrow.distributed import env as dist_env
    from torchrec_dimgrow.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(dist_env.dist, "is_nccl_available", lambda: True)
    if expect is None:
        dist_env.check_backend(backend, local_rank=0)
        with pytest.raises(UsageError, match="local rank 1 has no GPU"):
            dist_env.check_backend(backend, local_rank=1)
        return
    with pytest.raises(UsageError) as err:
        dist_env.check_backend(backend)
    assert f"error: {err.value}".startswith(expect)


def test_nccl_on_this_cpu_machine_is_one_error_line(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert main(search_args(cache, out, "--set", "run.backend=nccl")) == 2
    assert one_error_line(capsys).startswith("error: run.backend nccl needs CUDA GPUs")
    assert not out.exists()


# ------------------------------------------------------------------ 3: meaningless runs
def test_batch_larger_than_train_split_is_refused(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(search_args(cache, out, "--batch-size", "100000")) == 2
    assert "no training step would run" in one_error_line(capsys)
    assert not out.exists()


def _csv_splits(tmp_path: Path, val_labels: list[str], train_labels: list[str] | None = None) -> str:
    train_labels = train_labels or ["0", "1"] * 40
    for split, labels in (("train", train_labels), ("val", val_labels), ("test", ["0", "1"] * 5)):
        rows = [f"{lab},{'ab'[i % 2]},{i % 3}" for i, lab in enumerate(labels)]
        (tmp_path / f"t_{split}.csv").write_text("label,f1,f2\n" + "\n".join(rows) + "\n")
    return str(tmp_path / "t")


def test_one_class_validation_split_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _csv_splits(tmp_path, ["0"] * 10)
    out = tmp_path / "out"
    assert main(["search", "--data", data, "--format", "csv", "--out", str(out), "--batch-size", "8"]) == 2
    assert "the val split has only label 0 (10 rows): AUC is undefined" in one_error_line(capsys)
    assert not out.exists()


# ------------------------------------------------------------------ 6: labels, degenerate columns
def test_csv_labels_accept_exactly_the_documented_spellings(tmp_path: Path) -> None:
    labels = ["1.00", "0.", "true", "FALSE", " 1 ", "0.0"] * 10
    data = _csv_splits(tmp_path, ["0", "1"] * 5, train_labels=labels)
    prepared = prepare(data, "csv", tmp_path / "cache")
    assert prepared.train.labels[:6].tolist() == [1, 0, 1, 0, 1, 0]
    (tmp_path / "t_train.csv").write_text("label,f1,f2\n0,a,1\n2,b,1\n")
    with pytest.raises(ValueError, match=r"line 3: label must be 0 or 1, got '2'"):
        prepare(data, "csv", tmp_path / "cache2")


def _parquet_splits(tmp_path: Path, table: pa.Table) -> str:
    for split in ("train", "val", "test"):
        pq.write_table(table, tmp_path / f"p_{split}.parquet")
    return str(tmp_path / "p")


def test_parquet_string_and_bool_labels_match_csv(tmp_path: Path) -> None:
    text = pa.table({"label": ["1.00", "0", "true", "false"] * 4, "f": ["a", "b"] * 8})
    flags = pa.table({"label": [True, False, True, False] * 4, "f": ["a", "b"] * 8})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = prepare(_parquet_splits(tmp_path / "a", text), "parquet", tmp_path / "ca")
    b = prepare(_parquet_splits(tmp_path / "b", flags), "parquet", tmp_path / "cb")
    assert a.train.labels.tolist() == b.train.labels.tolist() == [1, 0, 1, 0] * 4


def test_parquet_duplicate_column_names_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = pa.Table.from_arrays(
        [pa.array([0, 1] * 4), pa.array(["a"] * 8), pa.array(["b"] * 8)], ["label", "f", "f"]
    )
    data = _parquet_splits(tmp_path, table)
    out = tmp_path / "out"
    assert main(["search", "--data", data, "--format", "parquet", "--out", str(out)]) == 2
    assert "duplicate column name(s) ['f']" in one_error_line(capsys)
    assert not out.exists()


def test_degenerate_columns_warn_once_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 40
    table = pa.table(
        {
            "label": [0, 1] * (n // 2),
            "empty": pa.array([None] * n, type=pa.string()),
            "uid": [f"u{i}" for i in range(n)],
            "ok": ["a", "b", "c", "d"] * (n // 4),
        }
    )
    data = _parquet_splits(tmp_path, table)
    out = tmp_path / "out"
    args = ["search", "--data", data, "--format", "parquet", "--out", str(out), "--batch-size", "8"]
    assert main([*args, "--set", "train.max_steps=2", "--quiet"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if line.startswith("warning: column")]
    assert len(warned) == 2, err
    assert "'empty' is empty/null on every train row" in warned[0]
    assert "'uid': data.min_count 2 maps 100% of train rows into the shared bucket 0" in warned[1]


# ------------------------------------------------------------------ 4: output directories
def test_finished_run_is_not_replaced_without_overwrite(
    cache: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished, tmp_path)
    before = (run / "metrics.json").read_bytes()
    assert main(search_args(cache, run, "--set", "train.max_steps=3")) == 2
    assert "holds a previous run (dims.json); pass --overwrite" in one_error_line(capsys)
    assert (run / "metrics.json").read_bytes() == before
    assert main(search_args(cache, run, "--set", "train.max_steps=3", "--overwrite")) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps"] == 3
    assert not (run / "checkpoint.prev").exists(), "the old run's checkpoints must not survive --overwrite"
    assert not list(run.glob(".results-*")), "no staging dir left"


def test_retrain_never_writes_into_the_search_dir(
    cache: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished, tmp_path)
    before = (run / "metrics.json").read_bytes()
    base = ["retrain", "--data", CRITEO, "--format", "criteo", "--dims", str(run / "dims.json"), "--quiet"]
    assert main([*base, "--out", str(run)]) == 2
    assert "is the search directory of --dims" in one_error_line(capsys)
    assert main([*base, "--set", "train.max_steps=2", "--epochs", "1"]) == 0
    assert (run / "metrics.json").read_bytes() == before
    assert json.loads((run / "retrain" / "metrics.json").read_text())["steps"] == 2
    capsys.readouterr()
    assert main([*base, "--set", "train.max_steps=2", "--epochs", "1"]) == 2
    assert "holds a previous run (metrics.json); pass --overwrite" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        ("{not json", "not valid JSON"),
        ('{"I1": -1}', "field 'I1' has invalid dim -1"),
        ('{"user_id": 4, "item_id": 2}', "fields do not match the data"),
    ],
)
def test_bad_dims_file_is_one_line(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expect: str
) -> None:
    dims = tmp_path / "dims.json"
    dims.write_text(content)
    out = tmp_path / "rt"
    args = ["retrain", "--data", CRITEO, "--format", "criteo", "--dims", str(dims), "--out", str(out)]
    args += ["--set", f"data.cache_dir={cache}"]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --dims: {dims}") and expect in line
    assert not out.exists() and not (tmp_path / "data").exists()


# ------------------------------------------------------------------ 1/2: checkpoints and resume
def test_resume_takes_the_saved_settings_and_refuses_contradictions(
    cache: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished, tmp_path)
    assert main(search_args(cache, run, "--resume", str(run), "--set", "dimgrow.alpha=0.2")) == 2
    assert one_error_line(capsys) == (
        "error: dimgrow.alpha 0.2 contradicts the checkpoint's dimgrow.alpha 0.05; --resume continues "
        "with the saved settings (drop the setting, or start a new run)"
    )
    assert main(search_args(cache, run, "--resume", str(run), "--d-max", "8")) == 2
    assert "dimgrow.d_max 8 contradicts the checkpoint's dimgrow.d_max 16" in one_error_line(capsys)
    # settings left out take the saved values (here dimgrow.alpha 0.05 and train.max_steps 12)
    assert main(search_args(cache, run, "--resume", str(run))) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["dimgrow"]["alpha"] == 0.05 and config["train"]["max_steps"] == 12


def test_resume_of_a_checkpoint_searched_by_a_removed_rule_is_refused_by_name() -> None:
    from torchrec_dimgrow.config import PRESETS, RETIRED
    from torchrec_dimgrow.errors import CheckpointError, UsageError
    from torchrec_dimgrow.recipes.resume import adopt_saved
    from torchrec_dimgrow.runconfig import SearchRunConfig

    fresh = SearchRunConfig()  # today's defaults
    # flag names, written before the priced bar and the row cap existed: it was searched with
    # neither, a rule no preset has, so continuing it would silently change the search
    saved = {"alpha": 0.05, "patience": 3}
    with pytest.raises(CheckpointError, match=r"grow_price_exponent = 0\.0 is no longer a setting"):
        adopt_saved(fresh, saved, explicit=set())
    # one that recorded every rule setting at today's values resumes (either spelling)
    today = {**RETIRED, **asdict(PRESETS["dimgrow"])}
    for recorded in (
        {**saved, **today},
        {"dimgrow.alpha": 0.05, **{f"dimgrow.{k}": v for k, v in today.items()}},
    ):
        cfg = adopt_saved(fresh, recorded, explicit=set())
        assert (cfg.dimgrow.alpha, cfg.dimgrow.preset) == (0.05, "dimgrow")
    assert adopt_saved(fresh, {**saved, **today}, explicit=set()).train.early_stop_patience == 3
    # the paper's rule resumes under its preset
    paper = {"dimgrow.preset": "paper", **{f"dimgrow.{k}": v for k, v in asdict(PRESETS["paper"]).items()}}
    assert adopt_saved(fresh, paper, explicit=set()).dimgrow.preset == "paper"
    with pytest.raises(CheckpointError, match=r"budget_pressure = 2\.0 is no longer a setting"):
        adopt_saved(fresh, {**today, "budget_pressure": 2.0}, explicit=set())
    with pytest.raises(
        UsageError, match=r"dimgrow\.preset paper contradicts the checkpoint.s dimgrow\.preset dimgrow"
    ):
        adopt_saved(
            SearchRunConfig(dimgrow=DimGrowConfig(preset="paper")), today, explicit={"dimgrow.preset"}
        )


def test_damaged_checkpoint_file_is_named(
    cache: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "checkpoint.prev")
    state = run / "checkpoint" / "search_state.json"
    state.write_bytes(state.read_bytes()[:100])
    before = sorted(p.name for p in run.iterdir())
    assert main(search_args(cache, run, "--resume", str(run))) == 2
    assert one_error_line(capsys) == (
        f"error: {state}: 100 bytes, the manifest says {json.loads((run / 'checkpoint' / 'manifest.json').read_text())['files']['search_state.json']['bytes']} (truncated?)"
    )
    assert sorted(p.name for p in run.iterdir()) == before


def test_damaged_latest_checkpoint_falls_back_to_the_previous(
    cache: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(finished, tmp_path)
    rank0 = run / "checkpoint" / "rank0.pt"
    blob = bytearray(rank0.read_bytes())
    blob[200:220] = bytes(20)
    rank0.write_bytes(bytes(blob))
    assert main(search_args(cache, run, "--resume", str(run))) == 0
    err = capsys.readouterr().err
    assert f"warning: {rank0}: sha256 mismatch" in err and "resuming from the previous checkpoint" in err
    assert json.loads((run / "metrics.json").read_text())["steps"] == 12
    assert verify(run / "checkpoint").manifest["step"] == 12
    assert (run / "checkpoint.damaged").is_dir() and verify(run / "checkpoint.prev").manifest["step"] == 10


def test_nan_guard_names_the_step_and_keeps_the_last_good_checkpoint(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    # Adam moves every dense weight by ~lr per step: at 1e13 the activations of a search
    # started at dim 1 overflow at step 2 (from the 4-column block they do at step 1)
    args = [
        "--set",
        "train.lr=1e13",
        "--set",
        "train.max_steps=5",
        "--set",
        "run.checkpoint_every=1",
        "--set",
        "dimgrow.initial_dim=1",
    ]
    assert main(search_args(cache, out, *args)) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: step 2: non-finite") and "last good checkpoint stays in" in line
    assert verify(out / "checkpoint").manifest["step"] == 1
    assert not (out / "dims.json").exists()


def test_tensorboard_without_the_package_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed: nothing to refuse")
    out = tmp_path / "out"
    args = [
        "search",
        "--data",
        CRITEO,
        "--format",
        "criteo",
        "--out",
        str(out),
        "--set",
        f"run.tensorboard={tmp_path}",
    ]
    assert main(args) == 2
    assert "run.tensorboard needs the tensorboard package" in one_error_line(capsys)
    assert not out.exists()


def test_one_rank_checkpoint_resumes_on_two_ranks(cache: Path, finished: Path, tmp_path: Path) -> None:
    """Elastic resume the other way: the 1-rank step-10 checkpoint continues on 2 real ranks."""
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "checkpoint")  # as if the run died after its step-10 checkpoint
    original = dcp_tensors(run / "checkpoint.prev" / "dcp")
    args = [a for a in search_args(cache, run) if a != "--quiet"]
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "torchrec_dimgrow",
         *args, "--resume", str(run)],
        env=child_env(PYTHONHASHSEED="0", OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stderr.count("warning: resuming a 1-rank checkpoint on 2 rank(s)") == 1, r.stderr
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 12 and 0 < m["val_auc"] < 1
    resharded = verify(run / "checkpoint.prev")  # the step-10 state, rewritten by 2 ranks
    assert resharded.manifest["world_size"] == 2 and resharded.manifest["step"] == 10
    for ckpt in ("checkpoint", "checkpoint.prev"):  # 2 ranks hashed a share each: all files listed
        on_disk = {str(p.relative_to(run / ckpt)) for p in (run / ckpt).rglob("*") if p.is_file()}
        assert set(verify(run / ckpt).manifest["files"]) == on_disk - {"manifest.json"}
    assert same_tensors(dcp_tensors(run / "checkpoint.prev" / "dcp"), original) == []


def test_search_that_keeps_no_field_warns_and_fails_under_strict(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    heavy = [
        "--set",
        "dimgrow.preset=paper",
        "--set",
        "dimgrow.alpha=1000",
        "--set",
        "train.max_steps=3",
    ]  # every gate falls below 0.5
    assert main(search_args(cache, tmp_path / "a", *heavy)) == 0
    err = capsys.readouterr().err
    assert (
        "warning: the search kept no field (every dim is 0)" in err and "run.strict makes this exit 3" in err
    )
    assert set(json.loads((tmp_path / "a" / "dims.json").read_text()).values()) == {0}
    assert main(search_args(cache, tmp_path / "b", *heavy, "--set", "run.strict=true")) == 3


def test_log_level_beats_quiet_and_dimgrow_log_works(
    cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (
        main(search_args(cache, tmp_path / "a", "--set", "train.max_steps=2", "--set", "run.log_level=INFO"))
        == 0
    )
    assert [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch 0  step 2  val_auc")
    ]
    monkeypatch.setenv("DIMGROW_LOG", "ERROR")
    heavy = [
        "--set",
        "dimgrow.preset=paper",
        "--set",
        "dimgrow.alpha=1000",
        "--set",
        "train.max_steps=2",
    ]
    assert main([a for a in search_args(cache, tmp_path / "b", *heavy) if a != "--quiet"]) == 0
    assert capsys.readouterr().err == "", "ERROR hides the epoch line and the no-field warning"


def test_resume_into_another_finished_run_is_refused(
    cache: Path, finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    shutil.copytree(finished, other)
    before = (other / "metrics.json").read_bytes()
    assert main(search_args(cache, other, "--resume", str(finished))) == 2
    assert "holds a previous run" in one_error_line(capsys)
    assert (other / "metrics.json").read_bytes() == before


def test_tensorboard_logs_val_auc_dims_and_gates(cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")  # optional extra; CI does not install it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    assert (
        main(
            search_args(
                cache,
                tmp_path / "out",
                "--set",
                "train.max_steps=4",
                "--set",
                "run.log_every=2",
                "--set",
                f"run.tensorboard={board}",
            )
        )
        == 0
    )
    events = EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "val/auc", "val/logloss", "dims/total", "dims/C1", "gates/C1/min_active"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert events.Scalars("val/auc")[0].value == pytest.approx(metrics["val_auc"])
