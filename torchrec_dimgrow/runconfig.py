"""One configuration per command: sectioned dataclasses, config files and ``--set`` overrides.

A run's settings are one top-level dataclass (:class:`SearchRunConfig`, ...) whose fields
are sections: ``data`` (:class:`DataConfig`), ``train`` (:class:`~torchrec_dimgrow.config.TrainConfig`),
``dimgrow`` (:class:`~torchrec_dimgrow.config.DimGrowConfig`), ``planning``
(:class:`~torchrec_dimgrow.distributed.planning.PlanningConfig`), ``run`` (how the run
executes: output directory, logging, checkpoints) and, for a search, ``stream`` (online
DimGrow, :class:`StreamConfig`). Every setting is a key ``section.field``
(``dimgrow.gate_lr``); a config file (TOML or JSON) holds the same keys as nested tables,
``--set section.field=value`` overrides one, and the few first-class flags of the CLI map
onto keys too. Defaults come only from the dataclasses; :func:`dump` writes a config file
that :func:`load_file` reads back to the same configuration.
"""

from __future__ import annotations

import ast
import difflib
import json
import types
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

from torchrec_dimgrow.bounds import AT_LEAST_1, MAX_DIM, NON_NEGATIVE, Bound, check_bounds
from torchrec_dimgrow.config import (
    DimGrowConfig,
    StreamConfig,
    TrainConfig,
    drop_retired,
    is_retired,
    parse_budget,
)
from torchrec_dimgrow.data import FORMATS
from torchrec_dimgrow.data.blocks import BlockConfig
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.errors import UsageError

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


@dataclass
class DataConfig:
    """The data and how it is prepared (``data`` section).

    ``path``: file prefix, directory (MovieLens 100K/1M) or ``{split}`` pattern; ``format``:
    one of :data:`~torchrec_dimgrow.data.FORMATS`; ``label_col`` / ``drop_cols``: label and
    ignored columns (parquet/csv only); ``min_count``: ids seen fewer times share bucket 0;
    ``cache_dir``: where the prepared data goes (default ``OUT/data``).
    """

    path: str = ""
    format: str = ""
    label_col: str = "label"
    drop_cols: list[str] = field(default_factory=list)
    min_count: int = 2
    cache_dir: str | None = None

    BOUNDS: ClassVar[dict[str, Bound]] = {"min_count": AT_LEAST_1}

    def check(self, section: str = "data") -> None:
        check_bounds(vars(self), self.BOUNDS, section)
        if self.format and self.format not in FORMATS:
            raise UsageError(f"{section}.format must be one of {list(FORMATS)}, got {self.format!r}")

    def require(self) -> None:
        if not self.path or not self.format:
            raise UsageError("no data given: pass --data and --format (or data.path / data.format)")


@dataclass
class RunOptions:
    """How a run executes, not what it computes (``run`` section).

    ``out``: output directory; ``quiet``: only results, warnings and errors; ``log_level``:
    package log level (default INFO, WARNING with ``quiet``; ``$DIMGROW_LOG``); ``threads``:
    intra-op CPU threads (default ``$OMP_NUM_THREADS`` or 1: CTR-sized matmuls gain nothing
    from more, and on a busy machine spinning OpenMP threads cost 10-30x).
    """

    out: str | None = None
    quiet: bool = False
    log_level: LogLevel | None = None
    threads: int | None = None

    BOUNDS: ClassVar[dict[str, Bound]] = {"threads": Bound(1, 4096)}

    def check(self, section: str = "run") -> None:
        check_bounds(vars(self), self.BOUNDS, section)


@dataclass
class SearchRun(RunOptions):
    """``run`` section of a search: besides :class:`RunOptions`, ``resume`` (a run directory
    or its ``checkpoint/`` to continue), ``overwrite`` (replace a previous run in ``out``),
    ``backend`` (gloo/nccl; default by device), ``strict`` (exit 3 when no field is kept),
    ``votes`` (K searches with seeds ``seed .. seed+K-1``, each kept in ``OUT/votes/seed-N``;
    their per-field median dims are exported), ``log_every`` (trajectory rows every N
    steps), ``checkpoint_every`` (also checkpoint every N steps) and ``tensorboard`` (a log dir).
    """

    resume: str | None = None
    overwrite: bool = False
    backend: Literal["gloo", "nccl"] | None = None
    strict: bool = False
    votes: int = 1
    log_every: int = 50
    checkpoint_every: int = 0
    tensorboard: str | None = None

    BOUNDS: ClassVar[dict[str, Bound]] = {
        **RunOptions.BOUNDS,
        "votes": AT_LEAST_1,
        "log_every": NON_NEGATIVE,
        "checkpoint_every": NON_NEGATIVE,
    }


@dataclass
class RetrainRun(RunOptions):
    """``run`` section of a retrain: ``dims`` (a search's dims.json) or ``uniform_dim``;
    ``out`` defaults to ``DIMS_DIR/retrain``."""

    dims: str | None = None
    uniform_dim: int | None = None
    overwrite: bool = False

    BOUNDS: ClassVar[dict[str, Bound]] = {**RunOptions.BOUNDS, "uniform_dim": Bound(1, MAX_DIM)}

    def check(self, section: str = "run") -> None:
        super().check(section)
        if self.dims is not None and self.uniform_dim is not None:
            raise UsageError("give --dims or --uniform-dim, not both")


@dataclass
class BaselineRun(RunOptions):
    """``run`` section of a baseline: the ``method``, its SuperNet's ``d_max``, and ``local``
    (plain modules instead of a 1-rank DMP)."""

    method: str = ""
    d_max: int = 16
    local: bool = False

    BOUNDS: ClassVar[dict[str, Bound]] = {**RunOptions.BOUNDS, "d_max": Bound(1, MAX_DIM)}


@dataclass
class EvaluateRun:
    """``run`` section of evaluate: the saved ``model`` (a retrain ``--out`` or its model/)."""

    model: str = ""
    batch_size: int = 256

    BOUNDS: ClassVar[dict[str, Bound]] = {"batch_size": AT_LEAST_1}

    def check(self, section: str = "run") -> None:
        check_bounds(vars(self), self.BOUNDS, section)


@dataclass
class SearchRunConfig:
    """Everything a ``search`` run reads. ``planning.batch_size`` follows ``train.batch_size``."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dimgrow: DimGrowConfig = field(default_factory=DimGrowConfig)
    planning: PlanningConfig = field(default_factory=PlanningConfig)
    run: SearchRun = field(default_factory=SearchRun)
    blocks: BlockConfig = field(default_factory=BlockConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)

    DERIVED: ClassVar[dict[str, str]] = {"planning.batch_size": "train.batch_size"}


@dataclass
class RetrainRunConfig:
    """Everything a ``retrain`` run reads (it trains 20 epochs by default)."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20))
    run: RetrainRun = field(default_factory=RetrainRun)

    SECTION_DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {"train": {"epochs": 20}}


@dataclass
class BaselineRunConfig:
    """Everything a ``baseline`` run reads; ``method`` holds the method's config overrides
    (``--set method.KEY=VALUE``), checked by the baseline itself."""

    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: BaselineRun = field(default_factory=BaselineRun)
    method: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluateRunConfig:
    """Everything ``evaluate`` reads (the data options must match the model's training)."""

    data: DataConfig = field(default_factory=DataConfig)
    run: EvaluateRun = field(default_factory=EvaluateRun)


Settings = Mapping[str, tuple[str, Any]]
"""``{"section.field": (where, value)}``: ``where`` names the source in error messages."""


def section_types(cls: type) -> dict[str, Any]:
    """The sections of a top-level config class, in order: ``{name: dataclass or dict}``."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def field_defaults(cls: type, section: str) -> dict[str, Any]:
    """The default of every field of ``section`` in ``cls`` (after its section defaults)."""
    sec = section_types(cls)[section]
    values = {}
    for f in fields(sec):
        if f.default is not MISSING:
            values[f.name] = f.default
        elif f.default_factory is not MISSING:
            values[f.name] = f.default_factory()
    return {**values, **getattr(cls, "SECTION_DEFAULTS", {}).get(section, {})}


def default_of(cls: type, key: str) -> Any:
    """The default value of ``key`` as a built config of ``cls`` holds it."""
    section, name = key.split(".", 1)
    return getattr(getattr(build(cls, {}), section), name)


def keys(cls: type) -> list[str]:
    """Every settable key of ``cls`` (free-form sections excluded)."""
    derived = getattr(cls, "DERIVED", {})
    out = []
    for section, sec in section_types(cls).items():
        if is_dataclass(sec):
            out += [
                f"{section}.{f.name}" for f in fields(sec) if f.init and f"{section}.{f.name}" not in derived
            ]
    return out


def build(cls: type, settings: Settings) -> Any:
    """The config of ``cls`` from its defaults and ``settings``, range-checked.

    Raises one :class:`UsageError` naming the key for an unknown key, a value of the wrong
    type or out of range.
    """
    sections: dict[str, Any] = section_types(cls)
    known = keys(cls)
    derived = getattr(cls, "DERIVED", {})
    settings = _without_retired(settings)
    for key, (where, _) in settings.items():
        section = key.split(".", 1)[0]
        if "." not in key or section not in sections:
            raise UsageError(f"{_unknown(where, key)} (sections: {', '.join(sections)})")
        if key in derived:
            raise UsageError(f"{where}: {key} follows {derived[key]}; set that instead")
        if is_dataclass(sections[section]) and key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = (
                f"did you mean {close[0]}?" if close else f"{section} has {', '.join(_names(known, section))}"
            )
            raise UsageError(f"{_unknown(where, key)} ({hint})")
    built: dict[str, Any] = {}
    for section, sec in sections.items():  # sec: a dataclass, or dict for a free-form section
        given = {k.split(".", 1)[1]: v for k, v in settings.items() if k.split(".", 1)[0] == section}
        if not is_dataclass(sec):  # a free-form section, checked by its consumer
            built[section] = {name: _literal(v) for name, (_, v) in given.items()}
            continue
        make: Any = sec
        hints = get_type_hints(sec)
        values = dict(getattr(cls, "SECTION_DEFAULTS", {}).get(section, {}))
        for name, (where, value) in given.items():
            values[name] = coerce(value, hints[name], where, f"{section}.{name}")
        for key, source in derived.items():
            if key.split(".", 1)[0] == section:
                src_section, src_name = source.split(".", 1)
                values[key.split(".", 1)[1]] = getattr(built[src_section], src_name)
        check_bounds(
            {**field_defaults(cls, section), **values},
            getattr(sec, "BOUNDS", {}),
            section,
            getattr(sec, "BELOW", ()),
        )
        try:
            built[section] = make(**values)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{section}: {exc}") from exc
        check = getattr(built[section], "check", None)
        if check is not None:
            check(section)
    return cls(**built)


def _without_retired(settings: Settings) -> Settings:
    """``settings`` without the removed ``dimgrow`` settings that hold the value the search
    now uses (an older ``config.json`` records them all); one that holds another value is
    refused, naming it and where it came from."""
    preset = next((v for k, (_, v) in settings.items() if k == "dimgrow.preset"), "dimgrow")
    for key, (where, value) in settings.items():
        if _retired(key):
            try:
                drop_retired({"preset": preset, key.split(".", 1)[1]: value}, where)
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
    return {k: v for k, v in settings.items() if not _retired(k)}


def _retired(key: str) -> bool:
    section, _, name = key.partition(".")
    return section == "dimgrow" and is_retired(name)


def _unknown(where: str, key: str) -> str:
    return f"unknown setting {key!r}" if where.startswith("--set") else f"{where}: unknown setting"


def _names(known: Sequence[str], section: str) -> list[str]:
    return [k.split(".", 1)[1] for k in known if k.startswith(section + ".")]


def _literal(value: Any) -> Any:
    """A free-form ``--set`` value: ``3`` -> 3, ``true`` -> True, ``2,4`` -> (2, 4), else the text."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if "," in value:
        return tuple(_literal(t) for t in value.split(",") if t)
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def coerce(value: Any, hint: Any, where: str, key: str = "") -> Any:
    """``value`` (text from a flag or ``--set``, or a config file's value) as type ``hint``."""
    if key == "dimgrow.initial_dim" and value == "block":
        return None
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
        origin, args = get_origin(hint), get_args(hint)
    if key == "dimgrow.budget":
        try:
            return parse_budget(value)
        except ValueError as exc:
            raise UsageError(f"{where}: {str(exc).removeprefix('budget: ')}") from exc
    if origin is Literal:
        if value in args:
            return value
        raise UsageError(f"{where}: expected one of {list(args)}, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
    elif origin in (list, tuple):
        items = [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value
        if isinstance(items, (list, tuple)):
            coerced = [coerce(item, args[0], where) for item in items]
            return coerced if origin is list else tuple(coerced)
    else:
        return value
    name = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}.get(
        hint, str(hint)
    )
    raise UsageError(f"{where}: expected {name}, got {value!r}")


# ---------------------------------------------------------------- files and --set
def flatten(nested: Mapping[str, Any], where: str) -> dict[str, tuple[str, Any]]:
    """A config file's ``{section: {field: value}}`` -> settings ``{"section.field": ...}``."""
    out = {}
    for section, values in nested.items():
        if not isinstance(values, Mapping):
            raise UsageError(f"{where}: top-level key {section!r} must be a section table, got {values!r}")
        for name, value in values.items():
            out[f"{section}.{name}"] = (f"{where}: {section}.{name}", value)
    return out


def load_file(path: str | Path) -> dict[str, tuple[str, Any]]:
    """The settings of a ``.toml`` or ``.json`` config file (one error line if unreadable)."""
    path = Path(path)
    try:
        text = path.read_bytes()
        if path.suffix == ".toml":
            nested = _toml().loads(text.decode())
        elif path.suffix == ".json":
            nested = json.loads(text)
        else:
            raise UsageError(f"--config {path}: expected a .toml or .json file")
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise UsageError(f"--config {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(nested, dict):
        raise UsageError(f"--config {path}: expected sections of settings, got {type(nested).__name__}")
    return flatten(nested, str(path))


def settings_from_sets(items: Sequence[str]) -> dict[str, tuple[str, Any]]:
    """``--set section.field=value`` items -> settings (values stay text until coerced)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects section.key=value, got {item!r}")
        key, value = (t.strip() for t in item.split("=", 1))
        out[key] = (f"--set {key}", value)
    return out


def _toml() -> Any:
    try:
        import tomllib  # Python 3.11+
    except ImportError as exc:
        raise UsageError("a .toml config file needs Python 3.11+ (tomllib); give a .json file") from exc
    return tomllib


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Free-form ``key=value`` overrides (``3`` -> 3, ``true`` -> True, ``2,4`` -> (2, 4)),
    for scripts that pass them to a config class themselves."""
    return {key: _literal(value) for key, (_, value) in settings_from_sets(items).items()}


def to_nested(cfg: Any) -> dict[str, dict[str, Any]]:
    """``cfg`` as a config file's sections (derived keys left out), JSON-ready."""
    derived = getattr(cfg, "DERIVED", {})
    out: dict[str, dict[str, Any]] = {}
    for section in section_types(type(cfg)):
        value = getattr(cfg, section)
        if isinstance(value, dict):
            out[section] = {k: _jsonable(v) for k, v in value.items()}
            continue
        out[section] = {
            f.name: _jsonable(getattr(value, f.name))
            for f in fields(value)
            if f.init and f"{section}.{f.name}" not in derived
        }
    return out


def to_flat(cfg: Any) -> dict[str, Any]:
    """``cfg`` as ``{"section.field": value}`` (the form a checkpoint records)."""
    return {f"{s}.{k}": v for s, values in to_nested(cfg).items() for k, v in values.items()}


def from_flat(cls: type, flat: Mapping[str, Any]) -> Any:
    return build(cls, {k: (k, v) for k, v in flat.items()})


def dump(cfg: Any) -> str:
    """The config file (JSON) that :func:`load_file` reads back to ``cfg``."""
    return json.dumps(to_nested(cfg), indent=2) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
