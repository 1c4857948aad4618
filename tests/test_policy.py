import pytest
import torch

from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.modules.post_process import AUTO_EMA
from torchrec_dimgrow.policy import (
    PolicyState,
    capacity_for,
    decide,
    final_dims,
    grow_bars,
    vote_dims,
)


def cfg(**kw) -> DimGrowConfig:
    return DimGrowConfig(d_max=kw.pop("d_max", 4), **kw)


def test_grow_when_all_active_gates_exceed_threshold() -> None:
    state = PolicyState([2, 2])
    new, changes = decide([[0.7, 0.65, 0.5, 0.5], [0.7, 0.55, 0.5, 0.5]], state, cfg())
    assert new.dims == [3, 2]
    assert [(c.table, c.kind, c.slot, c.new_dim) for c in changes] == [(0, "grow", 2, 3)]
    assert state.dims == [2, 2], "decide must not mutate its input"


def test_grow_stops_at_d_max_and_budget() -> None:
    new, changes = decide([[0.9] * 4], PolicyState([4]), cfg())
    assert new.dims == [4] and changes == []
    paper = cfg(preset="paper")  # the reference's 1000-dim cap
    new, changes = decide([[0.9] * 4] * 998, PolicyState([1] * 998), paper)
    assert sum(new.dims) == 1000 and new.dims[:3] == [2, 2, 1] and len(changes) == 2
    assert sum(decide([[0.9] * 4] * 998, PolicyState([1] * 998), cfg())[0].dims) == 2 * 998


def test_priced_growth_bar_is_lower_for_tables_cheaper_than_the_mean_slot() -> None:
    costs = [4 * 3000, 4 * 300, 4 * 3]  # a big, a mid and a tiny table; one active slot each
    assert grow_bars([1, 1, 1], costs, cfg(preset="paper")) == [0.6] * 3  # the paper's single bar
    bars = grow_bars([1, 1, 1], costs, cfg())
    mean = sum(costs) / 3
    # the dear table keeps the paper's bar; the cheaper ones need less evidence, in proportion
    assert bars == pytest.approx([0.6, 0.5 + 0.1 * costs[1] / mean, 0.5 + 0.1 * costs[2] / mean])
    assert 0.6 > bars[1] > bars[2] > 0.5
    # the mean is over active slots: 4 slots on the tiny table lower it, so the mid table
    # now costs more than the mean and keeps the paper's bar
    assert grow_bars([1, 1, 40], costs, cfg())[1] == pytest.approx(0.6)
    # tables of one size (the planted and FM data): exactly the paper's bar, whatever the dims
    assert grow_bars([1, 3, 2], [400] * 3, cfg()) == [0.6] * 3
    # gates of 0.58 on every table: only the cheap ones clear their bar
    new, _ = decide([[0.58] * 4] * 3, PolicyState([1, 1, 1]), cfg(), costs=costs)
    assert new.dims == [1, 2, 2]
    # without costs nothing is priced: the paper's bar
    assert decide([[0.58] * 4], PolicyState([1]), cfg())[0].dims == [1]
    with pytest.raises(ValueError, match="2 byte costs for 3 tables"):
        decide([[0.58] * 4] * 3, PolicyState([1, 1, 1]), cfg(), costs=costs[:2])


def test_shrink_drops_lowest_gate_slot_and_the_paper_preset_the_last() -> None:
    gates = [[0.9, 0.005, 0.8, 0.5]]
    new, ch = decide(gates, PolicyState([3]), cfg())
    assert new.dims == [2] and ch[0].kind == "shrink" and ch[0].slot == 1
    new, ch = decide(gates, PolicyState([3]), cfg(preset="paper"))
    assert ch[0].slot == 2


def test_shrink_never_below_one() -> None:
    new, ch = decide([[0.001, 0.5, 0.5, 0.5]], PolicyState([1]), cfg())
    assert new.dims == [1] and ch == []
    s, ch = decide([[0.9, 0.001, 0.5, 0.5]], PolicyState([2]), cfg())
    assert s.dims == [1] and ch[0].kind == "shrink"


def test_drop_to_zero_comes_from_final_dims() -> None:
    assert final_dims([[0.9, 0.4], [0.2], [0.6, 0.7, 0.51]], cfg()) == [1, 0, 3]


def test_capacity_blocks_and_hysteresis() -> None:
    c = cfg(d_max=16)
    assert capacity_for(1, 0, c) == 4
    assert capacity_for(5, 4, c) == 8
    assert capacity_for(4, 8, c) == 8  # one spare block is tolerated
    assert capacity_for(4, 12, c) == 4  # two spare blocks are given back
    assert capacity_for(9, 8, c) == 12


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="grow_threshold"):
        DimGrowConfig(grow_threshold=0.001, shrink_threshold=0.01)
    with pytest.raises(ValueError, match="initial_dim"):
        DimGrowConfig(d_max=4, initial_dim=5)
    with pytest.raises(ValueError, match="unknown preset 'reference'"):
        DimGrowConfig(preset="reference")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown keys"):
        DimGrowConfig.from_dict({"alpha": 0.1, "alhpa": 0.2})


# ---------------------------------------------------------------------- byte budget
def test_budget_admits_growth_by_importance_per_byte_and_never_exceeds() -> None:
    c = cfg(d_max=8)
    costs = [100, 10, 10]
    gates = [[0.95, 0.9], [0.7], [0.8]]
    # room for 20 more bytes: both cheap tables fit, the 100-byte one does not
    new, changes = decide(gates, PolicyState([2, 1, 1]), c, costs=costs, budget=240)
    assert new.dims == [2, 2, 2]
    assert [(ch.table, ch.kind) for ch in changes] == [(2, "grow"), (1, "grow")], "0.8/10 before 0.7/10"
    assert new.up[0] >= 1, "a growth the budget refuses stays pending"
    # room for exactly one cheap growth: the higher importance per byte wins
    new, changes = decide(gates, PolicyState([2, 1, 1]), c, costs=costs, budget=230)
    assert new.dims == [2, 1, 2]
    # a budget with room for the expensive table serves it too (its 0.9/100 comes last)
    new, _ = decide(gates, PolicyState([2, 1, 1]), c, costs=costs, budget=340)
    assert new.dims == [3, 2, 2]
    for budget in range(220, 400, 7):
        new, _ = decide(gates, PolicyState([2, 1, 1]), c, costs=costs, budget=budget)
        assert sum(d * k for d, k in zip(new.dims, costs)) <= budget


def test_budget_releases_a_slot_the_export_would_drop_but_never_a_live_one() -> None:
    c = cfg(d_max=8)
    costs = [10, 10]
    # table 1's second slot (0.3) is below the export threshold: it makes room for table 0
    new, changes = decide([[0.9], [0.8, 0.3]], PolicyState([1, 2]), c, costs=costs, budget=30)
    assert new.dims == [2, 1]
    assert [(ch.table, ch.kind, ch.slot) for ch in changes] == [(1, "shrink", 1), (0, "grow", 1)]
    # a slot above the export threshold is never released: the growth waits
    new, changes = decide([[0.9], [0.8, 0.55]], PolicyState([1, 2]), c, costs=costs, budget=30)
    assert new.dims == [1, 2] and changes == []
    # a slot too cheap to free the bytes needed is not released either
    new, changes = decide([[0.9], [0.8, 0.3]], PolicyState([1, 2]), c, costs=[20, 5], budget=30)
    assert new.dims == [1, 2] and changes == []


def test_budget_none_keeps_the_unbudgeted_rule() -> None:
    gates = [[0.9, 0.9], [0.7], [0.005, 0.9]]
    state = PolicyState([2, 1, 2])
    a, ca = decide(gates, state, cfg())
    b, cb = decide(gates, state, cfg(), costs=[1, 1, 1], budget=10**9)
    assert a.dims == b.dims == [3, 2, 1]
    assert sorted((ch.table, ch.kind) for ch in ca) == sorted((ch.table, ch.kind) for ch in cb)
    with pytest.raises(ValueError, match="byte cost per table"):
        decide(gates, state, cfg(), budget=10)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("48MiB", 48 * 2**20),
        ("2.5GB", 2.5e9),
        ("1000000", 1e6),
        ("2e6", 2e6),
        ("0.3", 0.3),
        ("1", 1.0),
        ("12 kB", 12e3),
    ],
)
def test_parse_budget_units_and_fractions(text: str, value: float) -> None:
    from torchrec_dimgrow.config import parse_budget

    assert parse_budget(text) == value


@pytest.mark.parametrize("text", ["", "-3", "0", "12 parsecs", "MiB", "1B", "1.5", "2000.5"])
def test_parse_budget_rejects_nonsense(text: str) -> None:
    from torchrec_dimgrow.config import parse_budget

    with pytest.raises(ValueError, match="budget"):
        parse_budget(text)


def _budgeted(budget: float | None, **kw) -> object:
    from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

    from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection

    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=100, feature_names=["a"]),
        EmbeddingBagConfig(
            name="b", embedding_dim=8, num_embeddings=30, feature_names=["b"], data_type=DataType.FP16
        ),
    ]
    kw.setdefault("initial_dim", 1)
    return DimGrowEmbeddingBagCollection(tables, DimGrowConfig(d_max=8, budget=budget, **kw))


def test_budget_bytes_follow_the_table_dtype_and_fraction_equals_bytes() -> None:
    coll = _budgeted(0.25)
    assert coll.dim_costs() == [400, 60]  # fp32 x 100 rows, fp16 x 30 rows
    full = 8 * (400 + 60)
    assert coll.budget_bytes() == full // 4
    assert _budgeted(float(full // 4)).budget_bytes() == coll.budget_bytes()
    assert coll.embedding_bytes(physical=False) == 460
    assert _budgeted(None).budget_bytes() is None


def test_budget_below_every_field_at_dim_1_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"budget 459 bytes is below the 460 bytes every field needs at dim 1"
    ):
        _budgeted(459.0)
    _budgeted(460.0)
    with pytest.raises(ValueError, match="starting dims"):
        _budgeted(900.0, initial_dim=2)


def test_initial_dim_none_starts_at_the_storage_block_within_the_budget() -> None:
    assert _budgeted(None, initial_dim=None).post.dims_list() == [4, 4]
    # 460 bytes per dim: a budget of 3 dims' worth lowers the start to 3 (and the capacity stays 4)
    coll = _budgeted(3 * 460.0 + 10, initial_dim=None)
    assert coll.post.dims_list() == [3, 3] and coll.post.capacity_list() == [4, 4]
    assert coll.post.start_dims == [3, 3]
    assert _budgeted(460.0, initial_dim=None).post.dims_list() == [1, 1]
    assert DimGrowConfig(d_max=2, initial_dim=None).initial_dim is None


def test_auto_scale_recovers_the_task_gradient_under_a_budget() -> None:
    """The auto penalty subtracts exactly the penalty share it added to the gradient."""
    coll = _budgeted(0.25)
    post = coll.post
    post.penalty_scale.fill_(2.0)
    theta = post.gate.theta
    theta.grad = None
    coll.penalty().backward()
    pen_grad = theta.grad.clone()
    task = torch.zeros_like(pen_grad)
    _, _, tab_t, tab_s = post._index()
    task[tab_t, tab_s] = 0.3
    coll.observe_gate_gradient(task + pen_grad)
    g = post.gate.column_gates(tab_t, tab_s)
    expected = 0.3 / (post.config.tau * g * (1 - g))
    assert torch.allclose(post.task_grad_ema[tab_t, tab_s], (1 - AUTO_EMA) * expected, rtol=1e-4)


def test_vote_takes_the_per_field_median_and_repairs_it_into_the_budget() -> None:
    votes = [[4, 2, 7], [3, 3, 1], [5, 2, 16]]
    costs = [100, 10, 1]
    assert vote_dims(votes, costs) == [4, 2, 7]
    assert vote_dims(votes[:2], costs) == [3, 2, 1]  # even count: the lower median
    # every vote fits 520 bytes, and so does their median (427 bytes)
    assert vote_dims(votes, costs, budget=520) == [4, 2, 7]
    # a tighter budget than the median: the dearest field above its smallest vote gives back
    # first (field 0 down to 3), then the next dearest (field 1 is at its minimum, so field 2)
    assert vote_dims(votes, costs, budget=325) == [3, 2, 5]
    # votes that each fit 90 bytes but whose median (4, 4, 4) does not: ties go to the
    # lower index, and the repair never goes below a field's smallest vote
    spread = [[4, 4, 1], [4, 1, 4], [1, 4, 4]]
    assert vote_dims(spread, [10, 10, 10], budget=90) == [1, 4, 4]
    with pytest.raises(ValueError, match="every vote needs 3 dims"):
        vote_dims([[1, 2, 3], [1, 2]], costs)
    with pytest.raises(ValueError, match="no votes"):
        vote_dims([], costs)
