"""Saved models verified before use, disk errors and Ctrl-C as expected failures, one writer per
run directory, compressed and NaN-bearing inputs.

In-process runs call ``main([...])``; what needs a signal, a kill or a file-size limit runs
the CLI in a child process. All runs share one small synthetic CSV dataset.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.dist_utils import child_env, run_ranks
from torchrec_dimgrow.artifacts import write_json_atomic
from torchrec_dimgrow.cli import main
from torchrec_dimgrow.data import load_prepared, prepare
from torchrec_dimgrow.data.columns import MISSING, as_tokens
from torchrec_dimgrow.data.store import load_vocab
from torchrec_dimgrow.diskwrite import disk_errors
from torchrec_dimgrow.errors import CheckpointError, DiskError
from torchrec_dimgrow.manifest import compare_data, data_fingerprint, verify
from torchrec_dimgrow.runlock import LOCK_FILE, acquire, release

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("a", "b", "c")


def _rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Field ``a`` (30 Zipf-like values) carries the label; ``b`` and ``c`` are noise."""
    a = np.minimum(rng.zipf(1.6, n), 30)
    label = (rng.random(n) < np.where(a % 2 == 0, 0.8, 0.2)).astype(int)
    return {"a": a, "b": rng.integers(0, 10, n), "c": rng.integers(0, 5, n), "label": label}


def write_csv(prefix: Path, relabel: dict[str, dict[int, int]] | None = None, suffix: str = ".csv") -> str:
    """``PREFIX_{train,val,test}.csv[.gz|...]``; ``relabel`` maps a column's values to others."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 3000), ("val", 600), ("test", 600)):
        cols = _rows(rng, n)
        for name, mapping in (relabel or {}).items():
            cols[name] = np.array([mapping[int(v)] for v in cols[name]])
        text = "a,b,c,label\n" + "".join(f"{a},{b},{c},{y}\n" for a, b, c, y in zip(*cols.values()))
        with pa.output_stream(f"{prefix}_{split}{suffix}", compression="detect") as out:
            out.write(text.encode())
    return str(prefix)


@pytest.fixture(scope="module")
def csv_prefix(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_csv(tmp_path_factory.mktemp("csv") / "toy")


@pytest.fixture(scope="module")
def cache(csv_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prepared") / "data"
    prepare(csv_prefix, "csv", path)
    return path


def data_args(prefix: str) -> list[str]:
    return ["--data", prefix, "--format", "csv"]


@pytest.fixture(scope="module")
def model_run(csv_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A retrain with its saved model."""
    run = tmp_path_factory.mktemp("retrain") / "run"
    args = ["retrain", *data_args(csv_prefix), "--uniform-dim", "2", "--out", str(run), "--epochs", "1"]
    assert main([*args, "--set", "train.max_steps=5", "--quiet"]) == 0
    return run


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def search_args(prefix: str, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "search", *data_args(prefix), "--set", f"data.cache_dir={cache}", "--out", str(out), "--epochs", "1",
        "--batch-size", "16", "--quiet", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- saved models


def test_evaluate_refuses_data_whose_ids_mean_other_values(
    model_run: Path, csv_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", str(model_run), *data_args(csv_prefix)]) == 0
    capsys.readouterr()
    # the same rows with field a's values relabelled (a permutation: same vocab size, other ids)
    permuted = write_csv(tmp_path / "permuted", relabel={"a": {v: 31 - v for v in range(1, 31)}})
    sizes = [
        load_prepared(p).vocab_sizes
        for p in (_prep(csv_prefix, tmp_path / "c1"), _prep(permuted, tmp_path / "c2"))
    ]
    assert sizes[0] == sizes[1]  # the old check (vocab sizes) could not tell
    assert main(["evaluate", "--model", str(model_run), *data_args(permuted)]) == 2
    line = one_error_line(capsys)
    assert "field 'a'" in line and "vocab differs" in line, line


def _prep(prefix: str, cache: Path) -> Path:
    prepare(prefix, "csv", cache)
    return cache


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_missing_weight_shard_is_one_line_naming_it(
    model_run: Path, csv_prefix: str, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(model_run, run)
    shard = run / "model" / "dcp" / "__0_0.distcp"
    shard.unlink()
    args = (
        data_args(csv_prefix)
        if command == "evaluate"
        else ["--serving", "fp32", "--out", str(tmp_path / "s")]
    )
    assert main([command, "--model", str(run), *args]) == 2
    assert one_error_line(capsys) == f"error: {shard}: missing from the saved model"
    assert not (tmp_path / "s").exists()


def test_extra_changed_and_unverifiable_model_files_are_refused(
    model_run: Path, csv_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(model_run, run)
    evaluate = ["evaluate", "--model", str(run), *data_args(csv_prefix)]
    extra = run / "model" / "dcp" / "stray.bin"
    extra.write_bytes(b"x")
    assert main(evaluate) == 2
    assert (
        one_error_line(capsys)
        == f"error: {extra}: not listed in the saved model's manifest.json (added after it was written)"
    )
    extra.unlink()
    shard = run / "model" / "dcp" / "__0_0.distcp"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    assert main(evaluate) == 2
    assert one_error_line(capsys).startswith(f"error: {shard}: sha256 mismatch")
    (run / "model" / "manifest.json").unlink()  # as a model saved before manifests existed
    assert main(evaluate) == 2
    line = one_error_line(capsys)
    assert "no manifest.json" in line and "run retrain again" in line


def test_saved_model_manifest_records_the_vocab_of_every_field(model_run: Path, csv_prefix: str) -> None:
    manifest = json.loads((model_run / "model" / "manifest.json").read_text())
    assert sorted(manifest["data"]["vocab_fields"]) == sorted(FIELDS)
    assert verify(model_run / "model", what="saved model").path == model_run / "model"


def test_vocab_fingerprint_covers_the_values_and_resume_names_the_changed_field(
    cache: Path, csv_prefix: str, tmp_path: Path
) -> None:
    permuted = write_csv(tmp_path / "permuted", relabel={"b": {v: 9 - v for v in range(10)}})
    other = _prep(permuted, tmp_path / "data")
    saved, now = data_fingerprint(load_prepared(cache).source, cache), data_fingerprint({}, other)
    assert [f for f in FIELDS if saved["vocab_fields"][f] != now["vocab_fields"][f]] == ["b"]
    with pytest.raises(CheckpointError, match=r"^field 'b': its vocab differs from the checkpoint's"):
        compare_data(saved, {**saved, "vocab_fields": now["vocab_fields"]})


# ---------------------------------------------------------------- disk errors


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
        (OSError(errno.EFBIG, "File too large"), "file too large"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), ""),
    ],
)
def test_disk_failures_become_one_line_and_remove_the_partial_write(
    tmp_path: Path, error: Exception, cause: str
) -> None:
    partial = tmp_path / "checkpoint.tmp"
    partial.mkdir()
    (partial / "rank0.pt").write_bytes(b"half")
    with pytest.raises(
        DiskError, match="^" + re.escape(f"cannot write {tmp_path / 'checkpoint'}: {cause}")
    ) as info:
        with disk_errors(tmp_path / "checkpoint", partial=[partial]):
            raise error
    assert "\n" not in str(info.value)
    assert not partial.exists()
    with pytest.raises(ValueError, match="a bug"), disk_errors(tmp_path / "x"):
        raise ValueError("a bug")  # anything else keeps its type (and traceback)


def test_json_results_survive_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"old": 1})

    def full(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskError, match=r"metrics\.json: no space left on device"):
        write_json_atomic(path, {"new": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_full_disk_during_an_export_is_one_line_and_leaves_no_partial_artifact(
    model_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(self: object, f: object, **kwargs: object) -> None:
        Path(str(f)).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch.jit.RecursiveScriptModule, "save", full)
    out = tmp_path / "serve"
    assert main(["export", "--model", str(model_run), "--serving", "fp32", "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"error: cannot write {out}: no space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no serve, serve.tmp, nor lock file


def _fail_second_save(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """``torch.save`` (a checkpoint's ``rank0.pt``) works once, then raises ``error``."""
    real, calls = torch.save, []

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if str(f).endswith("checkpoint.tmp/rank0.pt"):
            calls.append(f)
            if len(calls) == 2:
                raise error
        real(obj, f, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_at_a_checkpoint_keeps_the_previous_one(
    csv_prefix: str,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    _fail_second_save(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert (
        main(
            search_args(
                csv_prefix, cache, out, "--set", "train.max_steps=12", "--set", "run.checkpoint_every=5"
            )
        )
        == 2
    )
    assert one_error_line(capsys) == f"error: cannot write {out / 'checkpoint'}: no space left on device"
    assert verify(out / "checkpoint").manifest["step"] == 5  # the previous checkpoint, intact
    assert not (out / "checkpoint.tmp").exists() and not (out / "dims.json").exists()


def _search_with_full_disk_on_rank1(
    rank: int, world: int, prefix: str, cache: str, out: str
) -> tuple[int, str]:
    """One rank of a 2-rank search whose rank 1 cannot write its second checkpoint file."""
    if rank == 1:
        real = torch.save

        def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
            if str(f).endswith("checkpoint.tmp/rank1.pt") and (Path(out) / "checkpoint").is_dir():
                raise OSError(errno.ENOSPC, "No space left on device", str(f))
            real(obj, f, *args, **kwargs)  # type: ignore[arg-type]

        torch.save = save  # type: ignore[assignment]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(
            search_args(
                prefix,
                Path(cache),
                Path(out),
                "--set",
                "train.max_steps=12",
                "--set",
                "run.checkpoint_every=5",
            )
        )
    return rc, err.getvalue()


def test_a_rank_that_cannot_write_its_checkpoint_stops_every_rank(
    csv_prefix: str, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    results = run_ranks(_search_with_full_disk_on_rank1, 2, csv_prefix, str(cache), str(out), timeout=240)
    (rc0, err0), (rc1, _) = results
    assert (rc0, rc1) == (2, 2)  # both ranks return; neither waits at a barrier for the other
    assert err0.strip() == f"error: cannot write {out / 'checkpoint'}: no space left on device (on rank 1)", (
        err0
    )
    assert verify(out / "checkpoint").manifest["step"] == 5
    assert not (out / "checkpoint.tmp").exists()


def _child(args: list[str], limit_bytes: int | None = None) -> subprocess.Popen[str]:
    """The CLI in a child process (this tree first on its path), optionally under ``ulimit -f``."""

    def limits() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG
        # Ctrl-C as a terminal delivers it: a pytest started in the background by a shell without
        # job control has SIGINT ignored, the child would inherit that, and Python keeps it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = child_env()
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return subprocess.Popen(
        [sys.executable, "-m", "torchrec_dimgrow", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=limits,
    )


def test_file_size_limit_during_a_search_is_exit_2_and_one_line(
    csv_prefix: str, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = _child(
        search_args(csv_prefix, cache, out, "--set", "train.max_steps=12", "--set", "run.checkpoint_every=5"),
        4096,
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()  # EFBIG from DCP, or torch's zip writer's "unexpected pos"
    assert len(lines) == 1 and lines[0].startswith(
        f"error: cannot write {out / 'checkpoint'}: file too large"
    ), err
    assert not (out / "checkpoint.tmp").exists() and not (out / "checkpoint").exists()


# ---------------------------------------------------------------- one writer, Ctrl-C


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _long_search(prefix: str, cache: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return _child(search_args(prefix, cache, out, "--set", "run.checkpoint_every=2", *extra))


def test_second_run_on_a_live_out_is_refused_and_a_killed_runs_lock_is_taken(
    csv_prefix: str, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    first = _long_search(csv_prefix, cache, out)
    try:
        _wait_for(out / "checkpoint" / "manifest.json", first)
        assert main(search_args(csv_prefix, cache, out, "--resume", str(out))) == 2
        assert one_error_line(capsys) == (
            f"error: --out {out} is in use by another run (pid {first.pid}); "
            "wait for it to finish or choose another --out"
        )
        assert main(["retrain", *data_args(csv_prefix), "--uniform-dim", "2", "--out", str(out)]) == 2
        assert f"--out {out} is in use by another run (pid {first.pid})" in one_error_line(capsys)
        assert (out / "checkpoint").is_dir()  # the refused runs removed nothing
    finally:
        first.kill()  # kill -9: no chance to release anything
        first.communicate()
    assert (out / LOCK_FILE).exists()  # left behind, and harmless
    assert main(search_args(csv_prefix, cache, out, "--resume", str(out))) == 0
    assert (out / "dims.json").is_file()
    assert not (out / LOCK_FILE).exists()  # a run that ends removes its lock file


def _search_rank(rank: int, world: int, prefix: str, cache: str, out: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(search_args(prefix, Path(cache), Path(out), "--set", "train.max_steps=4"))
    return rc, err.getvalue()


def test_every_rank_of_a_run_on_a_locked_out_stops_with_exit_2(
    csv_prefix: str, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    handle, path = acquire(out)  # this process stands for the live run
    try:
        (rc0, err0), (rc1, err1) = run_ranks(_search_rank, 2, csv_prefix, str(cache), str(out), timeout=240)
    finally:
        release(handle, path)
    assert (rc0, rc1) == (2, 2) and err1 == ""
    assert err0.strip() == (
        f"error: --out {out} is in use by another run (pid {os.getpid()}); "
        "wait for it to finish or choose another --out"
    )
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, and the lock file gone


def test_ctrl_c_is_one_line_exit_130_and_the_checkpoint_resumes(
    csv_prefix: str, cache: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = _long_search(csv_prefix, cache, out)
    _wait_for(out / "checkpoint" / "manifest.json", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted at step "), err
    assert lines[0].endswith(f"; resume with --resume {out}"), err
    assert verify(out / "checkpoint").manifest["step"] >= 2
    assert not (out / "checkpoint.tmp").exists()


def test_ctrl_c_inside_a_checkpoint_write_keeps_the_previous_one(
    csv_prefix: str,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    _fail_second_save(monkeypatch, KeyboardInterrupt())
    assert (
        main(
            search_args(
                csv_prefix, cache, out, "--set", "train.max_steps=12", "--set", "run.checkpoint_every=5"
            )
        )
        == 130
    )
    assert capsys.readouterr().err.strip() == f"interrupted at step 10; resume with --resume {out}"
    assert verify(out / "checkpoint").manifest["step"] == 5
    assert not (out / "checkpoint.tmp").exists()


@pytest.mark.parametrize(
    ("extra", "at_call", "expect"),
    [
        ((), 2, "interrupted at step 1, before the first checkpoint: nothing to resume (run it again)"),
        (
            ("--set", "run.votes=2"),
            7,  # the second search's third step
            "interrupted at step 2 of the search with seed 1; a voting run (run.votes) cannot be resumed "
            "(its finished searches stay in {out}/votes)",
        ),
    ],
)
def test_ctrl_c_says_when_there_is_nothing_to_resume(
    csv_prefix: str,
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: tuple[str, ...],
    at_call: int,
    expect: str,
) -> None:
    from torchrec_dimgrow.recipes.search import DimGrowSearch

    real, calls = DimGrowSearch.train_step, []

    def step(self: DimGrowSearch, *args: object) -> object:
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(DimGrowSearch, "train_step", step)
    out = tmp_path / "run"
    assert main(search_args(csv_prefix, cache, out, "--set", "train.max_steps=4", *extra)) == 130
    # A vote's first search may finish with a warning of its own (4 steps learn nothing); the
    # interrupt itself is one line.
    lines = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("warning:")]
    assert lines == [expect.format(out=out)]


# ---------------------------------------------------------------- inputs, progress bars


@pytest.mark.parametrize("suffix", [".csv.gz", ".csv.bz2", ".csv.zst"])
def test_compressed_csv_reads_like_the_plain_file(cache: Path, tmp_path: Path, suffix: str) -> None:
    packed = prepare(write_csv(tmp_path / "toy", suffix=suffix), "csv", tmp_path / "data")
    plain = load_prepared(cache)
    assert packed.vocab_sizes == plain.vocab_sizes
    for split in ("train", "val", "test"):
        assert np.array_equal(getattr(packed, split).ids, getattr(plain, split).ids)
    assert load_vocab(tmp_path / "data")["vocab"] == load_vocab(cache)["vocab"]


def test_compressed_file_without_its_extension_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = write_csv(tmp_path / "toy", suffix=".csv.gz")
    for split in ("train", "val", "test"):
        os.rename(f"{prefix}_{split}.csv.gz", f"{prefix}_{split}.csv")
    args = ["retrain", *data_args(prefix), "--uniform-dim", "2", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    assert one_error_line(capsys) == (
        f"error: {prefix}_train.csv: looks gzip-compressed but its name does not say so; name it with "
        "the codec's extension (.gz, .bz2, .zst) or decompress it"
    )


def test_nan_float_ids_are_missing_like_nulls(tmp_path: Path) -> None:
    assert as_tokens(pa.array([1.0, float("nan"), None, 2.5])).to_pylist() == ["1", MISSING, MISSING, "2.5"]
    rng = np.random.default_rng(1)
    for split in ("train", "val", "test"):
        ids = rng.integers(0, 3, 300).astype(float)
        mask = rng.random(300)
        ids[mask < 0.2] = np.nan
        col = pa.array(ids, mask=mask > 0.9)  # some nulls on top of the NaNs
        pq.write_table(
            pa.table({"x": col, "label": rng.integers(0, 2, 300)}), tmp_path / f"t_{split}.parquet"
        )
    data = prepare(str(tmp_path / "t"), "parquet", tmp_path / "data")
    assert sorted(load_vocab(tmp_path / "data")["vocab"]["x"]) == sorted(["0", "1", "2", MISSING])
    assert data.vocab_sizes == [5]


def test_retrain_progress_bar_only_on_a_terminal(
    csv_prefix: str, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["retrain", *data_args(csv_prefix), "--set", f"data.cache_dir={cache}", "--uniform-dim", "2"]
    assert main([*args, "--out", str(tmp_path / "r"), "--epochs", "1", "--set", "train.max_steps=5"]) == 0
    err = capsys.readouterr().err
    assert "retrain epoch" not in err and "it/s" not in err, err


def test_a_ctrl_c_that_dcp_wrapped_in_its_save_is_still_an_interrupt() -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    from torchrec_dimgrow.diskwrite import was_interrupted

    wrapped = CheckpointException("save failed", {0: (KeyboardInterrupt(), None)})
    assert was_interrupted(wrapped)
    assert not was_interrupted(CheckpointException("save failed", {1: (OSError("boom"), None)}))
    assert not was_interrupted(RuntimeError("unrelated"))
