"""A user's ``isinstance(m, EmbeddingBagCollection)`` init hook and the DimGrow collection."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from torchrec_dimgrow import DimGrowConfig, DimGrowEmbeddingBagCollection


def collection() -> DimGrowEmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=20, feature_names=[f"f{i}"])
        for i in range(3)
    ]
    coll = DimGrowEmbeddingBagCollection(tables, DimGrowConfig(d_max=4), align="project")
    with torch.no_grad():
        for p in coll.gate_parameters():
            p.uniform_(-1.0, 1.0)  # trained-looking gate logits, not the constant init
    return coll


@torch.no_grad()
def torchrec_init_weights(m: nn.Module) -> None:
    """The init hook of TorchRec's ``DistributedModelParallel`` docstring, verbatim in spirit."""
    if isinstance(m, nn.Linear):
        m.weight.fill_(1.0)
    elif isinstance(m, EmbeddingBagCollection):
        for param in m.parameters():
            nn.init.kaiming_normal_(param)


def test_ebc_init_hook_initialises_the_tables_but_not_gates_or_projections() -> None:
    torch.manual_seed(0)
    coll = collection()
    model = nn.Sequential(nn.Linear(2, 2), coll)
    dense = {n: p.detach().clone() for n, p in coll.named_parameters() if not n.startswith("ebc.")}
    tables = {n: p.detach().clone() for n, p in coll.ebc.named_parameters()}
    assert any(n.startswith("post.projection") for n in dense) and "post.gate.theta" in dense
    with pytest.warns(UserWarning, match="post.gate.theta"):
        model.apply(torchrec_init_weights)
    for n, p in coll.named_parameters():
        if n in dense:
            assert torch.equal(p, dense[n]), f"{n} was re-initialised by the EBC hook"
    for n, p in coll.ebc.named_parameters():
        assert not torch.equal(p, tables[n]), f"the hook must still reach table {n}"
    assert torch.equal(model[0].weight, torch.ones(2, 2))


def test_a_hook_that_touches_only_the_tables_is_silent() -> None:
    torch.manual_seed(0)
    coll = collection()

    @torch.no_grad()
    def tables_only(m: nn.Module) -> None:
        if isinstance(m, EmbeddingBagCollection):
            for bag in m.embedding_bags.values():
                bag.weight.fill_(0.5)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        coll.apply(tables_only)
    assert all(
        torch.equal(b.weight, torch.full_like(b.weight, 0.5)) for b in coll.ebc.embedding_bags.values()
    )
