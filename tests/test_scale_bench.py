"""benchmarks/scale.py: the streamed Parquet data, its teacher, and the real 2-rank --quick run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tests.dist_utils import child_env

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import scale  # noqa: E402


def test_cardinalities_are_torchrecs_criteo_terabyte_list() -> None:
    cards = scale.criteo_terabyte_cardinalities()
    assert len(cards) == 26
    assert sum(cards) == 177_944_275  # "177.9M rows"
    assert scale.scaled_vocab(1000)[5] == 1  # a 3-row table rounds to at least one row


def test_zipf_ids_stay_in_range_and_favour_low_ids() -> None:
    rng = np.random.default_rng(0)
    ids = scale.zipf_ids(1_000_000, 50_000, 1.1, rng)
    assert ids.min() >= 0 and ids.max() < 1_000_000
    assert (ids == 0).mean() > (ids == 10).mean() > (ids == 1000).mean()


def test_hashed_teacher_vectors_depend_only_on_id_and_salt() -> None:
    a = scale.hashed_normal(np.array([3, 7, 3]), salt=1, k=4)
    assert np.array_equal(a[0], a[2]) and not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], scale.hashed_normal(np.array([3]), salt=2, k=4)[0])
    big = scale.hashed_normal(np.arange(20_000), salt=5, k=2)
    assert abs(big.mean()) < 0.05 and abs(big.std() - 1) < 0.05


def test_generate_writes_row_groups_and_a_learnable_label(tmp_path: Path) -> None:
    cfg = scale.DataConfig(scale=5000, train_rows=20_000, val_rows=3_000, row_group=4096)
    meta = scale.generate(tmp_path, cfg)
    train = pq.ParquetFile(tmp_path / "train.parquet")
    assert train.metadata.num_rows == 20_000 and train.metadata.num_row_groups == 5
    assert meta["rows"] == {"train": 20_000, "val": 3_000}
    t = train.read()
    ids = np.stack([t.column(f).to_numpy() for f in meta["fields"]], axis=1)
    assert (ids >= 0).all() and (ids < np.array(meta["vocab"])).all()
    # the label follows the teacher: rows with a positive teacher logit click more often
    dense = np.stack([t.column(d).to_numpy() for d in scale.dense_names()], axis=1)
    labels = t.column("label").to_numpy()
    logit = scale.teacher_logit(ids, dense - dense.mean(axis=0), cfg.teacher, cfg.seed)
    assert labels[logit > 1].mean() > labels[logit < -1].mean() + 0.3


def test_quick_run_streams_two_ranks_and_replans(tmp_path: Path) -> None:
    env = child_env(PYTHONHASHSEED="0")
    data = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "scale.py"), "--quick", "--data", str(data),
         "--results", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| rank | peak_rss_MiB" in proc.stdout and "| AutoDim-64 (SuperNet)" in proc.stdout
    out = json.loads((tmp_path / "scale_quick.json").read_text())
    summary, ranks = out["meta"]["summary"], out["meta"]["ranks"]
    assert summary["world_size"] == 2 and len(ranks) == 2
    assert summary["replans"] >= 2, "the quick run must cross at least two capacity blocks"
    meta = json.loads((data / "meta.json").read_text())
    split_bytes = meta["rows"]["train"] * (1 + scale.NUM_DENSE + len(meta["fields"])) * 8
    for r in ranks:
        batch, steps = summary["batch_size_per_rank"], summary["steps"]
        assert r["rows_streamed_train"] == r["rows_streamed_val"] == steps * batch
        assert r["arrow_pool_peak"] < split_bytes / 4, "the reader held too much of the split"
        assert r["peak_rss"] >= r["rss_after_init"] > 0 and r["init_seconds"] > 0
        assert all(x["in_steps"] > 0 and x["capacity_changes"] for x in r["replans"])
        assert r["dims"] == ranks[0]["dims"], "ranks disagree on the dims"
    est = {row["method"]: row for row in out["rows"] if row["kind"] == "estimator"}
    full = est["full-64 (uniform 64)"]["estimator_GiB"]
    assert est["AutoDim-64 (SuperNet)"]["estimator_GiB"] > full > est["uniform-16"]["estimator_GiB"]
    csv_text = (tmp_path / "scale_quick.csv").read_text()
    assert csv_text.startswith("kind,rank,peak_rss_MiB")
