"""Serve the newest version an online DimGrow run published, switching versions without a restart.

Needs only ``torch`` and ``fbgemm_gpu`` (which registers the quantized lookup ops)::

    python examples/serve_latest.py OUT [--requests REQ.jsonl] [--poll 1.0]

``OUT`` is the stream's output directory (``python -m torchrec_dimgrow search --stream
--out OUT ...``). Every ``--poll`` seconds the server reads ``OUT/versions/LATEST``; when it
names another version it loads ``OUT/versions/vK/serving.pt`` and answers from then on with
it (the old model stays in use until the new one has loaded). ``LATEST`` is replaced
atomically and always names a complete version; the version may however be pruned between
reading ``LATEST`` and loading it (the trainer keeps the newest ``keep_versions``), so a
failed load is retried at the next poll.

A request is one JSON line ``{"values": [...], "lengths": [...]}``: a KeyedJaggedTensor's
values and lengths, keys in ``serving.json``'s ``input_features`` order (row ids; map raw
values with the version's ``vocab.json`` when it has one). Without ``--requests`` each newly
loaded version scores the sample request stored with it (``check.pt``). For every load and
every request one JSON line goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm, the quantized lookups)
import torch


def read_latest(out: Path) -> str | None:
    try:
        return (out / "versions" / "LATEST").read_text().strip() or None
    except FileNotFoundError:
        return None


def load(out: Path, name: str) -> tuple[Any, dict[str, Any]]:
    directory = out / "versions" / name
    model = torch.jit.load(str(directory / "serving.pt"))
    meta = json.loads((directory / "serving.json").read_text())
    return model, meta


def as_request(raw: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        "values": torch.tensor(raw["values"], dtype=torch.int64),
        "lengths": torch.tensor(raw["lengths"], dtype=torch.int32),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--requests", type=Path, default=None, help="JSON lines, scored by every loaded version")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between two reads of LATEST")
    p.add_argument("--loads", type=int, default=0, help="exit after this many version loads (0: never)")
    p.add_argument("--max-seconds", type=float, default=0.0, help="exit after this long (0: never)")
    args = p.parse_args(argv)
    requests = (
        [as_request(json.loads(line)) for line in args.requests.read_text().splitlines() if line.strip()]
        if args.requests is not None
        else None
    )
    current: str | None = None
    model: Any = None
    loads = 0
    start = time.monotonic()
    while True:
        name = read_latest(args.out)
        if name is not None and name != current:
            try:
                model, meta = load(args.out, name)
            except (OSError, RuntimeError, ValueError) as exc:  # pruned meanwhile: next poll
                print(
                    json.dumps({"event": "load_failed", "version": name, "error": str(exc)[:200]}), flush=True
                )
            else:
                current, loads = name, loads + 1
                batch = requests
                if batch is None:
                    check = torch.load(args.out / "versions" / name / "check.pt")
                    batch = [check["request"]]
                with torch.no_grad():
                    scores = [model(r).tolist() for r in batch]
                print(
                    json.dumps(
                        {"event": "loaded", "version": name, "step": meta.get("step"), "logits": scores}
                    ),
                    flush=True,
                )
        if args.loads and loads >= args.loads:
            return 0
        if args.max_seconds and time.monotonic() - start > args.max_seconds:
            return 0 if loads else 1
        time.sleep(args.poll)


if __name__ == "__main__":
    sys.exit(main())
