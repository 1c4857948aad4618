"""Per-rank bodies of the multi-process tests (importable by spawned processes)."""

from __future__ import annotations

from typing import Any

import torch
from torchrec import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.distributed.importance import check_agreement, gather_importance
from torchrec_dimgrow.distributed.planning import PlanningConfig
from torchrec_dimgrow.distributed.runtime import shard_model
from torchrec_dimgrow.distributed.shard_io import LocalPiece, TableView, copy_block
from torchrec_dimgrow.errors import RankDivergenceError
from torchrec_dimgrow.modules.backbone import CTRModel
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.optim import EmbeddingOptimizer
from torchrec_dimgrow.policy import DimChange

ROWS = [40, 64, 30]


def tables(dim: int = 8) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=r, feature_names=[f"f{i}"])
        for i, r in enumerate(ROWS)
    ]


def batch(seed: int, size: int) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, r, (size,), generator=g) for r in ROWS])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f{i}" for i in range(len(ROWS))],
        values=values,
        lengths=torch.ones(len(ROWS) * size, dtype=torch.int64),
    )
    labels = torch.randint(0, 2, (size,), generator=g).float()
    return kjt, labels


def kjt_rows(kjt: KeyedJaggedTensor, lo: int, hi: int) -> KeyedJaggedTensor:
    d = kjt.to_dict()
    keys = kjt.keys()
    values = torch.cat([d[k].values()[lo:hi] for k in keys])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=values, lengths=torch.ones(len(keys) * (hi - lo), dtype=torch.int64)
    )


def full_table(st: TableView) -> torch.Tensor:
    """Materialise a whole (possibly sharded) table on every rank, via the all-reduce gather."""
    out = torch.zeros(st.rows, st.cols)
    copy_block(
        st,
        TableView(st.rows, st.cols, ((0, 0, st.rows, st.cols, -2),), [LocalPiece(0, 0, out)]),
        list(range(st.cols)),
        list(range(st.cols)),
    )
    return out


def _grown(config: DimGrowConfig, dims: list[int], device: str = "cpu") -> DimGrowEmbeddingBagCollection:
    coll = DimGrowEmbeddingBagCollection(tables(), config, align="project", device=device)
    coll.post.dims.copy_(torch.tensor(dims))
    caps = [max(4, -(-d // 4) * 4) for d in dims]
    coll.post.capacity.copy_(torch.tensor(caps))
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    coll.ebc = EmbeddingBagCollection(coll.physical_configs(), device=torch.device(device))
    return coll


def sharded_matches_single(rank: int, world: int, sharding: str) -> dict[str, float]:
    """Sharded forward/backward (fused SGD) vs the unsharded module on the same weights."""
    torch.manual_seed(0)
    cfg = DimGrowConfig(d_max=8)
    dims = [3, 6, 1]
    ref_coll = _grown(cfg, dims)
    with torch.no_grad():
        ref_coll.post.gate.theta.uniform_(-0.5, 0.5)
    ref = CTRModel(ref_coll, "sum", adapter_dim=8, hidden=(8,), dropout=0.0)
    torch.manual_seed(1)
    coll = _grown(cfg, dims, device="meta")
    model = CTRModel(coll, "sum", adapter_dim=8, hidden=(8,), dropout=0.0)
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if ".ebc." not in k}, strict=False)
    lr = 0.1
    sharded = shard_model(
        model, torch.device("cpu"), PlanningConfig(sharding=sharding), EmbeddingOptimizer("sgd", lr)
    )
    store = sharded.stores["sparse"]
    weights, _ = store.views()
    for name, st in weights.items():
        ref_w = ref_coll.embedding_bags[name].weight.detach()
        copy_block(ref_w, st, list(range(ref_w.shape[1])), list(range(ref_w.shape[1])))
    kjt, labels = batch(seed=5, size=16)
    lo, hi = rank * 8, rank * 8 + 8
    dmp = sharded.dmp
    # forward, eval mode (deterministic mixing)
    dmp.eval()
    ref.eval()
    out = dmp(kjt_rows(kjt, lo, hi))
    ref_out = ref(kjt_rows(kjt, lo, hi))
    fwd_err = float((out - ref_out).abs().max())
    # one training step on per-rank mean losses; gradients are averaged over ranks
    dmp.train()
    ref.train()
    for m in (ref_coll, coll):
        m.post.train(False)  # same deterministic mixing in both, dense layers in train mode
    loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(kjt_rows(kjt, lo, hi)), labels[lo:hi])
    loss.backward()
    ref_loss = sum(
        torch.nn.functional.binary_cross_entropy_with_logits(ref(kjt_rows(kjt, a, a + 8)), labels[a : a + 8])
        for a in (0, 8)
    )
    ref_loss.backward()
    theta_err = float((coll.post.gate.theta.grad - ref_coll.post.gate.theta.grad / 2).abs().max())
    emb_err = 0.0
    with torch.no_grad():
        for name, st in store.views()[0].items():
            ref_w = ref_coll.embedding_bags[name].weight
            # TorchRec divides embedding gradients by the world size (comm_ops gradient
            # division), matching DDP's averaging of dense gradients.
            expected = ref_w - lr * ref_w.grad / world
            emb_err = max(emb_err, float((full_table(st) - expected).abs().max()))
    return {"forward": fwd_err, "theta_grad": theta_err, "embedding_update": emb_err}


def replan_is_bit_exact(rank: int, world: int, sharding: str) -> dict[str, Any]:
    """Force a capacity change; kept columns and Adagrad state must survive bit-exactly."""
    torch.manual_seed(0)
    cfg = DimGrowConfig(d_max=16)
    coll = _grown(cfg, [4, 3, 4], device="meta")
    model = CTRModel(coll, "sum", adapter_dim=8, hidden=(8,), dropout=0.0)
    sharded = shard_model(
        model, torch.device("cpu"), PlanningConfig(sharding=sharding), EmbeddingOptimizer("adagrad", 0.1)
    )
    store = sharded.stores["sparse"]
    dmp = sharded.dmp
    for step in range(3):
        kjt, labels = batch(seed=10 * step + rank, size=8)
        torch.nn.functional.binary_cross_entropy_with_logits(dmp(kjt), labels).backward()
    weights, states = store.views()
    before_w = {n: full_table(st) for n, st in weights.items()}
    before_s = {n: {k: full_table(s) for k, s in d.items()} for n, d in states.items()}
    old_module = store.sharded
    report = coll.apply_changes([DimChange(0, "grow", 4, 4, 5), DimChange(1, "grow", 3, 3, 4)], store)
    assert report.capacity_changes == {"t0": (4, 8)}, report.capacity_changes
    assert store.sharded is not old_module
    weights, states = store.views()
    after_w = {n: full_table(st) for n, st in weights.items()}
    after_s = {n: {k: full_table(s) for k, s in d.items()} for n, d in states.items()}
    exact = all(torch.equal(after_w[n][:, : before_w[n].shape[1]], before_w[n]) for n in before_w)
    state_exact = all(
        torch.equal(after_s[n][k][:, : before_s[n][k].shape[1]], before_s[n][k])
        for n in before_s
        for k in before_s[n]
    )
    new_cols_zero_state = all(torch.all(after_s["t0"][k][:, 4:] == 0) for k in after_s["t0"])
    shapes = {n: tuple(w.shape) for n, w in after_w.items()}
    # training continues after the re-plan, and the fused optimizer is the new one
    losses = []
    for step in range(3):
        kjt, labels = batch(seed=100 + step, size=8)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(kjt), labels)
        loss.backward()
        losses.append(float(loss))
    changed = not torch.equal(full_table(store.views()[0]["t0"])[:, :5], after_w["t0"][:, :5])
    fused_keys = sorted(dmp.fused_optimizer.state_dict()["state"].keys())
    return {
        "exact": exact,
        "state_exact": state_exact,
        "new_cols_zero_state": new_cols_zero_state,
        "shapes": shapes,
        "losses": losses,
        "trained_after": changed,
        "fused_keys": fused_keys,
        "plan": {n: p.sharding_type for n, p in dmp.plan.plan["sparse.ebc"].items()},
    }


def importance_and_agreement(rank: int, world: int) -> dict[str, Any]:
    local = torch.full((2, 3), float(rank))
    table = gather_importance(local)
    check_agreement([1, 2, 3])
    diverged = False
    try:
        check_agreement([1, 2, 3 + rank])
    except RankDivergenceError:
        diverged = True
    return {"table": table.tolist(), "diverged": diverged}


def different_data_same_dims(rank: int, world: int) -> list[int]:
    """Ranks train on different data; the gathered decisions keep their dims identical."""
    from torchrec_dimgrow.distributed.importance import ImportanceAccumulator
    from torchrec_dimgrow.policy import PolicyState, decide

    torch.manual_seed(0)
    cfg = DimGrowConfig(d_max=8, grow_threshold=0.5001, shrink_threshold=0.0, alpha=0.0)
    coll = DimGrowEmbeddingBagCollection(tables(), cfg, align="project", device="meta")
    model = CTRModel(coll, "sum", adapter_dim=8, hidden=(8,), dropout=0.0)
    sharded = shard_model(model, torch.device("cpu"), PlanningConfig(), EmbeddingOptimizer("adagrad", 0.1))
    dmp, store = sharded.dmp, sharded.stores["sparse"]
    gate_opt = torch.optim.Adam([coll.post.gate.theta], lr=0.05)
    policy = PolicyState(coll.post.dims_list())
    acc = ImportanceAccumulator(tuple(coll.post.gate.theta.shape))
    torch.manual_seed(1000 + rank)  # rank-specific shuffles too
    for step in range(40):
        kjt, labels = batch(seed=rank * 1000 + step, size=16)  # different data per rank
        gate_opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dmp(kjt), labels) + coll.penalty()
        loss.backward()
        gate_opt.step()
        acc.add(coll.gate_values())
        table = gather_importance(acc.mean())
        acc.reset()
        policy, changes = decide([table[t].tolist() for t in range(3)], policy, cfg)
        coll.apply_changes(changes, store, [gate_opt])
        check_agreement(coll.post.dims_list())
    return coll.post.dims_list() + coll.post.capacity_list()


def budgeted_controller_search(rank: int, world: int, budget: float) -> dict[str, Any]:
    """Sharded search through DimGrowController with a byte budget; ranks see different data.

    A grow threshold below the initial gate (0.5) makes every field ask to grow at every
    check, so the budget, not the gates, is what stops growth.
    """
    from torchrec_dimgrow.controller import DimGrowController

    torch.manual_seed(0)
    cfg = DimGrowConfig(d_max=8, grow_threshold=0.3, shrink_threshold=0.0, alpha=0.0, budget=budget)
    coll = DimGrowEmbeddingBagCollection(tables(), cfg, align="project", device="meta")
    model = CTRModel(coll, "sum", adapter_dim=8, hidden=(8,), dropout=0.0)
    sharded = shard_model(model, torch.device("cpu"), PlanningConfig(), EmbeddingOptimizer("adagrad", 0.1))
    ctrl = DimGrowController({"": coll}, stores={"": sharded.stores["sparse"]})
    torch.manual_seed(1000 + rank)
    used: list[int] = []
    for step in range(30):
        kjt, labels = batch(seed=rank * 1000 + step, size=16)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(sharded.dmp(kjt), labels)
        loss.backward()
        ctrl.update_gates()
        ctrl.end_step()
        used.append(coll.embedding_bytes(physical=False))
    found = coll.export_dims()
    return {
        "dims": coll.post.dims_list(),
        "capacity": coll.post.capacity_list(),
        "used": used,
        "budget": coll.budget_bytes(),
        "costs": coll.dim_costs(),
        "found_bytes": sum(c * found[n] for c, n in zip(coll.dim_costs(), coll.table_names)),
        "replans": ctrl.replans,
    }


def _replan_once(rank: int, sharding: str, optimizer: str, in_place: bool) -> dict[str, Any]:
    """Train two steps, then widen t0 (4 -> 8) and narrow t1 (8 -> 4) in one re-plan."""
    torch.manual_seed(0)
    coll = _grown(DimGrowConfig(d_max=16), [4, 5, 3], device="meta")  # capacities 4, 8, 4
    model = CTRModel(coll, "sum", adapter_dim=8, hidden=(8,), dropout=0.0)
    sharded = shard_model(
        model, torch.device("cpu"), PlanningConfig(sharding=sharding), EmbeddingOptimizer(optimizer, 0.1)
    )
    store, dmp = sharded.stores["sparse"], sharded.dmp
    store.rewidth_in_place = in_place
    for step in range(2):
        kjt, labels = batch(seed=10 * step + rank, size=8)
        torch.nn.functional.binary_cross_entropy_with_logits(dmp(kjt), labels).backward()
    store.resize({"t0": 8, "t1": 4}, std=0.1)
    weights, states = store.views()
    return {
        "weights": {n: full_table(v) for n, v in weights.items()},
        "states": {n: {k: full_table(s) for k, s in d.items()} for n, d in states.items()},
        "rng": torch.get_rng_state(),
        "in_place": store.last_in_place,
        "spilled": store.spilled_bytes,
    }


def rewidth_matches_spill(rank: int, world: int, sharding: str, optimizer: str) -> dict[str, Any]:
    """The same re-plan in memory and through the spill file: bit-identical tables and draws."""
    spill = _replan_once(rank, sharding, optimizer, in_place=False)
    mem = _replan_once(rank, sharding, optimizer, in_place=True)
    same_states = all(
        torch.equal(mem["states"][n][k], spill["states"][n][k])
        for n in spill["states"]
        for k in spill["states"][n]
    )
    w0 = mem["weights"]["t0"]
    return {
        "same_weights": all(torch.equal(mem["weights"][n], w) for n, w in spill["weights"].items()),
        "same_states": same_states,
        "same_rng": torch.equal(mem["rng"], spill["rng"]),
        "in_place": mem["in_place"],
        "spill_in_place": spill["in_place"],
        "spilled": mem["spilled"],
        "new_cols_drawn": bool(w0[:, 4:].std() > 0.05),
        "shapes": {n: tuple(w.shape) for n, w in mem["weights"].items()},
    }


def leave_after_peer(rank: int, world: int, marker: str) -> dict[str, Any]:
    """Rank 1 is slow to finish; rank 0 must not leave the group before it (the barrier)."""
    import os
    import time

    import torch.distributed as dist

    from torchrec_dimgrow.distributed.env import destroy_distributed

    if rank == 1:
        time.sleep(1.0)
        with open(marker, "w") as f:
            f.write("done")
    destroy_distributed(synchronize=True)
    return {"peer_done": os.path.exists(marker), "left": not dist.is_initialized()}
