"""Found dims in and out: ``dims.json`` and plain TorchRec ``EmbeddingBagConfig``s.

``dims.json`` is one flat object ``{"field": dim, ...}`` with every input field present
and dropped fields at 0: the DimGrow search and every baseline write the same format so
the retrain recipe is shared.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from torchrec_dimgrow.diskwrite import disk_errors
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection


def gate_table(collection: DimGrowEmbeddingBagCollection) -> dict[str, list[float]]:
    """Gate importance as ``{table: [g_1, ..., g_dmax]}`` (inactive slots are NaN)."""
    gates = collection.gate_values()
    dims = collection.dims()
    out = {}
    for t, name in enumerate(collection.table_names):
        row = gates[t].tolist()
        out[name] = [v if k < dims[name] else float("nan") for k, v in enumerate(row)]
    return out


def write_json_atomic(path: str | Path, payload: object) -> None:
    """Write ``path`` whole or not at all: through ``PATH.tmp`` and a rename; a full disk is
    one :class:`~torchrec_dimgrow.errors.DiskError` naming ``path`` and no ``.tmp`` left."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with disk_errors(path, partial=[tmp]):
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
        os.replace(tmp, path)


def write_dims_json(path: str | Path, dims: Mapping[str, int]) -> None:
    for name, d in dims.items():
        if not isinstance(d, int) or d < 0:
            raise ValueError(f"dims.json: field {name!r} has invalid dim {d!r}")
    write_json_atomic(path, dict(dims))


def read_dims_json(path: str | Path, fields: Sequence[str] | None = None) -> dict[str, int]:
    """Read and validate a dims file; with ``fields``, every field must be present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dims file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object {{field: dim}}")
    dims: dict[str, int] = {}
    for name, d in raw.items():
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise ValueError(f"{path}: field {name!r} has invalid dim {d!r} (need an int >= 0)")
        dims[name] = d
    if fields is not None:
        missing = [f for f in fields if f not in dims]
        extra = [f for f in dims if f not in set(fields)]
        if missing or extra:
            raise ValueError(f"{path}: fields do not match the data (missing {missing}, unknown {extra})")
    return dims
