"""Export a saved retrain model for serving: quantized TorchRec tables at the found dims, TorchScript.

Next to the model goes ``vocab.json`` (raw token -> row id per field), taken from the prepared
data the model was trained on: ``--vocab PATH``, or else the first of ``MODEL_DIR/data`` (a
``retrain --out`` that prepared its own data) and ``MODEL_DIR/../data`` (the search directory's
data, which ``retrain --dims DIR/dims.json`` reuses) that holds one. Without either the export
still succeeds; ``serving.json`` then says ``"vocab": null`` and clients must map raw values
themselves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torchrec_dimgrow.data.store import VOCAB_FILE
from torchrec_dimgrow.errors import UsageError
from torchrec_dimgrow.saved_model import MODEL_SUBDIR, load_model, resolve_model_dir, verify_model
from torchrec_dimgrow.serving import CPU_ROW_ALIGNMENT, check_serving, export_serving, serving_vocab

log = logging.getLogger(__name__)


def find_vocab(model_root: Path, vocab: str | Path | None) -> Path | None:
    """``vocab`` if given (it must exist), else the prepared data's vocab beside the model, if any."""
    if vocab is not None:
        path = Path(vocab)
        path = path / VOCAB_FILE if path.is_dir() else path
        if not path.is_file():
            raise UsageError(f"--vocab {vocab}: no such file")
        return path
    run = model_root.parent if model_root.name == MODEL_SUBDIR else model_root
    for candidate in (run / "data" / VOCAB_FILE, run.parent / "data" / VOCAB_FILE):
        if candidate.is_file():
            return candidate
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: unreadable vocab ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: not a vocab (a JSON object with 'fields' and 'vocab')")
    return raw


def export_saved(
    model_dir: str | Path,
    serving: str,
    out_dir: str | Path,
    row_alignment: int = CPU_ROW_ALIGNMENT,
    vocab: str | Path | None = None,
) -> dict[str, Any]:
    """Write ``out_dir/serving.pt`` + ``serving.json`` (+ ``vocab.json``) from ``model_dir``.

    Every check (the vocab's fields and sizes against the model's rows included) runs before
    any write.
    """
    verify_model(model_dir)  # a missing, extra or changed file: one line naming it, before any load
    check_serving(serving)
    if row_alignment < 1:
        raise UsageError(f"--row-alignment must be >= 1, got {row_alignment}")
    root = resolve_model_dir(model_dir)
    model, spec = load_model(root)
    vocab_file = find_vocab(root, vocab)
    if vocab_file is None:
        log.warning(
            "export: no prepared vocab beside %s (pass --vocab DATA_DIR/vocab.json); "
            "no vocab.json is written, clients must send row ids",
            root,
        )
    ids = (
        serving_vocab(_read_json(vocab_file), spec.fields, spec.vocab_sizes, str(vocab_file))
        if vocab_file is not None
        else None
    )
    extra = {
        "dims": dict(spec.dims),
        "dropped_fields": [f for f in spec.fields if spec.dims[f] == 0],
        "source_model": str(root.resolve()),
        "source_vocab": str(vocab_file.resolve()) if vocab_file is not None else None,
    }
    return export_serving(
        model,
        spec.fields,
        serving,
        out_dir,
        row_alignment,
        extra_meta=extra,
        field_rows=dict(zip(spec.fields, spec.vocab_sizes)),
        vocab=ids,
    )


def export_main(model: Path, serving: str, out: Path, row_alignment: int, vocab: Path | None) -> int:
    """Run the ``export`` command: one writer per output directory, a full disk reported as one line."""
    from torchrec_dimgrow.diskwrite import disk_errors
    from torchrec_dimgrow.runlock import run_lock, sibling_lock

    with (
        run_lock(out, lock_file=sibling_lock(out)),
        disk_errors(out, partial=[out.with_name(out.name + ".tmp")]),
    ):
        meta = export_saved(model, serving, out, row_alignment, vocab)
    print(
        f"serving {meta['serving']}  serving_bytes {meta['serving_bytes']}  padding_bytes {meta['padding_bytes']}  "
        f"dropped {meta['dropped_fields']}  -> {out / 'serving.pt'}"
    )
    return 0
