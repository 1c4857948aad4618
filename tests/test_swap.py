"""Single-process tests of the PEFT-style swap: swap_in, attach, step, export."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.mixed_dim import MixedDimEmbeddingBagCollection, export_collection
from torchrec_dimgrow.optim import (
    EmbeddingOptimizer,
    embedding_optimizer_of,
    remove_parameters,
    replace_optimizer,
)
from torchrec_dimgrow.swap import export, swap_in

D = 8
ROWS = [30, 50, 20, 40]
PATH = "model.sparse_arch.embedding_bag_collection"


def tables(dim: int = D) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=r, feature_names=[f"f{i}"])
        for i, r in enumerate(ROWS)
    ]


def dlrm_train(device: str = "cpu", dcn: bool = False) -> DLRMTrain:
    ebc = EmbeddingBagCollection(tables=tables(), device=torch.device(device))
    if dcn:
        return DLRMTrain(DLRM_DCN(ebc, 3, [8, D], [8, 1], dcn_num_layers=1, dcn_low_rank_dim=4))
    return DLRMTrain(
        DLRM(
            embedding_bag_collection=ebc,
            dense_in_features=3,
            dense_arch_layer_sizes=[8, D],
            over_arch_layer_sizes=[8, 1],
        )
    )


def make_batch(seed: int, size: int = 32) -> Batch:
    """Labels follow feature f0's id parity: a signal the gates of t0 can find."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, r, (size,), generator=g) for r in ROWS]
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(len(ROWS))],
        values=torch.cat(ids),
        lengths=torch.ones(len(ROWS) * size, dtype=torch.int64),
    )
    return Batch(
        dense_features=torch.randn(size, 3, generator=g), sparse_features=kjt, labels=(ids[0] % 2).float()
    )


# ---------------------------------------------------------------------- swap_in
@pytest.mark.parametrize("dcn", [False, True])
def test_swap_keeps_path_configs_and_dlrm_forward(dcn: bool) -> None:
    torch.manual_seed(0)
    model = dlrm_train(dcn=dcn)
    before = {n for n, _ in model.named_modules()}
    handle = swap_in(model, DimGrowConfig(d_max=D), align="project")
    coll = model.get_submodule(PATH)
    assert isinstance(coll, DimGrowEmbeddingBagCollection)
    assert list(handle.collections) == [PATH]
    outside = {n for n in before if not n.startswith(PATH + ".")}
    assert outside <= {n for n, _ in model.named_modules()}  # the collection's path and all others kept
    assert [
        (c.name, c.embedding_dim, c.num_embeddings, c.feature_names) for c in coll.embedding_bag_configs()
    ] == [(t.name, t.embedding_dim, t.num_embeddings, t.feature_names) for t in tables()]
    loss, (_, logits, _) = model(make_batch(0))
    assert logits.shape == (32,) and torch.isfinite(loss)
    # DLRM's constructor accepts the swapped collection directly (one common dim D).
    DLRM(
        embedding_bag_collection=coll,
        dense_in_features=3,
        dense_arch_layer_sizes=[8, D],
        over_arch_layer_sizes=[8, 1],
    )


def test_swap_on_meta_keeps_tables_on_meta_and_gates_on_the_dense_device() -> None:
    model = dlrm_train(device="meta")
    handle = swap_in(model)
    coll = handle.collections[PATH]
    assert all(p.device.type == "meta" for p in handle.embedding_parameters())
    assert coll.post.gate.theta.device.type == "cpu"
    assert {id(p) for p in handle.embedding_parameters()} == {id(p) for p in coll.ebc.parameters()}


def test_swap_carries_the_in_backward_optimizer_of_the_original_tables() -> None:
    model = dlrm_train(device="meta")
    apply_optimizer_in_backward(
        torch.optim.Adagrad, model.model.sparse_arch.parameters(), {"lr": 0.07, "eps": 1e-9}
    )
    handle = swap_in(model)
    spec = embedding_optimizer_of(handle.embedding_parameters())
    assert spec == EmbeddingOptimizer("adagrad", 0.07, {"eps": 1e-9})
    assert not any(hasattr(p, "_in_backward_optimizers") for p in handle.gate_parameters())
    assert all(c.compute_kernels == ["fused"] for c in handle.constraints().values())


def test_embedding_optimizer_of_ignores_keys_torchrec_injects() -> None:
    p = torch.nn.Parameter(torch.zeros(2, 4, device="meta"))
    apply_optimizer_in_backward(torch.optim.SGD, [p], {"lr": 0.3})
    p._optimizer_kwargs[0]["optimizer"] = "EXACT_SGD"  # what the sharder writes back
    assert embedding_optimizer_of([p]) == EmbeddingOptimizer("sgd", 0.3, {})


def test_swap_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no torchrec"):
        swap_in(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="itself"):
        swap_in(EmbeddingBagCollection(tables=tables()))
    with pytest.raises(ValueError, match=r"align='pad'"):
        swap_in(dlrm_train(), DimGrowConfig(d_max=16), align="pad")


class TwoTowers(torch.nn.Module):
    """Two collections (user / item towers) plus a FeatureProcessed one that must stay stock."""

    def __init__(self) -> None:
        super().__init__()
        from torchrec.modules.feature_processor_ import PositionWeightedModule
        from torchrec.modules.fp_embedding_modules import FeatureProcessedEmbeddingBagCollection

        self.user = EmbeddingBagCollection(tables=tables()[:2])
        item = EmbeddingBagConfig(name="i0", embedding_dim=D, num_embeddings=40, feature_names=["f3"])
        self.item = EmbeddingBagCollection(tables=[item])
        weighted = EmbeddingBagConfig(name="w0", embedding_dim=D, num_embeddings=20, feature_names=["f2"])
        fp = EmbeddingBagCollection(tables=[weighted], is_weighted=True)
        self.weighted = FeatureProcessedEmbeddingBagCollection(
            fp, {"f2": PositionWeightedModule(max_feature_length=4)}
        )

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.user(kjt).values().sum(1) * self.item(kjt).values().sum(1)


def test_swap_finds_every_collection_but_not_inside_other_torchrec_modules() -> None:
    model = TwoTowers()
    handle = swap_in(model, DimGrowConfig(d_max=4, grow_threshold=0.3, check_interval=1))
    assert sorted(handle.collections) == ["item", "user"]
    assert type(model.weighted._embedding_bag_collection) is EmbeddingBagCollection
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle.attach(model, optimizer=opt, loss_fn=lambda m, b: m(b.sparse_features).pow(2).mean())
    for step in range(4):
        handle.step(make_batch(step))
    assert handle.dims() == {"t0": 4, "t1": 4, "i0": 4}
    assert list(swap_in(TwoTowers(), targets=["item"]).collections) == ["item"]
    with pytest.raises(ValueError, match="no EmbeddingBagCollection at"):
        swap_in(TwoTowers(), targets=["nope"])


def test_attach_refuses_gates_with_an_in_backward_optimizer() -> None:
    model = dlrm_train()
    handle = swap_in(model)
    apply_optimizer_in_backward(torch.optim.SGD, model.model.sparse_arch.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match="embedding_parameters"):
        handle.attach(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


# ---------------------------------------------------------------------- optimizers
def test_remove_and_replace_inside_combined_optimizers() -> None:
    a, b, theta = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    dense = KeyedOptimizerWrapper({"a": a, "theta": theta}, lambda ps: torch.optim.Adam(ps, lr=0.1))
    inner = CombinedOptimizer([KeyedOptimizerWrapper({"b": b}, lambda ps: torch.optim.SGD(ps, lr=0.1))])
    combined = CombinedOptimizer([("fused", inner), ("dense", dense)])
    assert remove_parameters(combined, [theta]) == 1
    assert "dense.theta" not in combined.params and all(
        p is not theta for g in combined.param_groups for p in g["params"]
    )
    new = CombinedOptimizer([])
    assert replace_optimizer(combined, inner, new) and combined.optimizers[0] == ("fused", new)


# ---------------------------------------------------------------------- the search step
def _attached(cfg: DimGrowConfig) -> tuple[DLRMTrain, object, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = dlrm_train()
    handle = swap_in(model, cfg, align="project")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    handle.attach(model, optimizer=opt)
    return model, handle, opt


def test_attach_moves_the_gates_to_their_own_optimizer() -> None:
    model, handle, opt = _attached(DimGrowConfig(d_max=D))
    theta = handle.gate_parameters()[0]
    assert all(p is not theta for g in opt.param_groups for p in g["params"])
    assert handle.controller.gate_optimizer.param_groups[0]["params"] == [theta]
    with pytest.raises(RuntimeError, match="already attached"):
        handle.attach(model, optimizer=opt)


def test_penalty_reaches_the_gate_loss() -> None:
    # A huge fixed penalty dominates the task loss: every active gate must close.
    model, handle, _ = _attached(DimGrowConfig(d_max=D, preset="paper", alpha=100.0, gate_lr=0.05))
    assert handle.penalty().requires_grad and float(handle.penalty()) > 0
    before = handle.collections[PATH].gate_values()[:, 0].clone()
    for step in range(3):
        handle.step(make_batch(100 + step))
    after = handle.collections[PATH].gate_values()[:, 0]
    assert torch.all(after < before)
    # the gate step never leaves gradients on the model for the next training step
    assert all(p.grad is None for p in model.parameters())


def test_single_loader_step_uses_the_training_gradient() -> None:
    model, handle, opt = _attached(DimGrowConfig(d_max=D, alpha=0.0, gate_lr=0.05))
    with pytest.raises(RuntimeError, match="no gradient"):
        handle.step()
    theta = handle.gate_parameters()[0]
    before = theta.detach().clone()
    opt.zero_grad()
    model(make_batch(0))[0].backward()
    opt.step()
    assert theta.grad is not None
    handle.step()  # single-loader mode: the training gradient on the gates, plus the penalty
    assert theta.grad is None and not torch.equal(theta.detach(), before)


def test_gate_batches_turn_the_training_gate_gradient_off_and_single_loader_back_on() -> None:
    """DARTS mode drops the training backward's gate gradient, so it is not computed there;
    a switch to single-loader mode turns it back on and steps the gates from the next call."""
    model, handle, opt = _attached(DimGrowConfig(d_max=D, alpha=0.0, gate_lr=0.05))
    theta = handle.gate_parameters()[0]

    def train(step: int) -> None:
        opt.zero_grad()
        model(make_batch(step))[0].backward()
        opt.step()

    train(0)
    assert theta.grad is not None and theta.grad.abs().sum() > 0  # on until a mode is seen
    handle.step(make_batch(100))  # DARTS: a gate batch
    train(1)
    assert theta.grad is not None and not theta.grad.any()  # a zero gradient (DDP needs one)
    before = theta.detach().clone()
    handle.step()  # single-loader now: this step had no gate gradient, so it only switches
    assert torch.equal(theta.detach(), before)
    train(2)
    assert theta.grad is not None and theta.grad.abs().sum() > 0
    handle.step()
    assert not torch.equal(theta.detach(), before)


def test_local_search_grows_past_capacity_and_keeps_training() -> None:
    # Grow threshold below the initial gate value: every table grows at every check.
    cfg = DimGrowConfig(d_max=D, grow_threshold=0.3, shrink_threshold=0.001, check_interval=1)
    model, handle, opt = _attached(cfg)
    coll = handle.collections[PATH]
    losses, reports = [], []
    for step in range(12):
        opt.zero_grad()
        loss = model(make_batch(step))[0]
        loss.backward()
        opt.step()
        losses.append(float(loss))
        reports.append(handle.step(make_batch(1000 + step)))
    assert handle.replans >= 1 and any(r is not None and r.replanned for r in reports)
    assert coll.capacities() == dict.fromkeys(["t0", "t1", "t2", "t3"], 8)
    assert all(d == D for d in handle.dims().values())
    # the resized tables are the ones the user's optimizer now steps
    weights = {id(p) for p in coll.ebc.parameters()}
    assert weights <= {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("check_interval", [1, 3])
def test_gate_every_k_runs_the_gate_step_and_the_check_on_every_kth_step(check_interval: int) -> None:
    cfg = DimGrowConfig(d_max=D, grow_threshold=0.3, shrink_threshold=0.001, check_interval=check_interval)
    cfg.gate_every = 2
    model, handle, opt = _attached(cfg)
    theta = handle.gate_parameters()[0]
    moved, checked = [], []
    for step in range(8):
        opt.zero_grad()
        model(make_batch(step))[0].backward()
        opt.step()
        before = theta.detach().clone()
        due = handle.gate_due()
        report = handle.step(make_batch(1000 + step))
        assert theta.grad is None, "a skipped step drops the stale training gradient of the gates"
        moved.append(not torch.equal(theta.detach(), before))
        checked.append(report is not None)
        assert due == moved[-1]
    assert moved == [False, True] * 4
    # check_interval 1: at every gate step; 3: at the first gate step at or after steps 3 and 6
    expected = (
        [False, True] * 4 if check_interval == 1 else [False, False, False, True, False, True, False, False]
    )
    assert checked == expected


def test_gate_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="gate_every"):
        DimGrowConfig(gate_every=0)


# ---------------------------------------------------------------------- export
@pytest.mark.parametrize("align", ["project", "pad"])
def test_export_into_a_fresh_dlrm(align: str) -> None:
    dims = {"t0": 3, "t1": 8, "t2": 0, "t3": 1}
    model = export(dlrm_train(), dims, align=align)
    coll = model.get_submodule(PATH)
    assert isinstance(coll, MixedDimEmbeddingBagCollection)
    assert coll.table_dims() == {"t0": 3, "t1": 8, "t3": 1}  # t2 dropped
    assert [c.embedding_dim for c in coll.embedding_bag_configs()] == [D] * 4
    assert type(coll.ebc) is EmbeddingBagCollection
    loss, (_, logits, _) = model(make_batch(0))
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (32,)
    pooled = coll(make_batch(0).sparse_features).to_dict()
    assert torch.all(pooled["f2"] == 0)  # a dropped field keeps its slot in DLRM's interaction, as zeros
    if align == "pad":
        assert torch.all(pooled["f0"][:, 3:] == 0)
    # a DLRM can also be built around the exported collection directly
    DLRM(
        embedding_bag_collection=coll,
        dense_in_features=3,
        dense_arch_layer_sizes=[8, D],
        over_arch_layer_sizes=[8, 1],
    )


def test_export_raw_is_a_plain_ebc_and_meta_stays_meta() -> None:
    raw = export_collection(tables(), {"t0": 2, "t1": 0, "t2": 5, "t3": 1}, align="raw")
    assert type(raw) is EmbeddingBagCollection
    assert [(c.name, c.embedding_dim) for c in raw.embedding_bag_configs()] == [
        ("t0", 2),
        ("t2", 5),
        ("t3", 1),
    ]
    model = export(dlrm_train(device="meta"), dict.fromkeys(["t0", "t1", "t2", "t3"], 4))
    assert all(p.device.type == "meta" for p in model.get_submodule(PATH).ebc.parameters())


def test_handle_export_replaces_the_searched_collection() -> None:
    model, handle, _ = _attached(DimGrowConfig(d_max=D))
    for step in range(2):
        handle.step(make_batch(step))
    found = handle.found_dims()
    assert set(found) == {"t0", "t1", "t2", "t3"}
    found["t0"] = max(found["t0"], 1)  # keep one table whatever the gates did
    exported = export(model, found, align="project")
    coll = exported.get_submodule(PATH)
    assert isinstance(coll, MixedDimEmbeddingBagCollection) and not list(
        m for m in exported.modules() if isinstance(m, DimGrowEmbeddingBagCollection)
    )
    assert torch.isfinite(exported(make_batch(5))[0])
