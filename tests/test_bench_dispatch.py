"""``python -m torchrec_dimgrow bench NAME`` dispatches to every script of ``benchmarks/``."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchrec_dimgrow.cli import bench_names, main

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_every_benchmark_script_is_a_bench_name() -> None:
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_")}
    assert set(bench_names()) == scripts
    assert {"scale", "ranks", "coldstart", "sync_check", "suite", "memory"} <= scripts


def test_bench_runs_the_script_with_its_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse's --help exits 0 after printing usage
        main(["bench", "sync_check", "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_benchmark_is_one_line_naming_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'nosuch'" in err[0] and "scale" in err[0], err
