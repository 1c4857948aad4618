"""The exported vote of several seeds' searches (``search --set run.votes=N``).

Each search is a complete run of :mod:`torchrec_dimgrow.recipes.search`; the vote takes each
field's median dim within the budget (:func:`~torchrec_dimgrow.policy.vote_dims`) and writes
``dims.json`` and ``metrics.json`` beside the per-seed runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchrec_dimgrow.artifacts import write_dims_json, write_json_atomic
from torchrec_dimgrow.data import PreparedData
from torchrec_dimgrow.distributed.env import DistEnv
from torchrec_dimgrow.modules.tables import FP32_BYTES, field_bytes
from torchrec_dimgrow.policy import vote_dims


def publish_vote(
    data: PreparedData, first_seed: int, results: list[dict[str, Any]], env: DistEnv, out_dir: Path
) -> dict[str, Any]:
    """The vote of ``results`` (one per seed from ``first_seed``); rank 0 writes dims and metrics."""
    vocab = data.vocab()
    costs = [FP32_BYTES * v for v in data.vocab_sizes]
    budget = results[0]["metrics"]["budget_bytes"]
    voted = vote_dims([[r["dims"][f] for f in data.fields] for r in results], costs, budget)
    found = dict(zip(data.fields, voted))
    metrics = {
        "votes": [
            {
                "seed": first_seed + k,
                "dims": r["dims"],
                "val_auc": r["metrics"]["val_auc"],
                "found_embedding_bytes": r["metrics"]["found_embedding_bytes"],
            }
            for k, r in enumerate(results)
        ],
        "val_auc": sum(r["metrics"]["val_auc"] for r in results) / len(results),
        "world_size": env.world_size,
        "replans": sum(r["metrics"]["replans"] for r in results),
        "wall_seconds": round(sum(r["metrics"]["wall_seconds"] for r in results), 3),
        "found_total_dim": sum(voted),
        "found_embedding_bytes": field_bytes(vocab, found),
        "budget_bytes": budget,
        "dropped_fields": sorted(f for f, d in found.items() if d == 0),
    }
    if env.is_main:
        write_dims_json(out_dir / "dims.json", found)
        write_json_atomic(out_dir / "metrics.json", metrics)
    return {"dims": found, "metrics": metrics}
