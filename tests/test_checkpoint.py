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


def _checkpoint_like(directory: Path) -> dict[str, int]:
    """Files shaped like a 3-rank checkpoint: one big DCP shard per rank, small rank files."""
    sizes = {
        "dcp/__0_0.distcp": 9000,
        "dcp/__1_0.distcp": 7000,
        "dcp/__2_0.distcp": 8000,
        "dcp/.metadata": 300,
        "rank0.pt": 500,
        "rank1.pt": 500,
        "rank2.pt": 500,
        "search_state.json": 80,
    }
    for name, size in sizes.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return sizes


def test_file_shares_split_every_file_once_with_balanced_bytes(tmp_path: Path) -> None:
    """Each rank hashes one share of the checkpoint; together they must cover every file once."""
    from torchrec_dimgrow.manifest import file_shares

    sizes = _checkpoint_like(tmp_path)
    shares = file_shares(tmp_path, 3)
    names = [str(p.relative_to(tmp_path)) for share in shares for p in share]
    assert sorted(names) == sorted(sizes)  # every file, none twice
    loads = [sum(sizes[str(p.relative_to(tmp_path))] for p in share) for share in shares]
    assert max(loads) - min(loads) <= 2000, loads  # one big shard each, small files fill in
    assert all(any(p.suffix == ".distcp" for p in share) for share in shares)
    assert file_shares(tmp_path, 3) == shares  # every rank derives the same split
    assert [len(s) for s in file_shares(tmp_path, 1)] == [len(sizes)]
    assert file_shares(tmp_path, 12)[8:] == [[], [], [], []]  # more ranks than files: idle ranks
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        file_shares(tmp_path, 0)


def test_manifest_from_shares_equals_one_process_hashing_and_refuses_a_gap(tmp_path: Path) -> None:
    import json

    from torchrec_dimgrow.manifest import MANIFEST, file_shares, hash_files, verify, write_manifest

    _checkpoint_like(tmp_path)
    meta = {"config": {}, "data": {}, "world_size": 3, "step": 7}
    write_manifest(tmp_path, **meta)
    serial = json.loads((tmp_path / MANIFEST).read_text())["files"]
    gathered: dict[str, dict[str, object]] = {}
    for share in file_shares(tmp_path, 3):
        gathered.update(hash_files(tmp_path, share))
    write_manifest(tmp_path, entries=gathered, **meta)  # type: ignore[arg-type]
    assert json.loads((tmp_path / MANIFEST).read_text())["files"] == serial
    assert verify(tmp_path).manifest["step"] == 7
    gathered.pop("rank1.pt")  # a rank's share lost: that file would escape verification
    with pytest.raises(RuntimeError, match=r"no hash for \['rank1.pt'\]"):
        write_manifest(tmp_path, entries=gathered, **meta)  # type: ignore[arg-type]


def test_verify_hashes_only_its_share_but_checks_every_size(tmp_path: Path) -> None:
    from torchrec_dimgrow.errors import CheckpointError
    from torchrec_dimgrow.manifest import share_of, verify, write_manifest

    _checkpoint_like(tmp_path)
    write_manifest(tmp_path, config={}, data={}, world_size=2, step=3)
    manifest = verify(tmp_path).manifest
    shares = [share_of(manifest, r, 2) for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == sorted(manifest["files"]) and not set(shares[0]) & set(shares[1])
    victim = tmp_path / shares[1][0]  # same size, one byte flipped: only a hash can tell
    blob = bytearray(victim.read_bytes())
    blob[0] ^= 0xFF
    victim.write_bytes(bytes(blob))
    verify(tmp_path, share=(0, 2))  # not rank 0's file to hash
    for share in ((1, 2), None):
        with pytest.raises(CheckpointError, match="sha256 mismatch"):
            verify(tmp_path, share=share)
    victim.write_bytes(bytes(blob[:-5]))  # truncated: every rank sees the size
    for share in ((0, 2), (1, 2)):
        with pytest.raises(CheckpointError, match="truncated"):
            verify(tmp_path, share=share)


def test_select_follows_the_ranks_agreed_verdict(tmp_path: Path) -> None:
    """Rank 0's share of the latest checkpoint is intact, rank 1's is not: both fall back."""
    from torchrec_dimgrow.errors import CheckpointError
    from torchrec_dimgrow.manifest import LATEST, PREVIOUS, select, write_manifest

    for name, step in ((LATEST, 2), (PREVIOUS, 1)):
        _checkpoint_like(tmp_path / name)
        write_manifest(tmp_path / name, config={}, data={}, world_size=2, step=step)
    rank1_says = "checkpoint/rank1.pt: sha256 mismatch"
    verdicts = iter([[None, rank1_says], [None, None]])  # latest, then previous
    found = select(tmp_path, share=(0, 2), agree=lambda mine: next(verdicts))
    assert found.path == tmp_path / PREVIOUS and found.fell_back and found.manifest["step"] == 1
    assert select(tmp_path, share=(0, 2), agree=lambda mine: [mine, None]).path == tmp_path / LATEST
    with pytest.raises(CheckpointError, match=r"rank1\.pt: sha256 mismatch"):
        select(tmp_path, share=(0, 2), agree=lambda mine: [mine, rank1_says])
