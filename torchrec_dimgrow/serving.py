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

The saved model is :class:`CheckedServingModel`: :func:`check_request` refuses a malformed
request (missing or extra keys, dtypes other than int32/int64, tensors that are not dense, 1-D
and on the model's device, negative or oversized lengths, a length count that is not features x
batch, lengths that do not sum to the number of values, ids outside ``[0, rows)`` of their
feature, dropped fields included) with ``ValueError("serving request: ...")`` (from Python a
``torch.jit.Error`` whose last line carries it) before any lookup, because FBGEMM's
kernel trusts its input: a huge length crashes the process, and an out-of-range id becomes
row 0 (or, ``-1``, is skipped) in a normal-looking logit. Out-of-range ids raise rather than go to
the shared bucket (see :data:`ID_RULE_TEXT`). ``vocab.json`` beside the model maps raw values
to row ids the way training did (:data:`VOCAB_RULE`).
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
REQUEST_RULES = (
    "values and lengths: dense 1-D int32 or int64 tensors on the model's device, no other keys; "
    "lengths feature-major, len(input_features) x batch entries, each >= 0, summing to len(values); "
    "every id in [0, rows[feature]). "
    "An empty batch (both empty) returns an empty tensor. Anything else raises ValueError "
    "('serving request: ...'; from Python a torch.jit.Error) before any lookup"
)
ID_RULE_TEXT = (
    "raise: an id outside [0, rows[feature]) is refused (dropped fields included), never looked up; "
    "map raw values with vocab.json, where unseen values get unseen_id"
)
"""Why raise rather than map to the bucket: training never produced such an id (the vocab maps
every unseen raw value to row 0 before the model sees it), so one is a client bug, which a
bucket would hide; FBGEMM alone swaps it for row 0 with a log line (``-1`` it skips silently)
and returns a normal-looking logit. Dropped fields are checked too: their ids come from the same vocab."""


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


def _dtype_name(t: torch.Tensor) -> str:
    """TorchScript formats a dtype as its enum number; name the ones a client is likely to send."""
    names = [
        (torch.float32, "float32"),
        (torch.float64, "float64"),
        (torch.float16, "float16"),
        (torch.bfloat16, "bfloat16"),
        (torch.bool, "bool"),
        (torch.int8, "int8"),
        (torch.uint8, "uint8"),
        (torch.int16, "int16"),
        (torch.complex64, "complex64"),
    ]
    for dtype, name in names:
        if t.dtype == dtype:
            return name
    return f"dtype code {t.dtype}"


def _request_tensor(batch: dict[str, torch.Tensor], key: str, device: torch.device) -> torch.Tensor:
    """``batch[key]``, checked to be a dense 1-D int32/int64 tensor on the model's ``device``
    (what the lookup kernel indexes with)."""
    if key not in batch:
        raise ValueError(f"serving request: missing key '{key}' (expected 'values' and 'lengths')")
    t = batch[key]
    if t.dtype != torch.int64 and t.dtype != torch.int32:
        raise ValueError(f"serving request: {key} must be int32 or int64, got {_dtype_name(t)}")
    if t.layout != torch.strided:
        raise ValueError(f"serving request: {key} must be a dense (strided) tensor")
    if t.device != device:
        raise ValueError(f"serving request: {key} is on {t.device}, the model on {device}")
    if t.dim() != 1:
        raise ValueError(f"serving request: {key} must be 1-D, got shape {t.shape}")
    return t if t.is_contiguous() else t.contiguous()


def check_request(
    batch: dict[str, torch.Tensor], features: list[str], rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refuse a malformed request before any lookup; return its (contiguous) values and lengths.

    Each check bounds the next, so none of them can itself fail on a hostile request: every
    length is first compared with the number of values sent (no length reaches 2^30 unless
    that many values arrived), which also keeps their int64 sums from overflowing. Ids are
    then compared with their feature's rows: with equal bags through a per-feature ``amax``
    and a global ``min``, otherwise through a per-id limit (:func:`_ids_in_range`). On a
    well-formed request that is a few vectorised passes over the input; only a refusal pays
    for locating the offending entry.
    """
    for key in batch.keys():
        if key != "values" and key != "lengths":
            raise ValueError(f"serving request: unexpected key '{key}' (expected 'values' and 'lengths')")
    values = _request_tensor(batch, "values", rows.device)
    lengths = _request_tensor(batch, "lengths", rows.device)
    num_features = len(features)
    n = lengths.numel()
    m = values.numel()
    if n % num_features != 0:
        raise ValueError(
            f"serving request: lengths has {n} entries, not a multiple of the {num_features} input features "
            "(one length per feature and example, feature-major)"
        )
    if n == 0:
        if m != 0:
            raise ValueError(f"serving request: values has {m} entries but the batch is empty")
        return values, lengths
    low, high = torch.aminmax(lengths)
    shortest, longest = int(low), int(high)
    if shortest < 0:
        at = int(torch.nonzero(lengths < 0)[0, 0])
        raise ValueError(f"serving request: lengths: negative length {int(lengths[at])} at position {at}")
    if longest > m:
        at = int(torch.nonzero(lengths > m)[0, 0])
        raise ValueError(
            f"serving request: lengths: length {int(lengths[at])} at position {at} exceeds the {m} values sent"
        )
    # Every length is in [0, m], so neither product nor sums can overflow int64.
    if shortest == longest:  # equal bags (one id each, typically): feature f owns row f of this view
        total = shortest * n
        if total != m:
            raise ValueError(f"serving request: values has {m} entries but the lengths sum to {total}")
        if m == 0:
            return values, lengths
        # A per-feature amax and one global min: on CPU each is cheaper than one aminmax(dim=1).
        highest = values.view(num_features, m // num_features).amax(1)
        if int(values.min()) < 0 or bool((highest >= rows).any()):
            _raise_for_id(values, lengths.view(num_features, -1).sum(1, dtype=torch.int64), rows, features)
        return values, lengths
    per_feature = lengths.view(num_features, -1).sum(1, dtype=torch.int64)  # ids of each feature
    total = int(per_feature.sum())
    if total != m:
        raise ValueError(f"serving request: values has {m} entries but the lengths sum to {total}")
    if not _ids_in_range(values, per_feature, rows):
        _raise_for_id(values, per_feature, rows, features)
    return values, lengths


def _ids_in_range(values: torch.Tensor, per_feature: torch.Tensor, rows: torch.Tensor) -> bool:
    """Every id in ``[0, rows)`` of its feature (bags of any size): one per-id limit, one pass.

    ``rows - 1 - id`` and ``id`` are both >= 0 exactly when the id is in range, so the sign
    bit of their OR flags both ends at once. The subtraction cannot overflow for ids >= 0,
    and a negative id carries the sign bit itself.
    """
    last = (rows - 1).repeat_interleave(per_feature, output_size=values.numel())
    return int(last.sub_(values).bitwise_or_(values).min()) >= 0


def _raise_for_id(
    values: torch.Tensor, per_feature: torch.Tensor, rows: torch.Tensor, features: list[str]
) -> None:
    """The error for the first id outside its feature's rows (only on a refused request)."""
    limit = rows.repeat_interleave(per_feature, output_size=values.numel())
    at = int(torch.nonzero(torch.logical_or(values < 0, values >= limit))[0, 0])
    f = int(torch.searchsorted(per_feature.cumsum(0), at, right=True))
    raise ValueError(
        f"serving request: values: id {int(values[at])} at position {at} (feature '{features[f]}') "
        f"is outside [0, {int(rows[f])})"
    )


class CheckedServingModel(nn.Module):
    """The artifact's entry point: :func:`check_request`, then the lookup model (``.model``).

    Scripted around the already scripted :class:`ServingModel` (whose ``torchrec.fx`` trace
    cannot hold data-dependent checks), so every caller of ``serving.pt`` gets the checks and
    ``.model`` stays callable without them (the benchmark's baseline). An empty batch (no
    lengths, no values) returns an empty float tensor without running the model.
    """

    rows: torch.Tensor

    def __init__(self, model: nn.Module, input_features: Sequence[str], rows: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.input_features = list(input_features)
        self.register_buffer("rows", torch.tensor([int(r) for r in rows], dtype=torch.int64))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        values, lengths = check_request(batch, self.input_features, self.rows)
        if lengths.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=self.rows.device)
        return self.model({"values": values, "lengths": lengths})


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


def input_rows(
    model: nn.Module, input_features: Sequence[str], field_rows: Mapping[str, int] | None = None
) -> list[int]:
    """Rows of every input feature: its table's, else ``field_rows`` (dropped fields have no table).

    The served model checks every id against these, dropped fields included, so they are
    baked in at export; a feature with neither a table nor an entry is an export error.
    """
    rows = {f: int(n) for f, n in (field_rows or {}).items()}
    for m in model.modules():
        if type(m) is EmbeddingBagCollection:
            for c in m.embedding_bag_configs():
                for f in c.feature_names:
                    if rows.setdefault(f, c.num_embeddings) != c.num_embeddings:
                        raise ValueError(
                            f"serving export: feature {f!r} has {c.num_embeddings} table rows, "
                            f"field_rows says {rows[f]}"
                        )
    missing = [f for f in input_features if f not in rows]
    if missing:
        raise ValueError(
            f"serving export: rows of input feature(s) {missing} unknown (no table, no field_rows)"
        )
    return [rows[f] for f in input_features]


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
    :class:`CheckedServingModel`: it refuses malformed requests and ids outside their
    feature's rows (:func:`check_request`). ``field_rows`` gives the rows of features without
    a table (dropped fields); ``vocab`` (already checked by :func:`serving_vocab`) is written
    as ``vocab.json`` for clients holding raw values. The directory is assembled as
    ``out_dir.tmp`` and renamed when complete; an existing ``out_dir`` is replaced only if it
    is an earlier export (it holds ``serving.json``) or empty.
    """
    check_serving(serving)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META).is_file())):
        raise UsageError(f"--out {out}: exists and is not an earlier serving export; refusing to overwrite")
    rows = input_rows(model, input_features, field_rows)
    served, report = quantize_model(copy.deepcopy(model), serving, row_alignment)
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
