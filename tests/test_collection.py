import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.modules import post_process
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.feature_groups import FeatureGroups
from torchrec_dimgrow.modules.post_process import DimGrowPostProcess
from torchrec_dimgrow.modules.table_store import LocalTableStore
from torchrec_dimgrow.policy import DimChange


def start1(**kw) -> DimGrowConfig:
    """The growth-mechanics tests below start from 1 dim explicitly, whatever the default start."""
    return DimGrowConfig(initial_dim=1, **kw)


def tables(n: int = 3, dim: int = 16, rows: int = 50) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=rows, feature_names=[f"f{i}"])
        for i in range(n)
    ]


def kjt(n_features: int = 3, batch: int = 8, rows: int = 50) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(n_features)],
        values=torch.randint(0, rows, (n_features * batch,)),
        lengths=torch.ones(n_features * batch, dtype=torch.int64),
    )


def grow(m: DimGrowEmbeddingBagCollection, t: int, **kw) -> object:
    d = m.post.dims_list()[t]
    return m.apply_changes([DimChange(t, "grow", d, d, d + 1)], **kw)


def test_is_an_ebc_with_kjt_in_keyed_tensor_out() -> None:
    torch.manual_seed(0)
    m = DimGrowEmbeddingBagCollection(tables(), start1(), align="raw")
    assert isinstance(m, EmbeddingBagCollection)
    out = m(kjt())
    assert out.keys() == ["f0", "f1", "f2"] and out.length_per_key() == [1, 1, 1]
    assert [c.embedding_dim for c in m.embedding_bag_configs()] == [1, 1, 1]
    grow(m, 1)
    assert [c.embedding_dim for c in m.embedding_bag_configs()] == [1, 2, 1]
    assert m(kjt()).length_per_key() == [1, 2, 1]


@pytest.mark.parametrize("align", ["pad", "project"])
def test_aligned_modes_present_the_configured_width(align: str) -> None:
    m = DimGrowEmbeddingBagCollection(tables(dim=16), start1(), align=align)
    grow(m, 0)
    out = m(kjt())
    assert out.length_per_key() == [16, 16, 16]
    assert [c.embedding_dim for c in m.embedding_bag_configs()] == [16, 16, 16]
    if align == "pad":
        m.eval()
        m.post.gates_bypassed = True  # the raw columns
        values = m(kjt()).to_dict()
        assert torch.all(values["f0"][:, 2:] == 0) and torch.all(values["f1"][:, 1:] == 0)


def test_pad_rejects_width_below_d_max() -> None:
    with pytest.raises(ValueError, match="t0"):
        DimGrowEmbeddingBagCollection(tables(dim=8), start1(d_max=16), align="pad")


def test_logical_growth_inside_capacity_does_not_reallocate() -> None:
    m = DimGrowEmbeddingBagCollection(tables(), start1())
    w = m.embedding_bags["t0"].weight
    for _ in range(3):
        report = grow(m, 0)
        assert not report.replanned
    assert m.dims()["t0"] == 4 and m.capacities()["t0"] == 4
    assert m.embedding_bags["t0"].weight is w


def test_capacity_growth_keeps_old_columns_and_optimizer_state_bit_exact() -> None:
    torch.manual_seed(0)
    m = DimGrowEmbeddingBagCollection(tables(), start1(), align="raw")
    params = list(m.ebc.parameters())
    opt = torch.optim.Adam(params, lr=0.1)
    for _ in range(3):
        grow(m, 0)
    for _ in range(3):  # give Adam some state
        opt.zero_grad()
        m(kjt()).values().pow(2).sum().backward()
        opt.step()
    old_w = m.embedding_bags["t0"].weight.detach().clone()
    old_state = {k: v.clone() for k, v in opt.state[m.embedding_bags["t0"].weight].items()}
    other = m.embedding_bags["t1"].weight
    store = LocalTableStore(m.ebc, [opt])
    report = grow(m, 0, store=store)
    assert report.replanned and report.capacity_changes == {"t0": (4, 8)}
    assert m.capacities() == {"t0": 8, "t1": 4, "t2": 4}
    new_w = m.embedding_bags["t0"].weight
    assert new_w.shape == (50, 8)
    assert torch.equal(new_w[:, :4], old_w)
    assert new_w[:, 4:].abs().max() < 0.1  # N(0, 0.01)
    state = opt.state[new_w]
    assert torch.equal(state["exp_avg"][:, :4], old_state["exp_avg"][:, :4])
    assert torch.equal(state["exp_avg_sq"][:, :4], old_state["exp_avg_sq"][:, :4])
    assert torch.all(state["exp_avg"][:, 4:] == 0)
    assert torch.equal(state["step"], old_state["step"])
    assert m.embedding_bags["t1"].weight is other, "only the changed table is reallocated"
    assert any(p is new_w for p in opt.param_groups[0]["params"])
    assert [c.embedding_dim for c in m.ebc.embedding_bag_configs()] == [8, 4, 4]
    opt.zero_grad()
    m(kjt()).values().sum().backward()
    opt.step()  # training continues on the new parameter


def test_shrink_of_a_middle_slot_moves_the_last_column_into_it() -> None:
    torch.manual_seed(0)
    m = DimGrowEmbeddingBagCollection(tables(dim=16), start1(), align="project")
    for _ in range(2):
        grow(m, 0)
    with torch.no_grad():
        m.post.gate.theta[0, :3] = torch.tensor([1.0, -2.0, 0.7])
    m.eval()
    m.post.gates_bypassed = True  # the raw columns
    features = kjt()
    w = m.embedding_bags["t0"].weight.detach().clone()
    proj = m.post.projection[0].detach().clone()
    m.apply_changes([DimChange(0, "shrink", 1, 3, 2)])
    assert m.dims()["t0"] == 2
    w2 = m.embedding_bags["t0"].weight
    assert torch.equal(w2[:, 1], w[:, 2]) and torch.equal(w2[:, 0], w[:, 0])
    assert torch.equal(m.post.projection[0, 1], proj[2])
    assert float(m.post.gate.theta[0, 1]) == pytest.approx(0.7)
    assert m.post.gate.theta[0, 2] == 0.0, "the freed slot restarts at g = 0.5"
    # the kept columns produce exactly what they produced before, minus the dropped one
    out = m(features).to_dict()["f0"]
    ids = features["f0"].values()
    expected = w[ids][:, [0, 2]] @ proj[[0, 2]]
    assert torch.allclose(out, expected, atol=1e-6)


def test_export_dims_and_configs_drop_zero_fields() -> None:
    m = DimGrowEmbeddingBagCollection(tables(), start1(), align="raw")
    grow(m, 0)
    with torch.no_grad():
        m.post.gate.theta[0, :2] = torch.tensor([1.0, 0.5])
        m.post.gate.theta[1, 0] = -1.0
        m.post.gate.theta[2, 0] = 0.2
        m.post.gate.theta[2, 1] = 5.0  # inactive slot: never counts
    assert m.export_dims() == {"t0": 2, "t1": 0, "t2": 1}
    configs = m.export_configs()
    assert [(c.name, c.embedding_dim) for c in configs] == [("t0", 2), ("t2", 1)]


def test_gate_step_detaches_the_lookup() -> None:
    m = DimGrowEmbeddingBagCollection(tables(), start1(), align="project")
    with m.gate_step():
        m(kjt()).values().sum().backward()
    assert all(p.grad is None for p in m.ebc.parameters())
    assert m.post.gate.theta.grad is not None
    m(kjt()).values().sum().backward()
    assert all(p.grad is not None for p in m.ebc.parameters())


def test_summed_gate_step_skips_the_projection_and_tables_but_not_the_gates() -> None:
    m = DimGrowEmbeddingBagCollection(tables(dim=8), DimGrowConfig(d_max=8, initial_dim=3), align="project")
    m.train()
    with m.gate_step():
        m.forward_summed(kjt()).pow(2).sum().backward()
    assert all(p.grad is None for p in m.ebc.parameters())
    # not computed (DDP still gets a gradient for every parameter: a zero one)
    assert m.post.projection is not None and m.post.projection.grad is not None
    assert not m.post.projection.grad.any()
    theta_grad = m.post.gate.theta.grad
    assert theta_grad is not None and theta_grad[:, :3].abs().sum() > 0
    m.forward_summed(kjt()).pow(2).sum().backward()  # a training step reaches everything
    assert m.post.projection.grad.any()
    assert all(p.grad is not None for p in m.ebc.parameters())


def test_auto_penalty_scale_tracks_task_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(post_process, "AUTO_EMA", 0.0)  # the last gradient alone
    m = DimGrowEmbeddingBagCollection(tables(), start1(alpha=0.5), align="raw")
    assert float(m.post.penalty_scale) == 0.0, "auto mode starts uncalibrated at 0, not at alpha"
    grad = torch.zeros_like(m.post.gate.theta)
    grad[:, 0] = 0.2
    m.post.observe_task_gradient(grad)
    # g = 0.5 on the 3 active gates: dL/dg = 0.2 / (5 * 0.25); scale = alpha * n * mean|dL/dg|
    assert float(m.post.penalty_scale) == pytest.approx(0.5 * 3 * 0.2 / 1.25, rel=1e-5)
    # the penalty's own share of the next gradient is recognised and not counted as task signal
    scale = float(m.post.penalty_scale)
    m.post.observe_task_gradient(grad + scale * 1.25 / 3)
    assert float(m.post.penalty_scale) == pytest.approx(scale, rel=1e-5)
    fixed = DimGrowEmbeddingBagCollection(tables(), start1(alpha=0.01, preset="paper"), align="raw")
    fixed.post.observe_task_gradient(grad)
    assert float(fixed.post.penalty_scale) == pytest.approx(0.01)


def _two_tables(rows: tuple[int, int]) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=r, feature_names=[f"f{i}"])
        for i, r in enumerate(rows)
    ]


def test_bytes_weighting_charges_slots_by_table_rows() -> None:
    m = DimGrowEmbeddingBagCollection(_two_tables((10, 990)), start1(alpha=1.0), align="raw")
    m.post.penalty_scale.fill_(1.0)  # the auto scale, calibrated to 1: the same pull as the paper's
    m.penalty().backward()
    grad = m.post.gate.theta.grad
    assert float(grad[1, 0] / grad[0, 0]) == pytest.approx(99.0, rel=1e-5)
    # normalised to mean 1 over the active slots: the total pull equals the uniform penalty's
    uniform = DimGrowEmbeddingBagCollection(_two_tables((10, 990)), start1(alpha=1.0, preset="paper"))
    uniform.penalty().backward()
    ugrad = uniform.post.gate.theta.grad
    assert float(ugrad[1, 0] / ugrad[0, 0]) == pytest.approx(1.0, rel=1e-5)
    assert float(grad.sum()) == pytest.approx(float(ugrad.sum()), rel=1e-5)


def test_auto_scale_recognises_the_weighted_penalty_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(post_process, "AUTO_EMA", 0.0)  # the last gradient alone
    m = DimGrowEmbeddingBagCollection(_two_tables((10, 990)), start1(alpha=0.5))
    task = torch.zeros_like(m.post.gate.theta)
    task[:, 0] = 0.2
    m.post.observe_task_gradient(task)
    scale = float(m.post.penalty_scale)
    assert scale == pytest.approx(0.5 * 2 * 0.2 / 1.25, rel=1e-5)
    m.post.gate.theta.grad = None
    m.penalty().backward()
    m.post.observe_task_gradient(task + m.post.gate.theta.grad)
    assert float(m.post.penalty_scale) == pytest.approx(scale, rel=1e-5)


def test_a_table_never_outgrows_its_row_count_unless_padded() -> None:
    from torchrec_dimgrow.policy import PolicyState, decide

    rows = (3, 990)
    project = DimGrowEmbeddingBagCollection(_two_tables(rows), start1(d_max=8), align="project")
    assert project.max_dims == [3, 8]
    assert DimGrowEmbeddingBagCollection(_two_tables(rows), start1(d_max=16), align="raw").max_dims == [3, 16]
    # zero-padded widths share coordinates with the other fields: no cap there
    assert DimGrowEmbeddingBagCollection(_two_tables(rows), start1(d_max=8), align="pad").max_dims == [8, 8]
    paper = start1(d_max=8, preset="paper")  # the reference has no row cap
    assert DimGrowEmbeddingBagCollection(_two_tables(rows), paper, align="project").max_dims == [8, 8]
    # a fractional budget still refers to the uncapped d_max model
    budgeted = DimGrowEmbeddingBagCollection(_two_tables(rows), start1(d_max=8, budget=0.5), align="project")
    assert budgeted.budget_bytes() == int(0.5 * 8 * 4 * sum(rows))
    # the rule as the controller calls it: every gate high, only the big table grows
    new, changes = decide(
        [[0.9] * 8] * 2,
        PolicyState([3, 3]),
        project.config,
        project.max_dims,
        project.dim_costs(),
        project.budget_bytes(),
    )
    assert new.dims == [3, 4] and [c.table for c in changes] == [1]


def test_row_counts_must_match_tables() -> None:
    with pytest.raises(ValueError, match="row count"):
        DimGrowPostProcess(["a"], [0], ["a"], [4], [4], start1(), "raw", table_rows=[3, 4])


@pytest.mark.parametrize("align", ["pad", "project"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_summed_equals_the_sum_of_the_per_feature_outputs(align: str, training: bool) -> None:
    """The one-matmul path a summing consumer uses: same values and same gradients."""
    torch.manual_seed(0)
    m = DimGrowEmbeddingBagCollection(tables(dim=8), DimGrowConfig(d_max=8, initial_dim=3), align=align)
    grow(m, 1)  # dims 3, 4, 3 with capacity 4: the active columns are a strict subset
    with torch.no_grad():
        m.post.gate.theta.uniform_(-0.5, 0.5)
    m.train(training)
    features = kjt(batch=32)
    params = [p for p in m.parameters() if p.requires_grad]

    def run(summed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(7)  # the same shuffle for both paths
        out = m.forward_summed(features) if summed else m(features).values().view(32, 3, 8).sum(1)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), params, allow_unused=True)
        return out, [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]

    ref, ref_grads = run(False)
    out, grads = run(True)
    assert torch.allclose(out, ref, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6)


def test_host_dims_follow_every_write_without_reading_the_buffer_each_forward() -> None:
    m = DimGrowEmbeddingBagCollection(tables(), start1(), align="raw")
    grow(m, 0)
    assert m.post.dims_list() == [2, 1, 1]
    m.post.dims.copy_(torch.tensor([3, 1, 2]))  # an outside write (a resume, a test helper)
    assert m.post.dims_list() == [3, 1, 2]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["post.dims"] = torch.tensor([1, 4, 1])
    m.load_state_dict(state)
    assert m.post.dims_list() == [1, 4, 1]
    assert m(kjt()).length_per_key() == [1, 4, 1]


def test_state_dicts_with_per_feature_projections_still_load() -> None:
    m = DimGrowEmbeddingBagCollection(tables(dim=8), start1(d_max=8), align="project")
    state = m.state_dict()
    proj = state.pop("post.projection").clone()
    for i in range(3):
        state[f"post.projections.{i}"] = proj[i] + 1.0  # the layout before one stacked parameter
    m.load_state_dict(state)
    assert torch.equal(m.post.projection.detach(), proj + 1.0)


def test_controller_restart_sets_dims_keeps_columns_and_forgets_all_gate_evidence() -> None:
    """What the search's learn-first epochs begin and end with (``DimGrowController.restart``)."""
    from torchrec_dimgrow.controller import DimGrowController

    torch.manual_seed(0)
    m = DimGrowEmbeddingBagCollection(tables(), start1(), align="raw")
    ctl = DimGrowController({"": m})
    for _ in range(5):  # t0 to 6 dims (capacity 8), t1 to 2, t2 stays at 1
        grow(m, 0)
    grow(m, 1)
    ctl.tracked[0].policy.dims = m.dims_list()
    loss = m(kjt()).values().pow(2).sum()
    loss.backward()
    ctl.update_gates(add_penalty=False)
    ctl.record()
    w0 = m.embedding_bags["t0"].weight.detach().clone()
    assert ctl.gate_optimizer.state and not torch.all(m.post.gate.theta == 0)

    report = ctl.restart({"": [4, 4, 4]})
    assert m.dims_list() == [4, 4, 4] and m.capacity_list() == [8, 4, 4]  # slack keeps t0's block
    assert {(c.table, c.kind) for c in report.changes[""]} == {(0, "shrink"), (1, "grow"), (2, "grow")}
    assert torch.equal(m.embedding_bags["t0"].weight.detach()[:, :4], w0[:, :4])  # trained columns kept
    assert torch.all(m.post.gate.theta == 0.0)
    assert not ctl.gate_optimizer.state and float(m.post.task_grad_ema.abs().sum()) == 0.0
    policy = ctl.tracked[0].policy
    assert policy.dims == [4, 4, 4] and policy.up == [0, 0, 0] and policy.down == [0, 0, 0]
    assert ctl.tracked[0].importance.count == 0


def test_bypassed_gates_pass_the_raw_columns_in_training_and_eval() -> None:
    torch.manual_seed(0)
    m = DimGrowEmbeddingBagCollection(tables(), DimGrowConfig(initial_dim=4), align="raw")
    features = kjt()
    raw = m.ebc(features).values()
    m.post.gates_bypassed = True
    for training in (True, False):
        m.train(training)
        assert torch.equal(m(features).values(), raw)
    m.train(True)
    out = m(features).values().sum()
    out.backward()  # the gates stay in the graph (DDP's static graph) with a zero gradient
    assert m.post.gate.theta.grad is not None and float(m.post.gate.theta.grad.abs().sum()) == 0.0


def test_groups_over_other_features_are_refused_by_name() -> None:
    tables = [
        EmbeddingBagConfig(num_embeddings=10, embedding_dim=4, name=f"t{i}", feature_names=[f"f{i}"])
        for i in range(2)
    ]
    coll = DimGrowEmbeddingBagCollection(tables, DimGrowConfig(d_max=4), align="project")
    kjt = KeyedJaggedTensor(keys=["f0", "f1"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]))
    with pytest.raises(KeyError, match="groups over"):
        coll(kjt, groups=FeatureGroups(["f1", "f0"], ["g"], [0, 0]))
    out = coll(kjt, groups=FeatureGroups(["f0", "f1"], ["g"], [0, 0]))
    assert out.keys() == ["g"] and out.values().shape == (1, 4)
