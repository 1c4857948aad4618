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
FinalGates = Literal["epoch", "step"]


@dataclass
class DimGrowConfig:
    """Knobs of the DimGrow search (one instance per collection).

    Attributes:
        d_max: most dimensions any field may reach (slots 1..d_max carry a gate each).
        cap_dims_at_rows: a table never grows past its row count (in ``"raw"`` and
            ``"project"`` mode). Why: the columns of an ``n``-row table span at most ``n``
            dimensions, and what reads them is linear (the projection, or the first layer
            of the MLP that takes the concatenated widths), so dims beyond ``n`` add
            parameters but no function the model could not already express; the
            retrain's ``concat -> Linear`` model reads them the same way. Without the cap
            MovieLens-100k's 3-row ``gender`` reached 8 dims on some seeds and the
            Criteo-shaped data's 2-row fields up to 16: slots that only dilute the auto
            penalty's mean task pull. A
            budget given as a fraction still refers to the uncapped ``d_max`` model.
            Measured over 5 search seeds (benchmarks/ablations.md, "Row cap: before and after"):
            MovieLens-100k +0.0014/-0.0003 -> +0.0016/+0.0000 AUC over the uniform curve at
            budgets 0.2/0.3, the Criteo-shaped data +0.0024 -> +0.0032 with 37% fewer bytes
            and a third of the seed spread; tables of 16+ rows are untouched.
            ``"pad"`` mode (zero-padded, then e.g. DLRM's dot products) is never capped:
            there the coordinates are shared with the other fields, and the argument fails.
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
        tau: gate temperature, ``g = sigmoid(tau * theta)``.
        theta_init: initial gate logit (0 -> g = 0.5, the authors' value).
        grow_threshold: a field grows when *all* its active gates exceed this ...
        grow_patience: ... at this many consecutive checks. 1 reproduces the reference code,
            whose "consistency" comes implicitly from the ~80 Adam steps a fresh gate needs
            to climb from 0.5 to 0.6.
        grow_price_exponent: lowers the growth bar of cheap tables. A table's bar is
            ``final_threshold + (grow_threshold - final_threshold) * min(1, w) ** exponent``,
            ``w`` its bytes per dim over the mean of the active slots' (the weights of the
            bytes penalty): a 3-row table's next dim is nearly free, so a little evidence
            that it helps is enough, while tables dearer than the mean slot keep the
            paper's bar. ``0``: the paper's one bar for every table. Default 1 (linear in
            the price), measured over 5 search seeds: MovieLens-100k at budget 0.2 moves
            from -0.0017 to +0.0014 AUC over the uniform curve (0.3: -0.0003 both), the
            Criteo-shaped data from +0.0040 to +0.0024 (its 1-row tables grow for free,
            and the big ones spend 26% more bytes for no AUC), equal-sized tables (the
            planted and interaction-only data) are unchanged. The worst margin over the
            datasets rises from -0.0017 to -0.0003; the found dims move more between
            seeds (cheap tables' dims are cheap to vary).
        shrink_threshold: a field shrinks when its lowest active gate falls below this ...
        shrink_patience: ... at this many consecutive checks.
        shrink_slot: ``"lowest"`` drops the slot whose gate is lowest (its column is
            replaced by the last active column, so storage stays a prefix); ``"last"``
            drops the highest slot as the reference does. ``lowest`` is the default: with
            ``last`` a dead middle slot keeps the field shrinking, removing live slots
            one after another, and blocks any later growth.
        check_interval: training steps between two grow/shrink checks.
        gate_every: the gate step (DARTS validation step, or the single-loader gate update)
            runs on every ``gate_every``-th training step only, and so do the importance
            record and the check that read its result; the steps in between train the
            model alone. ``k`` > 1 cuts the search's extra forward/backward to 1/k of the
            steps; the gates then move k times less often at the same ``gate_lr``. A check
            runs on the first gate step at or after each multiple of ``check_interval``.
        final_threshold: a slot counts in the exported dim when its gate exceeds this.
        final_gates: which gate value the search recipe thresholds for the exported dims:
            ``"step"`` reads the gates once, at the end of the best-validation epoch (the
            authors' checkpoint rule); ``"epoch"`` uses each slot's mean gate over that
            epoch (over the steps in which the slot was active), so a gate hovering at the
            threshold does not flip the export on its last batches' noise.
        capacity_block: physical widths move in blocks of this many columns (FBGEMM's
            fused TBE kernel needs every local shard width to be a multiple of 4).
        capacity_slack_blocks: a table gives back storage only when it holds more than
            this many spare blocks, so a field oscillating around a block edge does not
            reallocate at every check.
        init_std: std of the N(0, std) init of new embedding columns and projection rows.
        penalty_mode: ``"fixed"`` uses ``alpha`` as the coefficient of
            ``mean_active(g / k)`` (the authors' form). ``"auto"`` scales the coefficient
            every gate step so that the penalty's pull on a slot-k gate equals
            ``alpha / k`` times the average consistent task pull on the active gates: the
            same ``alpha`` then means the same relative bar on any dataset.
        penalty_weighting: ``"uniform"`` charges every (field, slot) the same, as the
            authors do. ``"bytes"`` (default) charges a slot of table ``t`` in proportion
            to the bytes it costs (its row count), normalised so the mean weight over the
            active slots is 1: the same ``alpha`` then removes bytes, not dimensions. A
            column of a 3-row field costs 12 bytes and is almost free to keep; one of a
            1,500-row field pays more than the average bar. On MovieLens-100k this keeps
            the cheap user attributes that the uniform penalty drops, and retrains better
            at fewer bytes: see benchmarks/ablations.md, "Penalty weighting and alpha".
        alpha: the penalty knob (see ``penalty_mode``). The authors' fixed values, in
            this package's units (their 0.1 * alpha_dataset): ML-1M 0.01, Criteo 0.002,
            Avazu 0.0005, Ali-CCP 0.000125. ``None`` (default) resolves by ``penalty_mode``
            when the config is built: 0.1 in ``"auto"`` mode, 0.01 (ML-1M's) in
            ``"fixed"`` mode; the instance then holds (and records) the resolved value.
        auto_ema: EMA factor of the per-gate task gradient used by ``penalty_mode="auto"``.
        gate_lr: Adam learning rate of the gate logits (updated on validation batches).
        max_total_dim: global budget on the sum of logical dims (the reference: 1000).
        budget: memory budget of the collection's tables, as stored: a value in (0, 1] is a
            fraction of the ``d_max`` model's bytes, a value > 1 is bytes (see
            :func:`parse_budget` for ``"48MiB"``-style strings). Bytes count rows x logical
            dim x bytes per value of each table's data type, the figure ``metrics.json``
            reports. The search admits a growth only while it fits; when the budget binds,
            :func:`~torchrec_dimgrow.policy.decide` grows the fields with the most gate
            importance per byte first and may release a weak slot of a field elsewhere.
            ``None`` (default): no cap besides ``max_total_dim``.
        budget_pressure: with a ``budget``, the gate penalty is scaled by
            ``min(1, fill) ** budget_pressure``, where ``fill`` is the current dims' bytes
            over the budget (see ``DimGrowEmbeddingBagCollection.budget_price``). ``0``
            (default): the full penalty throughout, so the budget is a cap and the penalty
            alone decides how much of it is spent. ``> 0`` makes the budget a target: the
            search grows while far below it and the penalty's per-byte price decides where
            the bytes go. Measured (benchmarks/ablations.md, "Budget pressure"): at 2 the
            search spends more of the budget (MovieLens-100k at 0.3: 82% instead of 75%)
            but retrains no better per byte there, so it is opt-in. Ignored without a budget.
        eval_mixing: what the gates do in ``eval()``: ``"mean"`` mixes with the batch mean
            (the expectation of the shuffled copy: deterministic), ``"shuffle"`` keeps the
            training-time shuffle (the reference evaluates this way), ``"off"`` passes the
            raw columns.
    """

    d_max: int = 16
    cap_dims_at_rows: bool = True
    initial_dim: int | None = 1
    tau: float = 5.0
    theta_init: float = 0.0
    grow_threshold: float = 0.6
    grow_price_exponent: float = 1.0
    grow_patience: int = 1
    shrink_threshold: float = 0.01
    shrink_patience: int = 1
    shrink_slot: ShrinkSlot = "lowest"
    check_interval: int = 1
    gate_every: int = 1
    final_threshold: float = 0.5
    final_gates: FinalGates = "step"
    capacity_block: int = 4
    capacity_slack_blocks: int = 1
    init_std: float = 0.01
    penalty_mode: PenaltyMode = "auto"
    penalty_weighting: PenaltyWeighting = "bytes"
    alpha: float | None = None
    auto_ema: float = 0.99
    gate_lr: float = 1e-3
    max_total_dim: int = 1_000_000
    budget: float | None = None
    budget_pressure: float = 0.0
    eval_mixing: Literal["mean", "shuffle", "off"] = "mean"

    BOUNDS: ClassVar[dict[str, Bound]] = {
        "d_max": Bound(1, MAX_DIM),
        "initial_dim": Bound(1, MAX_DIM),  # None = the storage block
        "alpha": NON_NEGATIVE,
        "budget_pressure": NON_NEGATIVE,
        "gate_lr": POSITIVE,
        "check_interval": AT_LEAST_1,
        "gate_every": AT_LEAST_1,
        "grow_threshold": Bound(0, 1, low_open=True),
        "grow_price_exponent": NON_NEGATIVE,
        "shrink_threshold": Bound(0, 1, high_open=True),
        "grow_patience": AT_LEAST_1,
        "shrink_patience": AT_LEAST_1,
        "tau": POSITIVE,
        "capacity_block": AT_LEAST_1,
        "capacity_slack_blocks": NON_NEGATIVE,
        "max_total_dim": AT_LEAST_1,
        "auto_ema": Bound(0, 1, high_open=True),
    }
    """Ranges a run accepts (:meth:`check`); stricter than :meth:`validate` (``d_max`` <= 256)."""
    BELOW: ClassVar[tuple[tuple[str, str], ...]] = (("shrink_threshold", "grow_threshold"),)

    def __post_init__(self) -> None:
        self.alpha = self.penalty_alpha  # recorded resolved: a resume compares the value used
        self.validate()

    @property
    def penalty_alpha(self) -> float:
        """``alpha``, or where it is ``None`` the default of ``penalty_mode`` (the one place
        that default lives): 0.1 in ``"auto"`` mode, 0.01 in ``"fixed"`` mode."""
        if self.alpha is not None:
            return self.alpha
        return 0.1 if self.penalty_mode == "auto" else 0.01

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
            (self.grow_patience >= 1, f"grow_patience must be >= 1, got {self.grow_patience}"),
            (
                self.shrink_patience >= 1,
                f"shrink_patience must be >= 1, got {self.shrink_patience}",
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
                self.grow_price_exponent >= 0,
                f"grow_price_exponent must be >= 0, got {self.grow_price_exponent}",
            ),
            (self.penalty_mode in ("auto", "fixed"), f"unknown penalty_mode {self.penalty_mode}"),
            (
                self.penalty_weighting in ("bytes", "uniform"),
                f"unknown penalty_weighting {self.penalty_weighting}",
            ),
            (self.final_gates in ("epoch", "step"), f"unknown final_gates {self.final_gates}"),
            (self.shrink_slot in ("lowest", "last"), f"unknown shrink_slot {self.shrink_slot}"),
            (
                self.eval_mixing in ("mean", "shuffle", "off"),
                f"unknown eval_mixing {self.eval_mixing}",
            ),
            (
                self.budget is None or self.budget > 0,
                f"budget must be > 0 (a fraction in (0, 1] or bytes > 1), got {self.budget}",
            ),
            (
                self.budget_pressure >= 0,
                f"budget_pressure must be >= 0, got {self.budget_pressure}",
            ),
            (0.0 <= self.auto_ema < 1.0, f"auto_ema must be in [0, 1), got {self.auto_ema}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DimGrowConfig: {message}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DimGrowConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"DimGrowConfig: unknown keys {unknown}")
        return cls(**values)


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
