"""Configuration dataclasses.

Every default below comes from the DimGrow authors' public research code (see
``docs``/README "Method" section) unless a docstring says why it differs.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

from torchrec_dimgrow.bounds import AT_LEAST_1, MAX_DIM, NON_NEGATIVE, POSITIVE, Bound, check_bounds

AlignMode = Literal["raw", "pad", "project"]
ShrinkSlot = Literal["lowest", "last"]
PenaltyMode = Literal["auto", "fixed"]
PenaltyWeighting = Literal["bytes", "uniform"]
EvalMixing = Literal["mean", "shuffle", "off"]
Preset = Literal["dimgrow", "paper"]


@dataclass(frozen=True)
class SearchRule:
    """The parts of the search rule a preset fixes (see :data:`PRESETS`).

    They are not settings of their own: each one was measured against the reference's
    choice (benchmarks/ablations.md), and a user who wants the reference's rule wants all of
    them at once, which ``dimgrow.preset = "paper"`` gives.

    Attributes:
        penalty_mode: ``"fixed"`` uses ``alpha`` as the coefficient of ``mean_active(g / k)``
            (the authors' form). ``"auto"`` scales the coefficient every gate step so that
            the penalty's pull on a slot-k gate equals ``alpha / k`` times the average
            consistent task pull on the active gates: the same ``alpha`` then means the same
            relative bar on any dataset.
        penalty_weighting: ``"uniform"`` charges every (field, slot) the same, as the
            authors do. ``"bytes"`` charges a slot of table ``t`` in proportion to its row
            count, normalised so the mean weight over the active slots is 1: the same
            ``alpha`` then removes bytes, not dimensions. On MovieLens-100k this keeps the
            cheap user attributes the uniform penalty drops, and retrains better at fewer
            bytes (benchmarks/ablations.md, "Penalty weighting and alpha").
        grow_price_exponent: lowers the growth bar of cheap tables. A table's bar is
            ``final_threshold + (grow_threshold - final_threshold) * min(1, w) ** exponent``,
            ``w`` its bytes per dim over the mean of the active slots' (the weights of the
            bytes penalty): a 3-row table's next dim is nearly free, so a little evidence
            that it helps is enough. ``0``: the paper's one bar. Measured over 5 search
            seeds: MovieLens-100k at budget 0.2 moves from -0.0017 to +0.0014 AUC over the
            uniform curve, the Criteo-shaped data from +0.0040 to +0.0024; the worst margin
            over the datasets rises from -0.0017 to -0.0003.
        cap_dims_at_rows: a table never grows past its row count (``"raw"`` and
            ``"project"`` mode): the columns of an ``n``-row table span at most ``n``
            dimensions and what reads them is linear, so dims beyond ``n`` add parameters
            but no function. Measured over 5 search seeds ("Row cap: before and after"):
            MovieLens-100k +0.0014/-0.0003 -> +0.0016/+0.0000 at budgets 0.2/0.3, the
            Criteo-shaped data +0.0024 -> +0.0032 with 37% fewer bytes. ``"pad"`` mode is
            never capped: there the coordinates are shared with the other fields.
        shrink_slot: ``"lowest"`` drops the slot whose gate is lowest (its column is
            replaced by the last active column, so storage stays a prefix); ``"last"``
            drops the highest slot as the reference does, so a dead middle slot keeps the
            field shrinking, removing live slots one after another.
        eval_mixing: what the gates do in ``eval()``: ``"mean"`` mixes with the batch mean
            (the expectation of the shuffled copy: deterministic), ``"shuffle"`` keeps the
            training-time shuffle (the reference evaluates this way).
        max_total_dim: cap on the sum of logical dims (the reference: 1000; a byte
            ``budget`` is the cap this package offers).
    """

    penalty_mode: PenaltyMode
    penalty_weighting: PenaltyWeighting
    grow_price_exponent: float
    cap_dims_at_rows: bool
    shrink_slot: ShrinkSlot
    eval_mixing: EvalMixing
    max_total_dim: int


PRESETS: dict[str, SearchRule] = {
    "dimgrow": SearchRule("auto", "bytes", 1.0, True, "lowest", "mean", 1_000_000),
    "paper": SearchRule("fixed", "uniform", 0.0, False, "last", "shuffle", 1000),
}
"""``dimgrow``: this package's rule (the default). ``paper``: the authors' public code."""

RETIRED: dict[str, Any] = {
    "theta_init": 0.0,
    "auto_ema": 0.99,
    "grow_patience": 1,
    "shrink_patience": 1,
    "budget_pressure": 0.0,
    "final_gates": "step",
}
"""Settings that no longer exist, with the value the search now always uses.

Each one lost on every dataset it was measured on or was never moved from the reference's
value (benchmarks/ablations.md, "Settings that were removed"). A config file or checkpoint
that names one is read when it holds this value, and refused otherwise."""


def is_retired(name: str) -> bool:
    """Whether ``name`` is a removed ``DimGrowConfig`` setting (fixed, or fixed by the preset)."""
    return name in RETIRED or name in SearchRule.__dataclass_fields__


def retired_value(name: str, preset: str) -> Any:
    """What a removed setting ``name`` is under ``preset`` (KeyError: not a removed one)."""
    return RETIRED[name] if name in RETIRED else getattr(PRESETS[preset], name)


@dataclass
class DimGrowConfig:
    """Knobs of the DimGrow search (one instance per collection).

    Attributes:
        preset: ``"dimgrow"`` (default) or ``"paper"``: the rule's fixed parts
            (:class:`SearchRule`). ``"paper"`` reproduces the authors' code: a fixed
            penalty with ML-1M's ``alpha`` (unless given), uniform over slots, one growth
            bar, no row cap, the last slot shrinks, shuffled evaluation, 1000 dims at most.
        d_max: most dimensions any field may reach (slots 1..d_max carry a gate each).
        initial_dim: logical dim every field starts with (default 1, the paper's). ``None``:
            the columns a field's storage block holds anyway (``capacity_block``, capped by
            ``d_max`` and, under a ``budget``, lowered until every field fits); the fused
            kernel stores 4 columns anyway, so it costs no memory during the search. Measured
            on MovieLens-100k, the Criteo-shaped, planted-hub and interaction-only data with 3
            search seeds each (benchmarks/ablations.md, "Starting at the storage block"): the block start
            gives interaction-only data a better search model and cuts the seed spread of the
            found dims on MovieLens-100k, but on the Criteo-shaped data, the least noisy of
            them, dim 1 buys clearly more AUC per byte, and in the DLRM single-loader mode the
            block start barely prunes. So the paper's start stays the default.
        tau: gate temperature, ``g = sigmoid(tau * theta)``; gates start at ``g = 0.5``.
        grow_threshold: a field grows when *all* its active gates exceed this at a check
            (its cheap tables' bar is lower: :attr:`SearchRule.grow_price_exponent`). The
            reference's "consistency" comes implicitly from the ~80 Adam steps a fresh gate
            needs to climb from 0.5 to 0.6; a patience of more checks under-grew
            (benchmarks/ablations.md).
        shrink_threshold: a field shrinks when its lowest active gate falls below this.
        check_interval: training steps between two grow/shrink checks.
        gate_every: the gate step (DARTS validation step, or the single-loader gate update)
            runs on every ``gate_every``-th training step only, and so do the importance
            record and the check that read its result; the steps in between train the
            model alone. ``k`` > 1 cuts the search's extra forward/backward to 1/k of the
            steps; the gates then move k times less often at the same ``gate_lr``. A check
            runs on the first gate step at or after each multiple of ``check_interval``.
        final_threshold: a slot counts in the exported dim when its gate exceeds this, read
            once at the end of the best-validation epoch (the authors' checkpoint rule).
        capacity_block: physical widths move in blocks of this many columns (FBGEMM's
            fused TBE kernel needs every local shard width to be a multiple of 4).
        capacity_slack_blocks: a table gives back storage only when it holds more than
            this many spare blocks, so a field oscillating around a block edge does not
            reallocate at every check.
        init_std: std of the N(0, std) init of new embedding columns and projection rows.
        alpha: the penalty knob (see :attr:`SearchRule.penalty_mode`). The authors' fixed
            values, in this package's units (their 0.1 * alpha_dataset): ML-1M 0.01, Criteo
            0.002, Avazu 0.0005, Ali-CCP 0.000125. ``None`` (default) resolves by the preset
            when the config is built: 0.1 for ``"dimgrow"`` (auto penalty), 0.01 (ML-1M's)
            for ``"paper"``; the instance then holds (and records) the resolved value.
        gate_lr: Adam learning rate of the gate logits (updated on validation batches).
        budget: memory budget of the collection's tables, as stored: a value in (0, 1] is a
            fraction of the ``d_max`` model's bytes, a value > 1 is bytes (see
            :func:`parse_budget` for ``"48MiB"``-style strings). Bytes count rows x logical
            dim x bytes per value of each table's data type, the figure ``metrics.json``
            reports. The search admits a growth only while it fits; when the budget binds,
            :func:`~torchrec_dimgrow.policy.decide` grows the fields with the most gate
            importance per byte first and may release a weak slot of a field elsewhere.
            The penalty alone decides how much of it is spent. ``None`` (default): no cap.
    """

    preset: Preset = "dimgrow"
    d_max: int = 16
    initial_dim: int | None = 1
    tau: float = 5.0
    grow_threshold: float = 0.6
    shrink_threshold: float = 0.01
    check_interval: int = 1
    gate_every: int = 1
    final_threshold: float = 0.5
    capacity_block: int = 4
    capacity_slack_blocks: int = 1
    init_std: float = 0.01
    alpha: float | None = None
    gate_lr: float = 1e-3
    budget: float | None = None

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "d_max": Bound(1, MAX_DIM),
        "initial_dim": Bound(1, MAX_DIM),  # None = the storage block
        "alpha": NON_NEGATIVE,
        "gate_lr": POSITIVE,
        "check_interval": AT_LEAST_1,
        "gate_every": AT_LEAST_1,
        "grow_threshold": Bound(0, 1, low_open=True),
        "shrink_threshold": Bound(0, 1, high_open=True),
        "tau": POSITIVE,
        "capacity_block": AT_LEAST_1,
        "capacity_slack_blocks": NON_NEGATIVE,
    }
    """Ranges a run accepts (:meth:`check`); stricter than :meth:`validate` (``d_max`` <= 256)."""
    BELOW: ClassVar[tuple[tuple[str, str], ...]] = (("shrink_threshold", "grow_threshold"),)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:  # before the alpha default, which the preset decides
            raise ValueError(f"DimGrowConfig: unknown preset {self.preset!r} (one of {sorted(PRESETS)})")
        self.alpha = self.penalty_alpha  # recorded resolved: a resume compares the value used
        self.validate()

    @property
    def rule(self) -> SearchRule:
        """The fixed parts of the rule, by :attr:`preset`."""
        return PRESETS[self.preset]

    @property
    def penalty_alpha(self) -> float:
        """``alpha``, or where it is ``None`` the default of the preset's penalty (the one
        place that default lives): 0.1 for the auto penalty, 0.01 for the fixed one."""
        if self.alpha is not None:
            return self.alpha
        return 0.1 if self.rule.penalty_mode == "auto" else 0.01

    def check(self, section: str = "dimgrow") -> None:
        """The ranges of :attr:`BOUNDS`, as a run checks them (one line naming the setting)."""
        check_bounds(asdict(self), self.BOUNDS, section, self.BELOW)

    def validate(self) -> None:
        """Reject inconsistent settings early, with the field name in the message."""
        checks: list[tuple[bool, str]] = [
            (self.d_max >= 1, f"d_max must be >= 1, got {self.d_max}"),
            (
                self.initial_dim is None or 1 <= self.initial_dim <= self.d_max,
                f"initial_dim must be in [1, d_max={self.d_max}], got {self.initial_dim}",
            ),
            (self.tau > 0, f"tau must be > 0, got {self.tau}"),
            (
                0.0 <= self.shrink_threshold < self.grow_threshold <= 1.0,
                "need 0 <= shrink_threshold < grow_threshold <= 1, got "
                f"{self.shrink_threshold} and {self.grow_threshold}",
            ),
            (self.check_interval >= 1, f"check_interval must be >= 1, got {self.check_interval}"),
            (self.gate_every >= 1, f"gate_every must be >= 1, got {self.gate_every}"),
            (
                self.capacity_block >= 1,
                f"capacity_block must be >= 1, got {self.capacity_block}",
            ),
            (self.capacity_slack_blocks >= 0, "capacity_slack_blocks must be >= 0"),
            (self.alpha is not None and self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (
                self.budget is None or self.budget > 0,
                f"budget must be > 0 (a fraction in (0, 1] or bytes > 1), got {self.budget}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DimGrowConfig: {message}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DimGrowConfig:
        """A config from its dict; a removed setting is dropped if it holds the value the
        search now uses (:func:`drop_retired`), an unknown key is refused."""
        values = drop_retired(values, "DimGrowConfig")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"DimGrowConfig: unknown keys {unknown}")
        return cls(**values)


def drop_retired(values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` without the removed settings; one that differs from what the search now
    uses (under the preset ``values`` names) raises ``ValueError`` naming it."""
    preset = str(values.get("preset", "dimgrow"))
    out = {}
    for name, value in values.items():
        if not is_retired(name):
            out[name] = value
            continue
        now = retired_value(name, preset if preset in PRESETS else "dimgrow")
        if _same(value, now):
            continue
        having = [p for p in PRESETS if name not in RETIRED and _same(value, retired_value(name, p))]
        hint = (
            f'dimgrow.preset = "{having[0]}" has it'
            if having
            else 'see benchmarks/ablations.md, "Settings that were removed"'
        )
        raise ValueError(f"{where}: {name} = {value!r} is no longer a setting (it is {now!r} now; {hint})")
    return out


def _same(value: Any, now: Any) -> bool:
    """``value`` (as a config file or ``--set`` gives it) equals ``now``."""
    if isinstance(now, bool):
        return str(value).lower() in (("true", "1", "yes") if now else ("false", "0", "no"))
    if isinstance(now, (int, float)):
        try:
            return float(value) == float(now)
        except (TypeError, ValueError):
            return False
    return str(value) == str(now)


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_budget(text: str | float) -> float:
    """``"48MiB"``, ``"2.5GB"``, ``"1000000"`` (bytes) or ``"0.3"`` (fraction) -> config value.

    A number without a unit is a fraction of the ``d_max`` model when it lies in (0, 1] and
    bytes when it is larger, the convention of :attr:`DimGrowConfig.budget`; with a unit it
    is always bytes. Why not a separate flag per form: one flag keeps the two forms from
    being given together, and a fraction above 1 would be meaningless anyway.
    """
    raw = str(text).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)", raw)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"budget: cannot read {raw!r}; give bytes with a unit (48MiB, 2.5GB, 1000000) "
            "or a fraction of the d_max model in (0, 1] (0.3)"
        )
    value = float(m.group(1))
    if value <= 0:
        raise ValueError(f"budget: must be > 0, got {raw!r}")
    if m.group(2):
        n_bytes = int(value * _UNITS[unit])
        if n_bytes <= 1:
            raise ValueError(f"budget: {raw!r} is {n_bytes} bytes, too small for any table")
        return float(n_bytes)
    if value > 1 and value != int(value):
        raise ValueError(
            f"budget: {raw!r} is neither a fraction of the d_max model in (0, 1] nor a whole "
            "number of bytes; for bytes with a fraction give a unit (2.5MB)"
        )
    return value if value <= 1 else float(int(value))


@dataclass
class TrainConfig:
    """Optimisation settings of the search and retrain recipes."""

    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    embedding_optimizer: Literal["adagrad", "rowwise_adagrad", "sgd", "adam"] = "adagrad"
    embedding_lr: float = 0.05
    early_stop_patience: int = 2
    seed: int = 0
    hidden: list[int] = field(default_factory=lambda: [64, 32, 16])
    adapter_dim: int = 64
    dropout: float = 0.2
    max_steps: int | None = None

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "epochs": AT_LEAST_1,
        "batch_size": AT_LEAST_1,
        "seed": Bound(0, 2**32 - 1),  # numpy's seed range
        "lr": POSITIVE,
        "embedding_lr": POSITIVE,
        "early_stop_patience": AT_LEAST_1,
        "adapter_dim": AT_LEAST_1,
        "dropout": Bound(0, 1, high_open=True),
        "max_steps": AT_LEAST_1,
    }
    """Ranges a run accepts (:meth:`check`)."""
    BELOW: ClassVar[tuple[tuple[str, str], ...]] = ()

    def check(self, section: str = "train") -> None:
        """The ranges of :attr:`BOUNDS` (one line naming the setting)."""
        check_bounds(asdict(self), self.BOUNDS, section)


ServingPrecision = Literal["fp32", "fp16", "int8", "int4"]


@dataclass
class StreamConfig:
    """``stream`` section of a search: online DimGrow (:mod:`torchrec_dimgrow.recipes.stream`).

    ``enabled`` (the ``--stream`` flag): one in-order pass over the train split that
    publishes serving versions to ``OUT/versions`` instead of an epoch search;
    ``publish_every``: steps between versions (each waits until the dims are settled);
    ``keep_versions``: versions kept on disk; ``window_rows``: rows of the sliding
    progressive-validation window; ``settle_steps``: steps without a grow, shrink or
    re-plan before a version is written (default: ``dimgrow.check_interval``); ``serving``:
    the published tables' precision. A stream reads ``train.max_steps`` (its length, default
    the whole split), ``run.log_every`` (window metrics every N steps) and
    ``run.checkpoint_every`` (default: ``publish_every``); it has no epochs or early stopping.
    """

    enabled: bool = False
    publish_every: int = 200
    keep_versions: int = 3
    window_rows: int = 10_000
    settle_steps: int | None = None
    serving: ServingPrecision = "fp32"

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "publish_every": AT_LEAST_1,
        "keep_versions": AT_LEAST_1,
        "window_rows": AT_LEAST_1,
        "settle_steps": NON_NEGATIVE,
    }

    def __post_init__(self) -> None:
        self.check()

    def check(self, section: str = "stream") -> None:
        check_bounds(vars(self), self.BOUNDS, section)
