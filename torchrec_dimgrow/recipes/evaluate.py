"""Evaluate a saved retrain model on the test split of a dataset (the same AUC ``retrain`` reported)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.saved_model import ModelError, ModelSpec, load_model
from torchrec_dimgrow.training import evaluate


def check_data_matches(spec: ModelSpec, data: PreparedData, where: str) -> None:
    """The data must encode ids exactly as the model was trained on (same fields and vocab sizes)."""
    if list(data.fields) != list(spec.fields):
        raise ModelError(f"{where}: the model's fields {spec.fields} differ from the data's {data.fields}")
    if [int(v) for v in data.vocab_sizes] != list(spec.vocab_sizes):
        diff = [f for f, a, b in zip(spec.fields, spec.vocab_sizes, data.vocab_sizes) if a != b]
        raise ModelError(
            f"{where}: vocab sizes differ from the data's for fields {diff} (different data or --min-count?)"
        )


def evaluate_saved(model_dir: str | Path, data: PreparedData, batch_size: int = 256) -> dict[str, Any]:
    """Test and validation AUC / log loss of the model saved in ``model_dir``."""
    model, spec = load_model(model_dir)
    check_data_matches(spec, data, str(model_dir))
    test = evaluate(model, data.test, batch_size)
    val = evaluate(model, data.val, batch_size)
    return {
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "val_auc": val["auc"],
        "dims": dict(spec.dims),
    }
