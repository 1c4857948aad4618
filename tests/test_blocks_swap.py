"""The DLRM handle over frequency blocks: swap_in(..., blocks=...), a local search, export."""

from __future__ import annotations

import pytest
import torch

from tests.test_swap import PATH, ROWS, dlrm_train, make_batch
from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.data.blocks import FieldBlocks
from torchrec_dimgrow.modules.blocks import BlockDimGrowCollection
from torchrec_dimgrow.modules.mixed_dim import MixedDimEmbeddingBagCollection
from torchrec_dimgrow.swap import swap_in

FEATURES = [f"f{i}" for i in range(len(ROWS))]
BLOCKS = FieldBlocks(FEATURES, list(ROWS), [[0, 10], [0, 5, 20], [0], [0]])


def test_swap_in_with_blocks_keeps_one_feature_per_field_and_searches_per_block() -> None:
    torch.manual_seed(0)
    model = dlrm_train()
    cfg = DimGrowConfig(d_max=8, grow_threshold=0.3, shrink_threshold=0.001, check_interval=1)
    handle = swap_in(model, cfg, align="project", blocks=BLOCKS)
    sparse = model.get_submodule(PATH)
    assert isinstance(sparse, BlockDimGrowCollection)
    assert list(handle.collections) == [f"{PATH}.coll"]
    assert handle.collections[f"{PATH}.coll"].table_names == BLOCKS.names()
    batch = make_batch(0)
    pooled = sparse(batch.sparse_features)
    assert pooled.keys() == FEATURES and pooled.length_per_key() == [8] * len(FEATURES)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    handle.attach(model, optimizer=opt)
    for step in range(10):
        opt.zero_grad()
        loss = model(make_batch(step))[0]
        loss.backward()
        opt.step()
        handle.step(make_batch(1000 + step))
    assert handle.replans >= 1
    assert set(handle.dims()) == set(BLOCKS.names()) and max(handle.dims().values()) > 4
    found = handle.found_dims()
    exported = handle.export()  # the unsharded swapped model: the remap and the sum stay
    block_sparse = exported.get_submodule(PATH)
    assert isinstance(block_sparse, BlockDimGrowCollection)
    assert isinstance(block_sparse.coll, MixedDimEmbeddingBagCollection)
    out = block_sparse(batch.sparse_features)
    assert out.keys() == FEATURES and out.length_per_key() == [8] * len(FEATURES)
    per_block = block_sparse.coll(block_sparse.remap(batch.sparse_features)).to_dict()
    torch.testing.assert_close(
        out.to_dict()["f1"], per_block["f1__b0"] + per_block["f1__b1"] + per_block["f1__b2"]
    )
    assert torch.isfinite(exported(batch)[0])
    assert sorted(found) == sorted(BLOCKS.names())


def test_swap_in_refuses_blocks_that_do_not_fit_the_collection() -> None:
    with pytest.raises(ValueError, match="vocab sizes"):
        swap_in(dlrm_train(), blocks=FieldBlocks(FEATURES, [31, 50, 20, 40], [[0], [0], [0], [0]]))
    with pytest.raises(ValueError, match="fields"):
        swap_in(dlrm_train(), blocks=FieldBlocks(["x", "f1", "f2", "f3"], list(ROWS)))
