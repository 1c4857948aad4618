import pytest
import torch

from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.distributed.importance import SlotGateMean
from torchrec_dimgrow.policy import DimChange, PolicyState, capacity_for, decide, final_dims


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
    new, changes = decide([[0.9] * 4, [0.9] * 4], PolicyState([1, 1]), cfg(max_total_dim=3))
    assert new.dims == [2, 1]


def test_patience_requires_consecutive_checks() -> None:
    c = cfg(grow_patience=3)
    state = PolicyState([1])
    high, low = [[0.9, 0.5, 0.5, 0.5]], [[0.55, 0.5, 0.5, 0.5]]
    state, ch = decide(high, state, c)
    state, ch = decide(high, state, c)
    state, ch = decide(low, state, c)  # streak broken
    assert state.dims == [1] and state.up == [0]
    for _ in range(2):
        state, ch = decide(high, state, c)
        assert ch == []
    state, ch = decide(high, state, c)
    assert state.dims == [2] and ch[0].kind == "grow"


def test_shrink_drops_lowest_gate_slot_by_default_and_last_on_request() -> None:
    gates = [[0.9, 0.005, 0.8, 0.5]]
    new, ch = decide(gates, PolicyState([3]), cfg())
    assert new.dims == [2] and ch[0].kind == "shrink" and ch[0].slot == 1
    new, ch = decide(gates, PolicyState([3]), cfg(shrink_slot="last"))
    assert ch[0].slot == 2


def test_shrink_never_below_one_and_shrink_patience() -> None:
    new, ch = decide([[0.001, 0.5, 0.5, 0.5]], PolicyState([1]), cfg())
    assert new.dims == [1] and ch == []
    c = cfg(shrink_patience=2)
    s, ch = decide([[0.9, 0.001, 0.5, 0.5]], PolicyState([2]), c)
    assert ch == [] and s.down == [1]
    s, ch = decide([[0.9, 0.001, 0.5, 0.5]], s, c)
    assert s.dims == [1]


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
    with pytest.raises(ValueError, match="penalty_weighting"):
        DimGrowConfig(penalty_weighting="rows")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="final_gates"):
        DimGrowConfig(final_gates="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown keys"):
        DimGrowConfig.from_dict({"alpha": 0.1, "alhpa": 0.2})


def test_slot_gate_mean_averages_only_active_steps() -> None:
    mean = SlotGateMean((2, 3))
    mean.add(torch.tensor([[0.4, 0.9, 0.9], [0.8, 0.9, 0.9]]), [1, 2])
    mean.add(torch.tensor([[0.6, 0.7, 0.9], [0.2, 0.5, 0.9]]), [2, 2])
    current = torch.full((2, 3), 0.123)
    got = mean.mean(current)
    # table 0: slot 0 over both steps, slot 1 only since it grew; never-active slots read current
    assert torch.allclose(got, torch.tensor([[0.5, 0.7, 0.123], [0.5, 0.7, 0.123]]))
    mean.reset()
    assert torch.equal(mean.mean(current), current)


def test_slot_gate_mean_follows_shrink_moves() -> None:
    mean = SlotGateMean((1, 4))
    for _ in range(2):
        mean.add(torch.tensor([[0.9, 0.1, 0.7, 0.3]]), [3])
    # the collection drops slot 1 and moves the last active slot (2) into its place
    mean.apply([DimChange(0, "shrink", 1, 3, 2)])
    mean.add(torch.tensor([[0.9, 0.5, 0.3, 0.3]]), [2])
    got = mean.mean(torch.zeros(1, 4))
    assert torch.allclose(got, torch.tensor([[0.9, (0.7 + 0.7 + 0.5) / 3, 0.0, 0.0]]))
    # exported with the averages: slot 1 counts (0.63 > 0.5) although its last value is 0.5
    assert final_dims([got[0, :2].tolist()], cfg()) == [2]


def test_slot_gate_mean_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"expected gates \(2, 3\)"):
        SlotGateMean((2, 3)).add(torch.zeros(3, 3), [1, 1, 1])
