"""Serving at the found dims: TorchRec's quantized ``EmbeddingBagCollection`` and a TorchScript artifact.

TorchRec serves embeddings with ``torchrec.quant.EmbeddingBagCollection`` (FBGEMM's
``IntNBitTableBatchedEmbeddingBagsCodegen`` inside), which takes mixed per-table dims but
refuses a table whose row is not a whole number of 2-byte units (``ncols needs to be
multiple of 2 Bytes``): at int8 an odd dim, at int4 a dim that is not a multiple of 4
(fp32/fp16 accept every dim; checked on fbgemm-gpu-cpu 1.8.0). Such a table is stored at the
smallest accepted width with zero columns appended, and :class:`ServedCollection` drops the
padded columns from the output, so the model downstream sees exactly the found dims. Dropped
fields (dim 0) have no table at all.

The artifact follows TorchRec's own inference path (``torchrec/inference/dlrm_predict.py``):
trace with ``torchrec.fx``, ``torch.jit.script``, save. Loading it needs ``torch`` and
``fbgemm_gpu`` (which registers the lookup ops) and nothing from this package::

    import torch, fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
    model = torch.jit.load("OUT/serving.pt")
    logits = model({"values": values, "lengths": lengths})

``values``/``lengths`` are a ``KeyedJaggedTensor``'s, keys in ``serving.json``'s
``input_features`` order (every field of the data, dropped ones included).

The saved model is :class:`~torchrec_dimgrow.serving_checks.CheckedServingModel`: it refuses a
malformed request before any lookup (:mod:`torchrec_dimgrow.serving_checks`). ``vocab.json``
beside the model maps raw values to row ids the way training did (:data:`VOCAB_RULE`).
"""

import copy
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.quantization as tq
import torchrec.fx
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes
from torch import nn
from torchrec.distributed.global_settings import set_propogate_device
from torchrec.distributed.types import ShardedModule, ShardingPlan
from torchrec.inference.modules import shard_quant_model
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    quant_prep_customize_row_alignment,
    quant_prep_enable_quant_state_dict_split_scale_bias,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_dimgrow.errors import UsageError
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.serving_checks import (
    ID_RULE_TEXT,
    REQUEST_RULES,
    CheckedServingModel,
    input_rows,
    skip_kernel_bounds_check,
)

SERVING_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
}
SPARSE_TYPES = {
    "fp32": SparseType.FP32,
    "fp16": SparseType.FP16,
    "int8": SparseType.INT8,
    "int4": SparseType.INT4,
}
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
# Row payload must be a whole number of 2-byte units: dims in units of 16 bits / bits per value.
DIM_UNIT = {"fp32": 1, "fp16": 1, "int8": 2, "int4": 4}
# TorchRec's sharded quant kernel aligns rows to 16 bytes on CUDA and to 1 byte elsewhere
# (torchrec/distributed/quant_embedding_kernel.py); the export follows the CPU choice.
CPU_ROW_ALIGNMENT = 1
ARTIFACT = "serving.pt"
META = "serving.json"
VOCAB = "vocab.json"
UNSEEN_ID = 0
"""Row of every raw value the train split did not keep (unseen or rare), as in training."""
VOCAB_RULE = (
    "row id = ids[field][token]; token = the raw value as text (an empty or null value is missing_token); "
    "a token not in ids[field] is unseen_id, the shared bucket training used for unseen values"
)


def check_serving(serving: str) -> str:
    if serving not in SERVING_DTYPES:
        raise UsageError(f"--serving: unknown value {serving!r} (choose from {', '.join(SERVING_DTYPES)})")
    return serving


def row_bytes(dim: int, serving: str, row_alignment: int = CPU_ROW_ALIGNMENT) -> int:
    """Bytes FBGEMM's inference kernel allocates per row (payload, int scale/bias, alignment)."""
    return int(rounded_row_size_in_bytes(dim, SPARSE_TYPES[check_serving(serving)], row_alignment))


def served_dim(dim: int, serving: str) -> int:
    """The smallest width >= ``dim`` that FBGEMM's inference kernel accepts at ``serving``."""
    unit = DIM_UNIT[check_serving(serving)]
    return -(-dim // unit) * unit


@dataclass(frozen=True)
class ServedTable:
    """One table as served: found dim, stored width, kernel bytes and the padding's share."""

    name: str
    rows: int
    dim: int
    served_dim: int
    bytes: int
    padding_bytes: int


class ServedCollection(nn.Module):
    """KJT -> ``KeyedTensor`` at the found dims, looked up in a quantized collection.

    Wraps ``torchrec.quant.EmbeddingBagCollection`` (tables at their served widths) and keeps
    only the real columns of padded tables, so it replaces the float collection it was built
    from without any change downstream.
    """

    def __init__(
        self, tables: QuantEmbeddingBagCollection, keys: list[str], dims: list[int], keep: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.tables = tables
        self.keys = keys
        self.dims = dims
        self.padded = keep is not None
        # Sharded (shard_for_inference) the lookup returns the features grouped by rank, so
        # they are picked by key; unsharded their order is the tables' and a slice suffices.
        self.by_key = False
        self.register_buffer("keep", keep if keep is not None else torch.zeros(0, dtype=torch.long))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.tables(features)
        if self.by_key:
            by_key = pooled.to_dict()
            values = torch.cat([by_key[k][:, :d] for k, d in zip(self.keys, self.dims)], dim=1)
        elif self.padded:
            values = pooled.values().index_select(1, self.keep)
        else:
            values = pooled.values()
        return KeyedTensor(keys=self.keys, length_per_key=self.dims, values=values)


def _zeros(w: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return w.zero_()


def quantize_collection(
    ebc: EmbeddingBagCollection, serving: str, row_alignment: int = CPU_ROW_ALIGNMENT
) -> tuple[ServedCollection, list[ServedTable]]:
    """``ebc``'s trained tables at ``serving`` precision, odd widths zero-padded (see module doc)."""
    dtype = SERVING_DTYPES[check_serving(serving)]
    configs: list[EmbeddingBagConfig] = list(ebc.embedding_bag_configs())
    padded_cfgs = [
        replace(c, embedding_dim=served_dim(c.embedding_dim, serving), init_fn=_zeros) for c in configs
    ]
    wide = EmbeddingBagCollection(
        tables=padded_cfgs, is_weighted=ebc.is_weighted(), device=torch.device("cpu")
    )
    with torch.no_grad():
        for c in configs:
            src = ebc.embedding_bags[c.name].weight
            wide.embedding_bags[c.name].weight[:, : c.embedding_dim].copy_(src.detach().float().cpu())
    wide.qconfig = tq.QConfig(  # type: ignore[assignment]
        activation=tq.PlaceholderObserver.with_args(dtype=torch.float),
        weight=tq.PlaceholderObserver.with_args(dtype=dtype),
    )
    quant_prep_customize_row_alignment(wide, [EmbeddingBagCollection], row_alignment)
    # Scale/bias as separate state-dict entries: the layout TorchRec's sharded quant modules
    # load (shard_for_inference copies the weights into them through the state dict).
    quant_prep_enable_quant_state_dict_split_scale_bias(wide)
    quant = QuantEmbeddingBagCollection.from_float(wide)
    keys: list[str] = []
    dims: list[int] = []
    keep: list[int] = []
    report: list[ServedTable] = []
    offset = 0
    for c, p in zip(configs, padded_cfgs):
        stored = c.num_embeddings * row_bytes(p.embedding_dim, serving, row_alignment)
        pad = c.num_embeddings * (p.embedding_dim - c.embedding_dim) * BITS[serving] // 8
        report.append(
            ServedTable(c.name, c.num_embeddings, c.embedding_dim, p.embedding_dim, int(stored), pad)
        )
        for feature in c.feature_names:
            keys.append(feature)
            dims.append(c.embedding_dim)
            keep.extend(range(offset, offset + c.embedding_dim))
            offset += p.embedding_dim
    any_padding = any(t.served_dim != t.dim for t in report)
    index = torch.tensor(keep, dtype=torch.long) if any_padding else None
    return ServedCollection(quant, keys, dims, index), report


def quantize_model(
    model: nn.Module, serving: str, row_alignment: int = CPU_ROW_ALIGNMENT
) -> tuple[nn.Module, list[ServedTable]]:
    """Replace every float ``EmbeddingBagCollection`` in ``model`` (in place) by a :class:`ServedCollection`.

    ``model`` holds the trained collections at the found dims (a retrained ``CTRModel``, or a
    DLRM after ``export`` + training: the mixed-dim collection's inner ``.ebc`` is replaced).
    """
    # Exact type: a DimGrow collection (a subclass) stores capacity widths, not found dims.
    targets = [(name, m) for name, m in model.named_modules() if type(m) is EmbeddingBagCollection]
    if not targets:
        raise ValueError("serving export: the model has no EmbeddingBagCollection to quantize")
    report: list[ServedTable] = []
    for name, module in targets:
        if name == "":
            raise ValueError("serving export: pass the model around the collection, not the collection")
        served, tables = quantize_collection(module, serving, row_alignment)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, served)
        report.extend(tables)
    return model, report


def quantize_at_dims(
    model: nn.Module,
    dims: Mapping[str, int] | Mapping[str, Mapping[str, int]],
    serving: str,
    row_alignment: int = CPU_ROW_ALIGNMENT,
) -> nn.Module:
    """``export(model, dims, serving=...)``: quantize a model already trained at ``dims``, in place.

    The search's export builds fresh tables to retrain; serving needs the *trained* ones, so
    every table named in ``dims`` must already be stored at its dim (a DimGrow collection,
    which stores capacity widths, or a sharded model is refused: export, retrain, then serve).
    """
    check_serving(serving)
    flat: dict[str, int] = {}
    for key, value in dims.items():
        flat.update(
            {k: int(v) for k, v in value.items()} if isinstance(value, Mapping) else {key: int(value)}
        )
    for name, m in model.named_modules():
        if isinstance(m, ShardedModule):
            raise ValueError(
                f"serving export: {name or 'the model'} is sharded; load the weights into an unsharded copy"
            )
        if isinstance(m, DimGrowEmbeddingBagCollection):
            raise ValueError(
                f"serving export: {name} is still a DimGrow collection; export(model, dims) and retrain first"
            )
        if type(m) is EmbeddingBagCollection:
            for c in m.embedding_bag_configs():
                if c.name in flat and flat[c.name] != c.embedding_dim:
                    raise ValueError(
                        f"serving export: table {c.name!r} is stored at dim {c.embedding_dim}, dims says {flat[c.name]}"
                    )
    quantize_model(model, serving, row_alignment)
    return model


def shard_for_inference(served: nn.Module, world_size: int = 2) -> tuple[nn.Module, ShardingPlan]:
    """``served`` (after :func:`quantize_model`) sharded by TorchRec's ``shard_quant_model`` on CPU.

    TorchRec's inference sharding runs in one process and places each table on one of
    ``world_size`` devices (``rank:r/cpu`` here, table-wise, quant kernel). On CPU it needs
    ``set_propogate_device(True)`` (a process-wide TorchRec setting, left on, as
    ``torchrec/inference/dlrm_predict.py`` does): without
    it the sharded lookups are built for ``cuda`` and fail with "Torch not compiled with CUDA
    enabled". The sharded tables start uninitialised; the weights are copied in through the
    state dict (scale/bias split, see :func:`quantize_collection`).
    """
    # Left on: the sharded module builds its input distribution at its first forward and
    # reads the flag then (dlrm_predict.py sets it once for the process, too).
    set_propogate_device(True)
    sharded, plan = shard_quant_model(
        copy.deepcopy(served), world_size=world_size, compute_device="cpu", sharding_device="cpu"
    )
    weights = {k: v for k, v in served.state_dict().items() if ".embedding_bags." in k}
    result = sharded.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"shard_for_inference: sharded model has no {result.unexpected_keys[:3]}")
    for m in sharded.modules():
        if isinstance(m, ServedCollection):
            m.by_key = True
    return sharded, plan


class ServingModel(nn.Module):
    """Plain-tensor entry point: ``{"values", "lengths"}`` of a KJT over ``input_features`` -> logits."""

    def __init__(self, model: nn.Module, input_features: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.input_features = list(input_features)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        features = KeyedJaggedTensor(
            keys=self.input_features, values=batch["values"], lengths=batch["lengths"]
        )
        return self.model(features)


def script(module: nn.Module) -> torch.jit.ScriptModule:
    """TorchRec's inference recipe: ``torchrec.fx`` trace, then ``torch.jit.script``."""
    module.eval()
    graph = torchrec.fx.symbolic_trace(module)
    scripted = torch.jit.script(graph)
    scripted.eval()
    return scripted


def serving_bytes(report: Sequence[ServedTable]) -> int:
    return int(sum(t.bytes for t in report))


def padding_bytes(report: Sequence[ServedTable]) -> int:
    return int(sum(t.padding_bytes for t in report))


def serving_vocab(
    prepared: Mapping[str, Any], input_features: Sequence[str], rows: Sequence[int], where: str
) -> dict[str, Any]:
    """``vocab.json`` of the export: raw token -> row id per input feature, plus the unseen rule.

    ``prepared`` is the prepared data's vocab (``data.store.load_vocab``). It must describe
    exactly the model's rows (id ``i`` of a ``n``-entry vocab is row ``i``, row 0 the shared
    bucket), or a client would score with the wrong rows; a mismatch is refused.
    """
    ids = prepared.get("vocab")
    if not isinstance(ids, Mapping) or list(prepared.get("fields", [])) != list(input_features):
        raise UsageError(f"{where}: its fields are not the model's {list(input_features)}")
    for f, n in zip(input_features, rows):
        if len(ids[f]) + 1 != n:
            raise UsageError(
                f"{where}: field {f!r} maps to {len(ids[f]) + 1} rows (bucket 0 included), the model has {n}"
            )
    return {
        "fields": list(input_features),
        "unseen_id": UNSEEN_ID,
        "missing_token": prepared.get("missing_token", "<missing>"),
        "rule": VOCAB_RULE,
        "ids": {f: dict(ids[f]) for f in input_features},
    }


def export_serving(
    model: nn.Module,
    input_features: Sequence[str],
    serving: str,
    out_dir: str | Path,
    row_alignment: int = CPU_ROW_ALIGNMENT,
    extra_meta: dict[str, Any] | None = None,
    field_rows: Mapping[str, int] | None = None,
    vocab: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/serving.pt`` (TorchScript), ``serving.json`` (and ``vocab.json``); return the metadata.

    ``model`` takes a KJT over ``input_features`` (it is copied, not changed). The artifact is
    :class:`CheckedServingModel`: it refuses malformed requests and ids outside their feature's
    rows (:func:`~torchrec_dimgrow.serving_checks.check_request`). ``field_rows`` gives the rows
    of features without a table (dropped fields); ``vocab`` (already checked by
    :func:`serving_vocab`) is written as ``vocab.json`` for clients holding raw values. The
    directory is assembled as ``out_dir.tmp`` and renamed when complete; an existing ``out_dir``
    is replaced only if it is an earlier export (it holds ``serving.json``) or empty.
    """
    check_serving(serving)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META).is_file())):
        raise UsageError(f"--out {out}: exists and is not an earlier serving export; refusing to overwrite")
    rows = input_rows(model, input_features, field_rows)
    served, report = quantize_model(copy.deepcopy(model), serving, row_alignment)
    skip_kernel_bounds_check(served)  # the request checks below cover it, exactly
    lookup = script(ServingModel(served, input_features))
    scripted = torch.jit.script(CheckedServingModel(lookup, input_features, rows))
    meta: dict[str, Any] = {
        "serving": serving,
        "input_features": list(input_features),
        "inputs": "dict: 'values' and 'lengths' of a KeyedJaggedTensor, keys in input_features order",
        "request": REQUEST_RULES,
        "rows": dict(zip(input_features, rows)),
        "out_of_range_ids": ID_RULE_TEXT,
        "output": "logits, one per example",
        "row_alignment": row_alignment,
        "serving_bytes": serving_bytes(report),
        "padding_bytes": padding_bytes(report),
        "tables": [asdict(t) for t in report],
        "vocab": VOCAB if vocab is not None else None,
        "loader": "import torch, fbgemm_gpu; model = torch.jit.load('serving.pt')",
        **(extra_meta or {}),
    }
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    scripted.save(str(tmp / ARTIFACT))
    (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    if vocab is not None:
        (tmp / VOCAB).write_text(json.dumps(vocab) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return meta
