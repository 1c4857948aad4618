"""Evaluate a saved retrain model on the test split of a dataset (the same AUC ``retrain`` reported)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.errors import ModelError
from torchrec_dimgrow.manifest import Verified, vocab_difference, vocab_fingerprint
from torchrec_dimgrow.runconfig import EvaluateRunConfig
from torchrec_dimgrow.saved_model import ModelSpec, load_model, saved_vocab, verify_model
from torchrec_dimgrow.training import evaluate

log = logging.getLogger(__name__)


def check_data_matches(spec: ModelSpec, data: PreparedData, where: str) -> None:
    """The data must encode ids exactly as the model was trained on (same fields and vocab sizes)."""
    if list(data.fields) != list(spec.fields):
        raise ModelError(f"{where}: the model's fields {spec.fields} differ from the data's {data.fields}")
    if [int(v) for v in data.vocab_sizes] != list(spec.vocab_sizes):
        diff = [f for f, a, b in zip(spec.fields, spec.vocab_sizes, data.vocab_sizes) if a != b]
        raise ModelError(
            f"{where}: vocab sizes differ from the data's for fields {diff} (different data or data.min_count?)"
        )


def check_vocab_matches(saved: dict[str, str] | None, data: PreparedData, where: str) -> None:
    """Every field's ids must stand for the values they stood for in training.

    Why beyond the sizes: a column whose values were relabelled keeps its vocab size, and
    the model would score ids that mean other values without a sign of it.
    """
    current = vocab_fingerprint(data.directory) if data.directory is not None else None
    if saved is None or current is None:
        log.warning(
            "%s: no vocab fingerprint to compare (%s); ids are checked by vocab size only",
            where,
            "the model records none" if saved is None else "the data has no vocab.json",
        )
        return
    field = vocab_difference(saved, current)
    if field is not None:
        raise ModelError(
            f"{where}: field {field!r}: the data's vocab differs from the one the model was trained on "
            "(its ids would mean other values; different data or data.min_count?)"
        )


def evaluate_saved(
    model_dir: str | Path, data: PreparedData, batch_size: int = 256, verified: Verified | None = None
) -> dict[str, Any]:
    """Test and validation AUC / log loss of the model saved in ``model_dir``.

    The directory is verified first (``verified``: already done by the caller), and the
    data must match the model's fields, vocab sizes and per-field vocab fingerprint.
    """
    found = verified if verified is not None else verify_model(model_dir)
    model, spec = load_model(found.path)
    check_data_matches(spec, data, str(model_dir))
    check_vocab_matches(saved_vocab(found), data, str(model_dir))
    test = evaluate(model, data.test, batch_size)
    val = evaluate(model, data.val, batch_size)
    return {
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "val_auc": val["auc"],
        "dims": dict(spec.dims),
    }


def evaluate_main(cfg: EvaluateRunConfig) -> int:
    """Run the ``evaluate`` command: the saved model verified, then the data prepared."""
    import tempfile

    from torchrec_dimgrow.recipes.setup import local_env, prepare_on_rank0
    from torchrec_dimgrow.saved_model import read_spec

    cfg.data.require()
    verified = verify_model(cfg.run.model)  # every file checked before the data is prepared (one line)
    read_spec(verified.path)
    with tempfile.TemporaryDirectory(prefix="dimgrow-eval-") as tmp:
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(tmp) / "data"
        data = prepare_on_rank0(cfg.data, cache, local_env())
        metrics = evaluate_saved(cfg.run.model, data, cfg.run.batch_size, verified=verified)
    print(
        f"test_auc {metrics['test_auc']:.6f}  test_logloss {metrics['test_logloss']:.6f}  "
        f"val_auc {metrics['val_auc']:.6f}"
    )
    return 0
