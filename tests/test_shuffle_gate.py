import pytest
import torch

from torchrec_dimgrow.modules.shuffle_gate import (
    ShuffleGate,
    column_shuffle,
    feature_project,
    shuffle_mix,
    shuffle_project,
)


def test_column_shuffle_is_a_true_permutation_per_column() -> None:
    torch.manual_seed(0)
    x = torch.arange(64 * 5, dtype=torch.float32).view(64, 5)
    y = column_shuffle(x)
    for c in range(5):
        assert torch.equal(torch.sort(y[:, c]).values, x[:, c])
    # independent permutations: the columns are not all permuted the same way
    orders = {tuple(torch.argsort(y[:, c]).tolist()) for c in range(5)}
    assert len(orders) == 5


def test_gradient_does_not_flow_into_the_shuffled_copy() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 3, requires_grad=True)
    g = torch.tensor([0.25, 0.5, 0.75])
    shuffle_mix(x, g, "shuffle").sum().backward()
    # d/dx of g*x + (1-g)*stopgrad(P x) is exactly g for every element
    assert torch.allclose(x.grad, g.expand(32, 3))


def test_gate_one_is_identity_and_gate_zero_is_pure_noise() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 4)
    assert torch.equal(shuffle_mix(x, torch.ones(4), "shuffle"), x)
    noise = shuffle_mix(x, torch.zeros(4), "shuffle")
    for c in range(4):
        assert torch.equal(noise[:, c].sort().values, x[:, c].sort().values)
    assert not torch.equal(noise, x)


def test_eval_modes() -> None:
    x = torch.randn(10, 2)
    g = torch.tensor([0.8, 0.2])
    assert torch.equal(shuffle_mix(x, g, "off"), x)
    mean = shuffle_mix(x, g, "mean")
    assert torch.allclose(mean, g * x + (1 - g) * x.mean(0, keepdim=True))


def test_gate_values_and_penalty_weights_one_over_k() -> None:
    gate = ShuffleGate(num_tables=2, d_max=4, tau=5.0, theta_init=0.0)
    assert torch.allclose(gate.gates(), torch.full((2, 4), 0.5))
    with torch.no_grad():
        gate.theta.fill_(0.3)
    g = torch.sigmoid(torch.tensor(1.5))
    # table 0 has 3 active slots, table 1 has 1
    tables = torch.tensor([0, 0, 0, 1])
    slots = torch.tensor([0, 1, 2, 0])
    expected = g * (1 + 1 / 2 + 1 / 3 + 1) / 4
    assert torch.allclose(gate.penalty(tables, slots), expected)
    # inactive slots get no gradient from the penalty
    gate.penalty(tables, slots).backward()
    assert gate.theta.grad[0, 3] == 0 and gate.theta.grad[1, 1:].abs().sum() == 0
    assert gate.theta.grad[0, 0] > gate.theta.grad[0, 1] > gate.theta.grad[0, 2] > 0


def test_penalty_table_weights_scale_each_tables_slots() -> None:
    gate = ShuffleGate(num_tables=2, d_max=2, tau=5.0, theta_init=0.0)
    tables = torch.tensor([0, 0, 1])
    slots = torch.tensor([0, 1, 0])
    weight = torch.tensor([0.5, 2.0])
    expected = 0.5 * (0.5 * 1 + 0.5 * 0.5 + 2.0 * 1) / 3
    assert torch.allclose(gate.penalty(tables, slots, weight), torch.tensor(expected))
    gate.penalty(tables, slots, weight).backward()
    # slot 1 of table 0 pays half of slot 0; table 1's first slot pays 4x table 0's
    assert torch.allclose(gate.theta.grad[1, 0], 4 * gate.theta.grad[0, 0])
    assert torch.allclose(gate.theta.grad[0, 1], gate.theta.grad[0, 0] / 2)


def test_a_rows_noise_comes_from_distinct_rows_and_more_columns_than_rows_work() -> None:
    torch.manual_seed(0)
    rows = torch.arange(16, dtype=torch.float32).unsqueeze(1).expand(16, 6).contiguous()
    noise = column_shuffle(rows)
    # every value is a row id: within one output row the 6 columns came from 6 different rows
    assert all(len(set(r.tolist())) == 6 for r in noise)
    wide = torch.randn(3, 10)  # C > B: still a permutation of every column
    y = column_shuffle(wide)
    for c in range(10):
        assert torch.equal(y[:, c].sort().values, wide[:, c].sort().values)


def _inputs(rows: int, cols: int, width: int = 5) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [
        torch.randn(rows, cols, dtype=torch.float64, requires_grad=True),
        torch.rand(cols, dtype=torch.float64, requires_grad=True),
        torch.randn(cols, width, dtype=torch.float64, requires_grad=True),
    ]


def _value_and_grads(
    fn, inputs: list[torch.Tensor], seed: int = 7
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)  # the same shuffle for every path
    out = fn(*inputs)
    weights = torch.linspace(-1.0, 2.0, out.numel(), dtype=out.dtype).view_as(out)
    return out, torch.autograd.grad((out * weights).sum(), inputs)


@pytest.mark.parametrize("shape", [(64, 10), (5, 12), (1, 3), (16, 0)])
def test_shuffle_project_matches_mixing_then_projecting(shape: tuple[int, int]) -> None:
    """Same values and gradients (x, gates, weight) as ``shuffle_mix(x, g) @ W``."""
    inputs = _inputs(*shape)
    ref, ref_grads = _value_and_grads(lambda x, g, w: shuffle_mix(x, g, "shuffle") @ w, inputs)
    out, grads = _value_and_grads(shuffle_project, inputs)
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_shuffle_project_gradients_in_closed_form() -> None:
    """d/dx is exactly (grad @ W^T) * g (the shuffled copy is stop-grad), d/dg = sum_b (grad @ W^T) * (x - noise)."""
    x, g, w = _inputs(40, 6)
    torch.manual_seed(3)
    noise = column_shuffle(x.detach())
    torch.manual_seed(3)
    out = shuffle_project(x, g, w)
    assert torch.allclose(out, torch.lerp(noise, x, g) @ w, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    gx, gg, gw = torch.autograd.grad(out, [x, g, w], grad_out)
    grad_mixed = grad_out @ w.t()
    assert torch.allclose(gx, grad_mixed * g, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gg, (grad_mixed * (x - noise)).sum(0), rtol=1e-12, atol=1e-12)
    assert torch.allclose(gw, torch.lerp(noise, x, g).t() @ grad_out, rtol=1e-12, atol=1e-12)

    # Lookups detached (a gate step): the gate gradient by its own route, the same value;
    # weight_grad=False reports a zero weight gradient; no_grad gives the same forward.
    torch.manual_seed(3)
    out_gate = shuffle_project(x.detach(), g, w, weight_grad=False)
    gg_gate, gw_gate = torch.autograd.grad(out_gate, [g, w], grad_out)
    assert torch.allclose(gg_gate, gg, rtol=1e-12, atol=1e-12) and not gw_gate.any()
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(shuffle_project(x, g, w), out)


@pytest.mark.parametrize("dims", [(4, 4, 4), (4, 2, 3)])
@pytest.mark.parametrize("detached", [False, True])
def test_feature_project_matches_mix_pad_and_batched_matmul(dims: tuple[int, ...], detached: bool) -> None:
    d, w, batch = 4, 3, 32
    n_feat = len(dims)
    rows = [f * d + k for f, n in enumerate(dims) for k in range(n)]
    slot_rows = None if len(rows) == n_feat * d else torch.tensor(rows)
    torch.manual_seed(0)
    x0 = torch.randn(batch, len(rows))
    theta0 = torch.randn(len(rows))
    w0 = torch.randn(n_feat, d, w)
    grad = torch.randn(batch, n_feat * w)

    def run(fused: bool) -> list[torch.Tensor]:
        x = x0.clone().requires_grad_(not detached)
        theta = theta0.clone().requires_grad_(True)
        weight = w0.clone().requires_grad_(True)
        g = torch.sigmoid(theta)
        torch.manual_seed(1)
        if fused:
            out = feature_project(x, g, weight, slot_rows)
        else:
            mixed = shuffle_mix(x, g)
            padded = mixed.new_zeros(batch, n_feat * d).index_copy(1, torch.tensor(rows), mixed)
            out = torch.bmm(padded.view(batch, n_feat, d).transpose(0, 1), weight)
            out = out.transpose(0, 1).reshape(batch, n_feat * w)
        out.backward(grad)
        grads = [theta.grad, weight.grad] + ([] if detached else [x.grad])
        return [out.detach()] + [t for t in grads if t is not None]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # weight_grad=False: the weight's gradient reads zero, the others are unchanged.
    theta = theta0.clone().requires_grad_(True)
    weight = w0.clone().requires_grad_(True)
    torch.manual_seed(1)
    feature_project(x0, torch.sigmoid(theta), weight, slot_rows, weight_grad=False).backward(grad)
    assert torch.equal(weight.grad, torch.zeros_like(w0))
    if detached:
        torch.testing.assert_close(theta.grad, run(True)[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", [(4, 4, 4), (4, 2, 3)])
def test_feature_project_without_gate_grad_keeps_every_other_gradient(dims: tuple[int, ...]) -> None:
    """``gate_grad=False`` (a training backward in DARTS mode): a zero gate gradient, the rest exact."""
    d, w, batch = 4, 3, 32
    rows = [f * d + k for f, n in enumerate(dims) for k in range(n)]
    slot_rows = None if len(rows) == len(dims) * d else torch.tensor(rows)
    torch.manual_seed(0)
    x0, theta0, w0 = torch.randn(batch, len(rows)), torch.randn(len(rows)), torch.randn(len(dims), d, w)
    grad = torch.randn(batch, len(dims) * w)

    def run(gate_grad: bool) -> list[torch.Tensor]:
        x, theta, weight = (t.clone().requires_grad_(True) for t in (x0, theta0, w0))
        torch.manual_seed(1)
        out = feature_project(x, torch.sigmoid(theta), weight, slot_rows, gate_grad=gate_grad)
        out.backward(grad)
        return [out.detach(), x.grad, weight.grad, theta.grad]

    with_g, without = run(True), run(False)
    for a, b in zip(with_g[:3], without[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert with_g[3].abs().sum() > 0 and torch.equal(without[3], torch.zeros_like(theta0))


@pytest.mark.parametrize("gate_step", [False, True])
def test_feature_project_groups_equal_the_sum_of_their_features(gate_step: bool) -> None:
    """``groups``: each group's output (and every gradient) is that of summing its features after."""
    n_feat, d, w, batch = 5, 4, 3, 32
    group_of = torch.tensor([0, 2, 0, 1, 2])
    torch.manual_seed(0)
    x0, theta0, w0 = torch.randn(batch, n_feat * d), torch.randn(n_feat * d), torch.randn(n_feat, d, w)
    grad = torch.randn(batch, 3 * w)

    def run(grouped: bool) -> list[torch.Tensor]:
        x = x0.clone().requires_grad_(not gate_step)
        theta, weight = theta0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        torch.manual_seed(1)
        g = torch.sigmoid(theta)
        if grouped:
            out = feature_project(x, g, weight, groups=group_of, n_groups=3)
        else:
            per = feature_project(x, g, weight).view(batch, n_feat, w)
            out = per.new_zeros(batch, 3, w).index_add(1, group_of, per).view(batch, -1)
        out.backward(grad)
        grads = [theta.grad, weight.grad] + ([] if gate_step else [x.grad])
        return [out.detach(), *grads]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
