"""The README's Python examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.dist_utils import child_env

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(markdown: str, section: str) -> list[str]:
    """The ```python blocks of one ``## section`` of a markdown file."""
    body = markdown.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)


def test_readme_python_blocks_run_and_dims_change(tmp_path: Path) -> None:
    blocks = python_blocks((ROOT / "README.md").read_text(), "Use it from Python")
    assert len(blocks) >= 2, "the README shows the unsharded and the sharded use"
    # Run every block in one fresh process, in order (later blocks reuse earlier names), then
    # check what the first block promises: the dims moved and the found dims are exportable.
    script = "\n\n".join(blocks) + (
        "\n\nassert controller.steps == 20\n"
        "import json; print('RESULT', json.dumps({'dims': ebc.dims(), 'plain': len(plain)}))\n"
    )
    env = child_env(PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith("{"), proc.stdout
    dims = eval(first.split("} {")[0] + "}")  # the first print: the unsharded run's logical dims
    assert dims["user"] > 1, f"the field carrying the label grows: {first}"
    assert "RESULT" in proc.stdout
