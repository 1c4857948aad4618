"""A retrained model on disk: its spec (what rebuilds it) and its weights (through DCP).

Layout of ``DIR/model/``:

* ``spec.json``: fields, vocab sizes, found dims and the backbone settings, i.e. everything
  :func:`build_model` needs to rebuild the same ``CTRModel`` without the data;
* ``dcp/``: the state dict written by ``torch.distributed.checkpoint``;
* ``manifest.json``: sha256 and size of every other file and the data's per-field vocab
  fingerprint (``torchrec_dimgrow/manifest.py``, the machinery of search checkpoints):
  ``evaluate`` and ``export`` verify the directory before loading it.

DCP is used even for the single-process retrain because it is what a DMP-sharded model
must use (each rank writes the shards it owns, no gather to one rank), and a DCP checkpoint
loads into any world size: the unsharded ``evaluate``/``export`` read a 2-rank save the same
way they read a 1-rank one. Saving is collective when a process group is up.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from torchrec_dimgrow.data.blocks import FieldBlocks
from torchrec_dimgrow.diskwrite import agreed_write, deferred_sigint, disk_errors
from torchrec_dimgrow.errors import CheckpointError, ModelError
from torchrec_dimgrow.manifest import MANIFEST, Verified, verify, write_manifest
from torchrec_dimgrow.modules.backbone import CTRModel
from torchrec_dimgrow.modules.blocks import BlockLookup
from torchrec_dimgrow.modules.tables import normal_init

MODEL_SUBDIR = "model"
SPEC_FILE = "spec.json"
WEIGHTS_SUBDIR = "dcp"
SPEC_VERSION = 1
MODEL_KIND = "saved_model"
"""``config.kind`` of a saved model's manifest (a search checkpoint's records its flags)."""


@dataclass(frozen=True)
class ModelSpec:
    """What rebuilds a retrained ``CTRModel``: tables at the found dims plus the backbone."""

    fields: list[str]
    vocab_sizes: list[int]
    dims: dict[str, int]
    adapter_dim: int = 64
    hidden: list[int] = field(default_factory=lambda: [64, 32, 16])
    dropout: float = 0.2
    version: int = SPEC_VERSION
    # Frequency blocks (data/blocks.py): first id of each block per field; ``dims`` is then
    # per block (``FieldBlocks.names()``). ``None``: one table per field.
    blocks: dict[str, list[int]] | None = None

    def field_blocks(self) -> FieldBlocks | None:
        if self.blocks is None:
            return None
        return FieldBlocks(
            list(self.fields), list(self.vocab_sizes), [list(self.blocks[f]) for f in self.fields]
        )

    def table_rows(self) -> dict[str, int]:
        """Rows of every table (kept or not): per field, or per block."""
        fb = self.field_blocks()
        return fb.vocab() if fb is not None else dict(zip(self.fields, self.vocab_sizes, strict=True))

    def table_configs(self) -> list[EmbeddingBagConfig]:
        """One table per kept field or block (dim > 0), in field order: the retrain model's tables."""
        return [
            EmbeddingBagConfig(name=t, embedding_dim=self.dims[t], num_embeddings=n, feature_names=[t])
            for t, n in self.table_rows().items()
            if self.dims[t] > 0
        ]

    def validate(self, where: str) -> None:
        if len(self.fields) != len(self.vocab_sizes):
            raise ModelError(f"{where}: {len(self.fields)} fields but {len(self.vocab_sizes)} vocab sizes")
        if self.blocks is not None and sorted(self.blocks) != sorted(self.fields):
            raise ModelError(f"{where}: blocks do not name exactly the fields")
        try:
            names = list(self.table_rows())
        except ValueError as err:
            raise ModelError(f"{where}: {err}") from err
        if sorted(self.dims) != sorted(names):
            raise ModelError(f"{where}: dims do not name exactly the {'blocks' if self.blocks else 'fields'}")
        bad = {f: d for f, d in self.dims.items() if not isinstance(d, int) or d < 0}
        if bad:
            raise ModelError(f"{where}: invalid dims {bad}")
        if not any(self.dims.values()):
            raise ModelError(f"{where}: every field has dim 0")


def build_model(spec: ModelSpec, device: torch.device | str = "cpu", init_std: float = 0.01) -> CTRModel:
    """The retrain model of ``spec``: a stock EBC at the found dims, concat, adapter, WideDeep."""
    dev = torch.device(device)
    configs = spec.table_configs()
    if not configs:
        raise ValueError("every field has dim 0: nothing to build")
    for c in configs:
        c.init_fn = normal_init(init_std)
    ebc = EmbeddingBagCollection(tables=configs, device=dev)
    in_dim = sum(c.embedding_dim for c in configs)
    fb = spec.field_blocks()
    sparse: nn.Module = BlockLookup(fb, ebc) if fb is not None and fb.split else ebc
    model = CTRModel(
        sparse, "concat", spec.adapter_dim, in_dim=in_dim, hidden=spec.hidden, dropout=spec.dropout
    )
    if dev.type != "meta":
        model.to(dev)
    return model


def spec_for(
    fields: Sequence[str],
    vocab_sizes: Sequence[int],
    dims: Mapping[str, int],
    blocks: FieldBlocks | None = None,
    **backbone: Any,
) -> ModelSpec:
    names = blocks.names() if blocks is not None else list(fields)
    return ModelSpec(
        fields=list(fields),
        vocab_sizes=[int(v) for v in vocab_sizes],
        dims={t: int(dims[t]) for t in names},
        blocks=blocks.to_dict() if blocks is not None else None,
        **backbone,
    )


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """DCP warns when no process group is up; for the unsharded save/load that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def save_model(
    model: nn.Module, spec: ModelSpec, out_dir: str | Path, vocab: Mapping[str, str] | None = None
) -> Path:
    """Write ``spec``, ``model``'s weights and a manifest to ``out_dir/model`` (collective under DMP).

    ``model`` is a plain ``CTRModel`` or a ``DistributedModelParallel`` around one (its
    ``state_dict`` keys are the unwrapped names, its tables ``ShardedTensor``\\ s, which DCP
    writes rank by rank). ``vocab``: the data's per-field vocab fingerprint
    (:func:`~torchrec_dimgrow.manifest.vocab_fingerprint`), recorded so that ``evaluate``
    refuses data whose ids mean other values. The directory is written as ``model.tmp``
    and renamed when complete, so a crash never leaves a half model that looks whole; a
    full disk is one :class:`~torchrec_dimgrow.errors.DiskError` and no ``model.tmp``.
    """
    spec.validate("save_model")
    final = Path(out_dir) / MODEL_SUBDIR
    tmp = final.with_name(final.name + ".tmp")
    world = dist.get_world_size() if dist.is_initialized() else 1
    with disk_errors(final, partial=[tmp] if _is_main() else []):
        agreed_write(final, lambda: _start(tmp), world)
        with _single_process_is_intended():
            dcp.save(model.state_dict(), checkpoint_id=str(tmp / WEIGHTS_SUBDIR))  # shares failures itself
        agreed_write(final, lambda: _publish(tmp, final, spec, vocab, world), world)
    return final


def _start(tmp: Path) -> None:
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)


def _publish(tmp: Path, final: Path, spec: ModelSpec, vocab: Mapping[str, str] | None, world: int) -> None:
    """Rank 0: the spec and the manifest, then the rename that makes ``tmp`` the model."""
    if not _is_main():
        return
    raw = {k: v for k, v in asdict(spec).items() if k != "blocks" or v is not None}  # field models: as before
    (tmp / SPEC_FILE).write_text(json.dumps(raw, indent=2) + "\n")
    data = {"vocab_fields": dict(vocab) if vocab is not None else None}
    write_manifest(tmp, config={"kind": MODEL_KIND}, data=data, world_size=world, step=0)
    with deferred_sigint():
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)


def resolve_model_dir(path: str | Path) -> Path:
    """``path`` itself if it holds a saved model (``spec.json`` or ``manifest.json``), else
    ``path/model``; ModelError if neither."""
    path = Path(path)
    for candidate in (path, path / MODEL_SUBDIR):
        if (candidate / SPEC_FILE).is_file() or (candidate / MANIFEST).is_file():
            return candidate
    if not path.exists():
        raise ModelError(f"model directory not found: {path}")
    raise ModelError(f"{path}: no saved model ({SPEC_FILE} missing; run retrain first)")


def verify_model(model_dir: str | Path) -> Verified:
    """Check every file of a saved model against its manifest before anything is loaded.

    A missing, extra or changed file is one :class:`ModelError` naming it (instead of a
    chained ``FileNotFoundError`` from inside DCP). A model saved before models carried a
    manifest is refused: nothing could tell a damaged weight shard or data with other ids
    from a good run, and ``retrain`` rewrites it in the current layout.
    """
    root = resolve_model_dir(model_dir)
    if not (root / MANIFEST).is_file():
        raise ModelError(
            f"{root}: no {MANIFEST} (saved by an older version): its files and vocab cannot be "
            "verified; run retrain again to save it with one"
        )
    try:
        found = verify(root, what="saved model")
    except CheckpointError as err:
        raise ModelError(str(err)) from err
    if found.config.get("kind") != MODEL_KIND:
        raise ModelError(f"{root / MANIFEST}: not the manifest of a saved model (a search checkpoint?)")
    return found


def saved_vocab(found: Verified) -> dict[str, str] | None:
    """The per-field vocab fingerprint a verified model was trained with (``None``: not recorded)."""
    vocab = found.manifest.get("data", {}).get("vocab_fields")
    return dict(vocab) if vocab else None


def read_spec(model_dir: str | Path) -> ModelSpec:
    path = resolve_model_dir(model_dir) / SPEC_FILE
    try:
        raw = json.loads(path.read_text())
        spec = ModelSpec(**raw)
    except (OSError, json.JSONDecodeError, TypeError) as exc:
        raise ModelError(f"{path}: unreadable model spec ({str(exc).splitlines()[0]})") from exc
    if spec.version != SPEC_VERSION:
        raise ModelError(f"{path}: spec version {spec.version}, this package reads {SPEC_VERSION}")
    spec.validate(str(path))
    return spec


def _check_weights(weights: Path, expected: Mapping[str, torch.Tensor]) -> None:
    """Compare the checkpoint's tensor names and shapes with the model built from the spec."""
    try:
        meta = dcp.FileSystemReader(str(weights)).read_metadata().state_dict_metadata
    except Exception as exc:  # any unreadable checkpoint is one user error
        raise ModelError(f"{weights}: unreadable weights ({type(exc).__name__})") from exc
    missing = sorted(set(expected) - set(meta))
    extra = sorted(set(meta) - set(expected))
    if missing or extra:
        raise ModelError(
            f"{weights}: weights do not match spec.json (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for name, tensor in expected.items():
        size = getattr(meta[name], "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise ModelError(
                f"{weights}: {name} has shape {tuple(size)} but spec.json implies {tuple(tensor.shape)}"
            )


def load_model(model_dir: str | Path) -> tuple[CTRModel, ModelSpec]:
    """Rebuild the model from ``spec.json`` and load its weights (any saving world size)."""
    root = resolve_model_dir(model_dir)
    spec = read_spec(root)
    model = build_model(spec)
    weights = root / WEIGHTS_SUBDIR
    if not weights.is_dir():
        raise ModelError(f"{weights}: weights missing")
    state = model.state_dict()
    _check_weights(weights, state)
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=str(weights))
    model.load_state_dict(state)
    model.eval()
    return model, spec
