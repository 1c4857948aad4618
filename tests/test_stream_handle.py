"""Publishing from a user's own loop: ``DimGrowHandle.serving_weights`` + ``export`` + ``VersionPublisher``."""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tests.test_swap import ROWS, make_batch, tables
from torchrec_dimgrow.config import DimGrowConfig
from torchrec_dimgrow.online import load_into_mixed, write_version
from torchrec_dimgrow.swap import export, swap_in
from torchrec_dimgrow.training import bce
from torchrec_dimgrow.versions import VersionPublisher, read_latest

KEYS = [f"f{i}" for i in range(len(ROWS))]


class UserModel(nn.Module):
    """A user's model: KJT -> logits through one EBC (width 8 per feature) and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=tables(), device=torch.device("cpu"))
        self.over = nn.Linear(8 * len(ROWS), 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.over(self.ebc(features).values()).squeeze(-1)


def test_a_user_loop_publishes_the_searched_weights_at_the_found_dims(tmp_path: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = UserModel()
    cfg = DimGrowConfig(d_max=8, grow_threshold=0.3, shrink_threshold=0.001, gate_lr=0.05)
    handle = swap_in(model, cfg, align="project")
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    handle.attach(model, optimizer=opt, loss_fn=lambda m, b: bce(m(b.sparse_features), b.labels))
    for step in range(10):
        opt.zero_grad()
        bce(model(make_batch(step).sparse_features), make_batch(step).labels).backward()
        opt.step()
        handle.step(make_batch(1000 + step))
    coll = handle.collections["ebc"]
    assert handle.replans >= 1 and any(d > 4 for d in coll.dims_list())

    folded = handle.serving_weights()["ebc"]  # collective under DMP; here one process
    dims = handle.found_dims()
    assert folded.dims == dims and any(dims.values())
    served = export(UserModel(), dims, align="project")
    load_into_mixed(served.ebc, folded)
    served.over.load_state_dict(model.over.state_dict())
    publisher = VersionPublisher(tmp_path, keep=2)
    number, written = publisher.publish(1, 10, lambda d: write_version(d, served, KEYS, "fp32", 1, 10))
    assert (number, written) == (1, True) and read_latest(tmp_path) == "v1"

    # the trainer's own per-feature projection of its gated columns, noise 0, dropped gates 0
    kjt = make_batch(7).sparse_features
    with torch.no_grad():
        x, g, lay, _ = coll.post._active(coll.ebc(kjt))
        kept = torch.where(g > cfg.final_threshold, g, torch.zeros_like(g))
        expected = model.over(coll.post._project_per_feature(kept * x, lay)).squeeze(-1)
        scripted = torch.jit.load(str(tmp_path / "versions" / "v1" / "serving.pt"))
        got = scripted({"values": kjt.values(), "lengths": kjt.lengths()})
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
