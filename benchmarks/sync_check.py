"""Prove the DimGrow step never makes an accelerator wait on the host.

Runs DimGrow search steps (training forward/backward/optimizer step, then the gate step:
validation forward/backward/gate update) on one device inside
``torch.cuda.set_sync_debug_mode("error")``: any hidden host-device sync (``.item()``,
``.tolist()``, ``float(tensor)``, a blocking copy) raises there. Both consumers are checked:
the summed forward (``CTRModel``, one matmul) and the per-feature ``KeyedTensor`` forward a
DLRM reads. Between two checked blocks a grow and a shrink change the dims, so the first
forward after a change is checked too. The grow/shrink check itself (all-gather + decide)
reads the gates on the host by design and runs outside the checked region.

On CPU the sync mode is a no-op and the script is a smoke test of the same code path.

    python benchmarks/sync_check.py --device cuda          # what scripts/gpu_check.sh runs
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import quiet_logs


@contextlib.contextmanager
def no_host_sync(enabled: bool) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block when ``enabled``."""
    import torch

    if not enabled:
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def run(device: str, steps: int, batch_size: int, align_sum: bool) -> list[int]:
    """Checked search steps on ``device``; returns the dims at the end."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedTensor

    from torchrec_dimgrow.config import DimGrowConfig
    from torchrec_dimgrow.controller import DimGrowController
    from torchrec_dimgrow.data.synthetic import CriteoLikeConfig, criteo_like
    from torchrec_dimgrow.modules.backbone import CTRModel
    from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
    from torchrec_dimgrow.policy import DimChange
    from torchrec_dimgrow.training import bce

    torch.manual_seed(0)
    dev = torch.device(device)
    data = criteo_like(CriteoLikeConfig(scale=20_000, rows=4 * batch_size, seed=0))
    cfg = DimGrowConfig(d_max=16, initial_dim=4, grow_threshold=1.0, shrink_threshold=0.0)
    coll = DimGrowEmbeddingBagCollection(data.table_configs(16), cfg, align="project", device=dev)
    model: torch.nn.Module
    if align_sum:
        model = CTRModel(coll, "sum", 16, hidden=(16,)).to(dev)
    else:  # the DLRM-style consumer: per-feature outputs, concatenated
        n = len(coll.post.feature_names)

        class PerFeature(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.sparse = coll
                self.head = torch.nn.Linear(16 * n, 1)

            def forward(self, features: object) -> torch.Tensor:
                pooled: KeyedTensor = self.sparse(features)
                return self.head(pooled.values()).squeeze(-1)

        model = PerFeature().to(dev)
    theta = coll.post.gate.theta
    tables = list(coll.ebc.parameters())
    dense = [p for p in model.parameters() if all(p is not q for q in [theta, *tables])]
    opts = [torch.optim.Adagrad(tables, lr=0.05), torch.optim.Adam(dense, lr=1e-3)]
    ctrl = DimGrowController({"": coll}, local_optimizers=[opts[0]], dense_optimizers=[opts[1]])
    batches = [b.to(dev) for b in data.train.batches(batch_size, shuffle=True, seed=0, drop_last=True)]
    vbatches = [b.to(dev) for b in data.val.batches(batch_size, shuffle=True, seed=1)]

    def step(i: int) -> None:
        b, vb = batches[i % len(batches)], vbatches[i % len(vbatches)]
        for o in opts:
            o.zero_grad(set_to_none=True)
        bce(model(b.sparse_features), b.labels).backward()
        for o in opts:
            o.step()
        ctrl.clear_gate_grads()
        with ctrl.gate_mode():
            (bce(model(vb.sparse_features), vb.labels) + ctrl.penalty()).backward()
        ctrl.update_gates(add_penalty=False)

    step(0)  # warm-up outside the check: lazy allocations, library handles
    ctrl.end_step()
    blocks = [[], [DimChange(0, "grow", 4, 4, 5)], [DimChange(1, "shrink", 2, 4, 3)]]
    for changes in blocks:
        if changes:
            coll.apply_changes(changes, dense_optimizers=[opts[1], ctrl.gate_optimizer])
        with no_host_sync(dev.type == "cuda"):
            for i in range(steps):
                step(i)
        ctrl.end_step()  # the host reads happen here, outside the checked region
    return coll.post.dims_list()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/sync_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=3, help="checked steps per block")
    p.add_argument("--batch-size", type=int, default=512)
    args = p.parse_args(argv)
    quiet_logs()
    for align_sum in (True, False):
        dims = run(args.device, args.steps, args.batch_size, align_sum)
        consumer = "summed (CTRModel)" if align_sum else "per-feature (DLRM-style)"
        print(
            f"{consumer}: {3 * args.steps} checked steps on {args.device}, no host sync; dims {dims[:3]}..."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
