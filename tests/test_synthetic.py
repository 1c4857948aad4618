"""The synthetic benchmark datasets: known needs, no main effects where promised, parquet round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from torchrec_dimgrow.data.synthetic import (
    CRITEO_CARDINALITIES,
    FMConfig,
    ShapedConfig,
    criteo_shaped,
    fm_interactions,
    generate,
    write_parquet,
)


def _per_id_spread(ids: np.ndarray, labels: np.ndarray, vocab: int) -> tuple[float, float]:
    """Std over ids of the per-id label mean, and the std binomial noise alone would give."""
    counts = np.bincount(ids, minlength=vocab)
    means = np.bincount(ids, weights=labels, minlength=vocab) / np.maximum(counts, 1)
    p = labels.mean()
    return float(means.std()), float(np.sqrt(p * (1 - p) / counts.mean()))


def test_fm_data_has_signal_only_in_interactions() -> None:
    data = fm_interactions(FMConfig(rows=40_000, seed=3))
    ids, labels = data.train.ids, data.train.labels
    for f in range(len(data.fields)):
        spread, noise = _per_id_spread(ids[:, f], labels, data.vocab_sizes[f])
        assert spread < 1.6 * noise, (data.fields[f], spread, noise)
    # ...but the pair of the two highest-rank fields carries a strong joint effect
    a, b = len(data.fields) - 2, len(data.fields) - 1
    joint = ids[:, a] * data.vocab_sizes[b] + ids[:, b]
    spread, noise = _per_id_spread(joint, labels, data.vocab_sizes[a] * data.vocab_sizes[b])
    assert spread > 1.3 * noise
    assert data.source["need"] == dict(zip(data.fields, FMConfig().ranks))


def test_fm_zipf_data_keeps_per_field_rows_hot_ids_and_no_main_effects() -> None:
    vocab = (30, 400, 60, 200)
    data = fm_interactions(FMConfig(rows=40_000, vocab=vocab, ranks=(0, 4, 2, 4), exponent=1.1, seed=1))
    assert data.vocab_sizes == list(vocab)
    ids, labels = data.train.ids, data.train.labels
    for f, v in enumerate(vocab):
        counts = np.bincount(ids[:, f], minlength=v)
        assert ids[:, f].max() < v and counts[0] > 5 * counts[v // 2], data.fields[f]  # Zipf: hot head
        hot = np.flatnonzero(counts >= 200)  # ids seen often enough to measure their click rate
        rates = np.array([labels[ids[:, f] == i].mean() for i in hot])
        noise = np.sqrt(labels.mean() * (1 - labels.mean()) / counts[hot])
        assert np.all(np.abs(rates - labels.mean()) < 4.5 * noise), data.fields[f]  # centred under Zipf
    with pytest.raises(ValueError, match="2 vocab sizes for 4 ranks"):
        fm_interactions(FMConfig(rows=100, vocab=(5, 5), ranks=(0, 4, 2, 4)))


def test_fm_zipf_preset_is_the_stall_shape() -> None:
    data = generate("fm_zipf", rows=3_000, seed=0)
    assert data.vocab_sizes == [50, 5000, 120, 800, 2000, 300, 60, 1500, 400, 3000, 90, 200]
    assert list(data.source["need"].values()) == [0, 4, 2, 8, 1, 6, 0, 3, 5, 2, 0, 8]
    assert data.train.ids.shape == (2_400, 12)


def test_generators_are_reproducible_and_seeded() -> None:
    a, b, c = (fm_interactions(FMConfig(rows=2_000, seed=s)) for s in (1, 1, 2))
    assert np.array_equal(a.train.ids, b.train.ids) and np.array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.labels, c.train.labels)


def test_criteo_shaped_has_criteo_profile_zipf_ids_and_varied_needs() -> None:
    cfg = ShapedConfig(rows=50_000, scale=1000.0, seed=0)
    data = criteo_shaped(cfg)
    assert len(data.fields) == 39
    assert data.vocab_sizes == [max(2, round(v / 1000.0)) for v in CRITEO_CARDINALITIES]
    big = int(np.argmax(data.vocab_sizes))
    top_share = np.bincount(data.train.ids[:, big]).max() / len(data.train.ids)
    assert top_share > 20 / data.vocab_sizes[big], "ids must be skewed (Zipf), not uniform"
    need = data.source["need"]
    assert {0, 1}.issubset(need.values()) and max(need.values()) >= 8
    importance = data.source["importance"].values()
    assert max(importance) > 2 * min(importance)
    assert 0.15 < float(data.train.labels.mean()) < 0.85


def test_write_parquet_round_trips_through_prepare(tmp_path: Path) -> None:
    from torchrec_dimgrow.data import prepare

    data = generate("fm", rows=3_000, seed=0)
    write_parquet(data, tmp_path / "fm")
    prepared = prepare(str(tmp_path / "fm"), "parquet", tmp_path / "cache", min_count=1)
    assert prepared.fields == data.fields
    assert len(prepared.train.labels) == len(data.train.labels)
    assert np.array_equal(prepared.test.labels, data.test.labels)
    with pytest.raises(ValueError, match="unknown synthetic dataset"):
        generate("imagenet")
