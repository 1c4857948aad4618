"""Request checks of the serving artifact (``serving.pt``), scripted into it at export.

The serving artifact is :class:`CheckedServingModel`: :func:`check_request` refuses a malformed
request (missing or extra keys, dtypes other than int32/int64, tensors that are not dense, 1-D
and on the model's device, negative or oversized lengths, a length count that is not features x
batch, lengths that do not sum to the number of values, ids outside ``[0, rows)`` of their
feature, dropped fields included) with ``ValueError("serving request: ...")`` (from Python a
``torch.jit.Error`` whose last line carries it) before any lookup, because FBGEMM's
kernel trusts its input: a huge length crashes the process, and an out-of-range id becomes
row 0 (or, ``-1``, is skipped) in a normal-looking logit. Out-of-range ids raise rather than go to
the shared bucket (see :data:`ID_RULE_TEXT`). With these checks in front, FBGEMM's own bounds
check is redundant and is switched off in the artifact (:func:`skip_kernel_bounds_check`), so a
validated request costs about what TorchRec's default export costs without them.
"""

from collections.abc import Mapping, Sequence

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

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


def _raise_for_keys(batch: dict[str, torch.Tensor]) -> None:
    """The error for a request whose keys are not exactly 'values' and 'lengths'."""
    for key in batch.keys():
        if key != "values" and key != "lengths":
            raise ValueError(f"serving request: unexpected key '{key}' (expected 'values' and 'lengths')")
    missing = "values" if "values" not in batch else "lengths"
    raise ValueError(f"serving request: missing key '{missing}' (expected 'values' and 'lengths')")


def _request_tensor(t: torch.Tensor, key: str, device: torch.device) -> torch.Tensor:
    """``t`` (the request's ``key``), checked to be a dense 1-D int32/int64 tensor on the model's
    ``device`` (what the lookup kernel indexes with). One combined test on the accepted path;
    the failing property is named only on a refusal."""
    if (
        (t.dtype == torch.int64 or t.dtype == torch.int32)
        and t.layout == torch.strided
        and t.device == device
        and t.dim() == 1
    ):
        return t if t.is_contiguous() else t.contiguous()
    if t.dtype != torch.int64 and t.dtype != torch.int32:
        raise ValueError(f"serving request: {key} must be int32 or int64, got {_dtype_name(t)}")
    if t.layout != torch.strided:
        raise ValueError(f"serving request: {key} must be a dense (strided) tensor")
    if t.device != device:
        raise ValueError(f"serving request: {key} is on {t.device}, the model on {device}")
    raise ValueError(f"serving request: {key} must be 1-D, got shape {t.shape}")


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
    if len(batch) != 2 or "values" not in batch or "lengths" not in batch:
        _raise_for_keys(batch)
    values = _request_tensor(batch["values"], "values", rows.device)
    lengths = _request_tensor(batch["lengths"], "lengths", rows.device)
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
        # A per-feature amax and one global min: on CPU each is cheaper than one aminmax(dim=1),
        # and a scalar test of ``rows - highest`` costs fewer interpreter steps than ``any()``.
        highest = values.view(num_features, m // num_features).amax(1)
        if int(values.min()) < 0 or int((rows - highest).min()) < 1:
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


def skip_kernel_bounds_check(served: nn.Module) -> int:
    """Turn off FBGEMM's own bounds check in every quantized lookup kernel of ``served``; return how many.

    TorchRec builds its quantized tables with ``BoundsCheckMode.WARNING``: before each lookup
    FBGEMM walks every id and offset again, and replaces a bad one with row 0 (or a clamped
    offset) plus a log line. Behind :class:`CheckedServingModel` that pass can find nothing:
    :func:`check_request` has already refused every request it would have repaired (lengths
    and offsets, ids outside ``[0, rows)`` of their table), so it only costs a second scalar
    walk over the ids (about as long as the checks themselves on CPU). Only for a model that
    is served through :class:`CheckedServingModel`: its ``.model`` then trusts its input.
    """
    kernels: dict[int, IntNBitTableBatchedEmbeddingBagsCodegen] = {}
    for m in served.modules():
        # TorchRec's quantized EBC keeps its kernels in a plain list (``_emb_modules``) unless
        # built with ``register_tbes``, so ``modules()`` alone does not reach them.
        for k in [m, *getattr(m, "_emb_modules", [])]:
            if isinstance(k, IntNBitTableBatchedEmbeddingBagsCodegen):
                kernels[id(k)] = k
    for kernel in kernels.values():
        kernel.bounds_check_mode_int = BoundsCheckMode.NONE.value
    return len(kernels)
