"""One configuration system: flags, ``--set``, config files and ``--print-config`` agree with
the dataclasses, and a run's config.json reruns it exactly."""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from torchrec_dimgrow.cli import FLAGS, build_parser, main
from torchrec_dimgrow.config import PRESETS, RETIRED, DimGrowConfig, TrainConfig
from torchrec_dimgrow.data import prepare
from torchrec_dimgrow.runconfig import SearchRunConfig, StreamConfig, build, keys

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO = str(DATA / "criteo" / "criteo_head8k")
BASE = ["search", "--data", CRITEO, "--format", "criteo", "--out", "OUT"]


def subparser(command: str) -> argparse.ArgumentParser:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def printed(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert main([*args, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_search_has_at_most_15_flags_and_every_flag_default_is_the_dataclass_default() -> None:
    flags = [
        s
        for a in subparser("search")._actions
        for s in a.option_strings
        if s.startswith("--") and s != "--help"
    ]
    assert len(flags) <= 15 and "--stream" in flags, flags  # first-class flags, -h/--help excluded
    for command, (cls, valued, switches) in FLAGS.items():
        fresh = cls()  # the defaults as the dataclasses have them
        built = build(cls, {})
        assert built == fresh, command
        parser = subparser(command)
        for flag, key, _ in [*valued, *switches]:
            assert key in keys(cls), (command, flag, key)
            action = next(a for a in parser._actions if flag in a.option_strings)
            assert action.default is argparse.SUPPRESS, f"{command} {flag} retypes a default"
            section, name = key.split(".")
            default = getattr(getattr(fresh, section), name)
            assert getattr(getattr(built, section), name) == default
            if default not in (None, "", False):
                assert f"default {default}" in (action.help or ""), (flag, action.help)


@pytest.mark.parametrize(
    ("setting", "section", "name", "value"),
    [
        ("data.min_count=5", "data", "min_count", 5),
        ("data.drop_cols=C1,C2", "data", "drop_cols", ["C1", "C2"]),
        ("train.early_stop_patience=3", "train", "early_stop_patience", 3),
        ("train.hidden=32,8", "train", "hidden", [32, 8]),
        ("dimgrow.gate_lr=0.01", "dimgrow", "gate_lr", 0.01),
        ("dimgrow.initial_dim=block", "dimgrow", "initial_dim", None),
        ("dimgrow.preset=paper", "dimgrow", "preset", "paper"),
        ("planning.sharding=row_wise", "planning", "sharding", "row_wise"),
        ("planning.keep_placement=false", "planning", "keep_placement", False),
        ("run.log_every=7", "run", "log_every", 7),
        ("run.tensorboard=tb", "run", "tensorboard", "tb"),
        ("stream.publish_every=7", "stream", "publish_every", 7),
        ("stream.keep_versions=2", "stream", "keep_versions", 2),
        ("stream.settle_steps=none", "stream", "settle_steps", None),
        ("stream.serving=int8", "stream", "serving", "int8"),
    ],
)
def test_set_maps_onto_the_dataclass_field(
    capsys: pytest.CaptureFixture[str], setting: str, section: str, name: str, value: object
) -> None:
    assert printed(capsys, *BASE, "--set", setting)[section][name] == value


def test_set_reaches_retrain_and_baseline_sections(capsys: pytest.CaptureFixture[str]) -> None:
    retrain = printed(
        capsys, "retrain", "--uniform-dim", "2", "--set", "train.lr=0.01", "--set", "data.min_count=3"
    )
    assert (retrain["train"]["lr"], retrain["data"]["min_count"], retrain["train"]["epochs"]) == (0.01, 3, 20)
    base = printed(
        capsys, "baseline", "--method", "sseds", "--set", "run.local=true", "--set", "method.arch_x=0.5"
    )
    assert base["run"]["local"] is True and base["method"] == {"arch_x": 0.5}


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--set", "dimgrow.gate_lrr=0.1"], "error: unknown setting 'dimgrow.gate_lrr' (did you mean dimgrow.gate_lr?)"),
        (["--set", "nosuch.key=1"], "error: unknown setting 'nosuch.key' (sections: data, train, dimgrow, planning, run, blocks, stream)"),
        (["--set", "dimgrow.gate_lr=fast"], "error: --set dimgrow.gate_lr: expected a float, got 'fast'"),
        (["--set", "train.epochs=1.5"], "error: --set train.epochs: expected an int, got '1.5'"),
        (["--set", "run.quiet=maybe"], "error: --set run.quiet: expected a bool (true/false), got 'maybe'"),
        (["--set", "dimgrow.preset=papre"], "error: --set dimgrow.preset: expected one of ['dimgrow', 'paper'], got 'papre'"),
        (["--set", "dimgrow.penalty_mode=fixed"], "error: --set dimgrow.penalty_mode: penalty_mode = 'fixed' is no longer a setting (it is 'auto' now; dimgrow.preset = \"paper\" has it)"),
        (["--set", "dimgrow.grow_patience=3"], "error: --set dimgrow.grow_patience: grow_patience = '3' is no longer a setting (it is 1 now; see benchmarks/ablations.md, \"Settings that were removed\")"),
        (["--set", "gate_lr=0.1"], "error: unknown setting 'gate_lr' (sections: data, train, dimgrow, planning, run, blocks, stream)"),
        (["--set", "planning.batch_size=8"], "error: --set planning.batch_size: planning.batch_size follows train.batch_size; set that instead"),
        (["--epochs", "ten"], "error: --epochs: expected an int, got 'ten'"),
        (["--set", "dimgrow.tau=0"], "error: dimgrow.tau must be > 0, got 0"),
        (["--stream", "--set", "stream.publish_every=0"], "error: stream.publish_every must be >= 1, got 0"),
        (["--set", "stream.keep_versions=0"], "error: stream.keep_versions must be >= 1, got 0"),
        (["--set", "stream.serving=int2"], "error: --set stream.serving: expected one of ['fp32', 'fp16', 'int8', 'int4'], got 'int2'"),
        (["--stream", "--set", "run.votes=3"], "error: --stream publishes one run's versions; it does not take run.votes > 1"),
    ],
)  # fmt: skip
def test_bad_setting_is_one_error_line_naming_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], expect: str
) -> None:
    out = tmp_path / "out"
    assert main(["search", "--data", CRITEO, "--format", "criteo", "--out", str(out), *args]) == 2
    assert one_error_line(capsys) == expect
    assert not out.exists()


def test_bad_config_file_is_one_error_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "run.toml"
    bad.write_text("[dimgrow]\ngate_lr = 0.01\nd_maxx = 8\n")
    assert main([*BASE, "--config", str(bad)]) == 2
    assert (
        one_error_line(capsys)
        == f"error: {bad}: dimgrow.d_maxx: unknown setting (did you mean dimgrow.d_max?)"
    )
    bad.write_text("[dimgrow\n")
    assert main([*BASE, "--config", str(bad)]) == 2
    assert one_error_line(capsys).startswith(f"error: --config {bad}: ")
    flat = tmp_path / "run.json"
    flat.write_text('{"gate_lr": 0.01}')
    assert main([*BASE, "--config", str(flat)]) == 2
    assert "top-level key 'gate_lr' must be a section table" in one_error_line(capsys)


def test_print_config_fed_back_gives_the_same_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    first = printed(capsys, *BASE, "--budget", "48MiB", "--set", "dimgrow.preset=paper",
                    "--set", "train.max_steps=9", "--set", "dimgrow.initial_dim=block")  # fmt: skip
    file = tmp_path / "run.json"
    file.write_text(json.dumps(first))
    assert printed(capsys, "search", "--config", str(file)) == first
    # a TOML file with a few keys; flags beat --set, which beats the file
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[train]\nepochs = 3\nseed = 4\n[dimgrow]\ngate_lr = 0.01\n[data]\npath = "p"\nformat = "csv"\n'
    )
    got = printed(capsys, "search", "--config", str(toml), "--set", "train.seed=5", "--epochs", "6")
    assert (got["train"]["epochs"], got["train"]["seed"], got["dimgrow"]["gate_lr"]) == (6, 5, 0.01)
    assert got["data"] == {**first["data"], "path": "p", "format": "csv"}


@pytest.mark.parametrize("preset", ["dimgrow", "paper"])
def test_alpha_default_is_resolved_in_one_place(capsys: pytest.CaptureFixture[str], preset: str) -> None:
    resolved = printed(capsys, *BASE, "--set", f"dimgrow.preset={preset}")["dimgrow"]["alpha"]
    assert DimGrowConfig(preset=preset).alpha == resolved == (0.1 if preset == "dimgrow" else 0.01)  # type: ignore[arg-type]
    assert DimGrowConfig(preset=preset, alpha=0.5).alpha == 0.5  # type: ignore[arg-type]


def test_an_older_config_file_with_removed_settings_still_reads(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A config.json written before settings were removed records them all: each one that
    holds the value the search now uses is dropped; one that would change the search is refused."""
    current = printed(capsys, *BASE)
    older = {**current["dimgrow"], **RETIRED, **asdict(PRESETS["dimgrow"])}
    older.pop("preset")
    file = tmp_path / "old.json"
    file.write_text(json.dumps({**current, "dimgrow": older}))
    assert printed(capsys, "search", "--config", str(file)) == current
    file.write_text(json.dumps({**current, "dimgrow": {**older, "budget_pressure": 2.0}}))
    assert main(["search", "--config", str(file), "--print-config"]) == 2
    assert "budget_pressure = 2.0 is no longer a setting (it is 0.0 now" in one_error_line(capsys)
    paper = {**current["dimgrow"], **asdict(PRESETS["paper"]), "preset": "paper"}
    file.write_text(json.dumps({**current, "dimgrow": paper}))
    assert printed(capsys, "search", "--config", str(file))["dimgrow"]["preset"] == "paper"
    assert DimGrowConfig.from_dict({"alpha": 0.2, "shrink_slot": "last", "preset": "paper"}).alpha == 0.2
    with pytest.raises(ValueError, match="shrink_slot = 'last' is no longer a setting"):
        DimGrowConfig.from_dict({"shrink_slot": "last"})


def test_stream_is_one_flag_and_a_section(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert printed(capsys, *BASE)["stream"]["enabled"] is False
    got = printed(capsys, *BASE, "--stream", "--set", "stream.publish_every=5")["stream"]
    assert (got["enabled"], got["publish_every"], got["keep_versions"]) == (True, 5, 3)
    toml = tmp_path / "run.toml"
    toml.write_text("[stream]\nenabled = true\nkeep_versions = 4\nwindow_rows = 512\n")
    got = printed(capsys, *BASE, "--config", str(toml))["stream"]
    assert (got["enabled"], got["keep_versions"], got["window_rows"]) == (True, 4, 512)


def test_range_checks_live_with_the_dataclasses() -> None:
    from torchrec_dimgrow.errors import UsageError

    for cls in (DimGrowConfig, TrainConfig, StreamConfig):
        assert set(cls.BOUNDS) <= {f.name for f in fields(cls)}, cls
    with pytest.raises(UsageError, match=r"dimgrow\.d_max must be in \[1, 256\], got 300"):
        DimGrowConfig(d_max=300).check()
    with pytest.raises(UsageError, match=r"train\.lr must be > 0"):
        TrainConfig(lr=0.0).check()
    with pytest.raises(UsageError, match=r"stream\.window_rows must be >= 1, got 0"):
        StreamConfig(window_rows=0)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("prepared") / "data"
    prepare(CRITEO, "criteo", path)
    return path


def test_a_search_rerun_from_its_config_json_is_identical(cache: Path, tmp_path: Path) -> None:
    first, again = tmp_path / "first", tmp_path / "again"
    args = ["search", "--data", CRITEO, "--format", "criteo", "--out", str(first), "--batch-size", "64",
            "--epochs", "2", "--quiet", "--set", f"data.cache_dir={cache}", "--set", "train.max_steps=30",
            "--set", "dimgrow.grow_threshold=0.5005", "--set", "run.log_every=5", "--seed", "3"]  # fmt: skip
    assert main(args) == 0
    config = json.loads((first / "config.json").read_text())
    assert config["run"]["out"] == str(first.resolve()) and config["dimgrow"]["alpha"] == 0.1
    assert build(SearchRunConfig, {}).run.resume is None
    assert main(["search", "--config", str(first / "config.json"), "--out", str(again)]) == 0
    for name in ("dims.json", "trajectory.csv", "gates.json"):
        assert (again / name).read_text() == (first / name).read_text(), name
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (first, again))
    assert m1["history"] == m2["history"] and m1["steps"] == m2["steps"] == 30
    assert len(list(csv.DictReader((first / "trajectory.csv").open()))) > 39, "trajectory rows every 5 steps"
    rerun = json.loads((again / "config.json").read_text())
    assert {**rerun, "run": {**rerun["run"], "out": None}} == {
        **config,
        "run": {**config["run"], "out": None},
    }
    # the run's own config.json resumes it (every key matches the checkpoint's settings) ...
    assert (
        main(["search", "--config", str(first / "config.json"), "--resume", str(first), "--out", str(first)])
        == 0
    )
    assert (first / "dims.json").read_text() == (again / "dims.json").read_text()


def test_resume_compares_the_data_path_as_the_file_it_names() -> None:
    import os

    from torchrec_dimgrow.errors import UsageError
    from torchrec_dimgrow.recipes.resume import adopt_saved

    cfg = build(SearchRunConfig, {"data.path": ("--data", CRITEO), "dimgrow.gate_lr": ("--set", "0.01")})
    saved = {
        "data.path": os.path.relpath(CRITEO),
        "dimgrow.gate_lr": 0.001,
        "dimgrow.preset": "dimgrow",
    }  # as typed then
    with pytest.raises(
        UsageError, match=r"^dimgrow\.gate_lr 0\.01 contradicts the checkpoint's dimgrow\.gate_lr 0\.001"
    ):
        adopt_saved(cfg, saved, explicit={"data.path", "dimgrow.gate_lr"})
    assert adopt_saved(cfg, saved, explicit={"data.path"}).dimgrow.gate_lr == 0.001


def test_the_example_config_file_reads(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "search.toml"
    got = printed(capsys, "search", "--config", str(example), "--set", "dimgrow.gate_lr=0.003")
    assert (got["train"]["epochs"], got["train"]["batch_size"], got["dimgrow"]["alpha"]) == (20, 64, 0.1)
    assert got["dimgrow"]["gate_lr"] == 0.003 and got["run"]["quiet"] is True
