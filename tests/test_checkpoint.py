"""The checkpoint component's DCP save: views into shared buffers are written without a copy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from torchrec_dimgrow.checkpoint import AliasingSavePlanner


def _grouped_state() -> dict[str, torch.Tensor]:
    """Two 'tables' that are views into one flat buffer, as in a TBE holding both."""
    flat = torch.randn(40 * 6 + 30 * 4, generator=torch.Generator().manual_seed(0))
    return {"a": flat[: 40 * 6].view(40, 6), "b": flat[40 * 6 :].view(30, 4), "c": torch.arange(5)}


def _dcp_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix == ".distcp"}


def test_views_are_saved_without_clone_and_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _grouped_state()
    dcp.save(state, checkpoint_id=str(tmp_path / "default"), planner=DefaultSavePlanner())

    clones: list[int] = []
    clone = torch.Tensor.clone

    def counting_clone(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        clones.append(self.numel())
        return clone(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "clone", counting_clone)
    dcp.save(state, checkpoint_id=str(tmp_path / "aliased"), planner=AliasingSavePlanner())
    monkeypatch.undo()
    assert not [n for n in clones if n >= 30 * 4]  # neither table was copied
    assert _dcp_bytes(tmp_path / "aliased") == _dcp_bytes(tmp_path / "default")

    back = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(back, checkpoint_id=str(tmp_path / "aliased"))
    for k, v in state.items():
        assert torch.equal(back[k], v), k
