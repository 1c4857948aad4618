"""Export a saved retrain model for serving: quantized TorchRec tables at the found dims, TorchScript."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchrec_dimgrow.errors import UsageError
from torchrec_dimgrow.saved_model import load_model, resolve_model_dir, verify_model
from torchrec_dimgrow.serving import CPU_ROW_ALIGNMENT, check_serving, export_serving


def export_saved(
    model_dir: str | Path, serving: str, out_dir: str | Path, row_alignment: int = CPU_ROW_ALIGNMENT
) -> dict[str, Any]:
    """Write ``out_dir/serving.pt`` + ``serving.json`` from ``model_dir``; every check runs before any write."""
    verify_model(model_dir)  # a missing, extra or changed file: one line naming it, before any load
    check_serving(serving)
    if row_alignment < 1:
        raise UsageError(f"--row-alignment must be >= 1, got {row_alignment}")
    root = resolve_model_dir(model_dir)
    model, spec = load_model(root)
    extra = {
        "dims": dict(spec.dims),
        "dropped_fields": [f for f in spec.fields if spec.dims[f] == 0],
        "source_model": str(root.resolve()),
    }
    return export_serving(model, spec.fields, serving, out_dir, row_alignment, extra_meta=extra)
