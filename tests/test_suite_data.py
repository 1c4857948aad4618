"""The drawn suite's generator: reproducible, within its ranges, calibrated, ground truth honest."""

from __future__ import annotations

import numpy as np
import pytest

from torchrec_dimgrow.data.suite import (
    SCALES,
    Family,
    SuiteScale,
    calibrate_offset,
    draw_instance,
    draw_with_teacher,
    parse_scale,
)

TINY = SCALES["tiny"]


def _all(data):  # type: ignore[no-untyped-def]
    ids = np.concatenate([data.train.ids, data.val.ids, data.test.ids])
    labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
    return ids, labels


def test_same_seed_and_index_give_the_same_arrays() -> None:
    a, b = draw_instance(7, 2, TINY), draw_instance(7, 2, TINY)
    for x, y in zip(_all(a), _all(b)):
        np.testing.assert_array_equal(x, y)
    assert a.fields == b.fields and a.vocab_sizes == b.vocab_sizes and a.source == b.source


def test_other_seeds_and_indices_draw_other_instances() -> None:
    base = draw_instance(7, 2, TINY)
    for other in (draw_instance(8, 2, TINY), draw_instance(7, 3, TINY)):
        assert other.vocab_sizes != base.vocab_sizes
        assert (
            other.source["need"] != base.source["need"]
            or other.source["click_rate"] != base.source["click_rate"]
        )


def test_draws_stay_in_the_family_ranges() -> None:
    fam = Family()
    scale = SuiteScale(rows=2_000, max_vocab=500)
    kinds, counts = set(), set()
    for i in range(16):
        data = draw_instance(1, i, scale)
        s = data.source
        n = len(data.fields)
        counts.add(n)
        assert fam.fields[0] <= n <= fam.fields[1]
        assert len(s["noise_fields"]) <= fam.noise_share[1] * n
        assert all(fam.min_vocab <= v <= scale.max_vocab for v in data.vocab_sizes)
        assert all(fam.zipf[0] <= a <= fam.zipf[1] for a in s["zipf"].values())
        assert fam.click_rate[0] <= s["click_rate"] <= fam.click_rate[1]
        assert fam.signal[0] <= s["signal"] <= fam.signal[1]
        assert sum(s["weights"].values()) == pytest.approx(1.0)
        assert set(s["need"].values()) <= {0, *fam.ranks}
        ids, _ = _all(data)
        assert ids.shape == (scale.rows, n) and (ids.max(axis=0) < np.array(data.vocab_sizes)).all()
        kinds.add(s["teacher"])
    assert kinds == {"mixed", "interaction_only"} and len(counts) > 4  # the family is broad


def test_click_rate_hits_the_drawn_rate() -> None:
    scale = SuiteScale(rows=20_000, max_vocab=300)
    for i in range(2):
        data = draw_instance(2, i, scale)
        rate = data.source["click_rate"]
        observed = _all(data)[1].mean()
        assert abs(observed - rate) < 4 * np.sqrt(rate * (1 - rate) / scale.rows) + 1e-3, (i, observed, rate)


def test_calibrate_offset_solves_for_the_base_rate() -> None:
    scores = np.random.default_rng(0).normal(size=5_000) * 2.0
    for rate in (0.02, 0.3, 0.9):
        b = calibrate_offset(scores, rate)
        assert np.mean(1 / (1 + np.exp(-(scores + b)))) == pytest.approx(rate, abs=1e-6)
    with pytest.raises(ValueError, match="rate must be in"):
        calibrate_offset(scores, 1.0)


def test_noise_fields_do_not_enter_the_teacher_and_signal_fields_do() -> None:
    for i in range(8):
        data, teacher = draw_with_teacher(3, i, TINY)
        if data.source["noise_fields"]:
            break
    else:
        pytest.fail("no instance with noise fields among the first 8")
    ids, _ = _all(data)
    logit = teacher.logit(ids)
    shuffled = ids.copy()
    rng = np.random.default_rng(0)
    noise = [data.fields.index(f) for f in data.source["noise_fields"]]
    for f in noise:
        shuffled[:, f] = rng.permutation(shuffled[:, f])
    np.testing.assert_allclose(teacher.logit(shuffled), logit)
    signal = next(f for f in range(len(data.fields)) if f not in noise)
    shuffled[:, signal] = rng.permutation(shuffled[:, signal])
    assert not np.allclose(teacher.logit(shuffled), logit)  # the check above can fail


def test_ground_truth_is_recorded_and_interaction_only_means_no_main_effect() -> None:
    fam = Family()
    seen = False
    for i in range(16):
        data, teacher = draw_with_teacher(4, i, TINY)
        s = data.source
        assert list(s["need"]) == data.fields and list(s["zipf"]) == data.fields
        assert s["need"] == dict(zip(data.fields, teacher.ranks))
        assert s["noise_fields"] == [f for f in data.fields if s["need"][f] == 0]
        assert set(s["importance"]) == {f for f in data.fields if s["need"][f] > 0}
        assert (s["seed"], s["index"], s["scale"]) == (4, i, {"rows": TINY.rows, "max_vocab": TINY.max_vocab})
        if s["teacher"] == "interaction_only":
            seen = True
            assert s["weights"]["main"] == 0.0
            ids, _ = _all(data)
            before = teacher.logit(ids)
            teacher.bias = [b + 5.0 * np.random.default_rng(1).normal(size=b.shape) for b in teacher.bias]
            np.testing.assert_allclose(teacher.logit(ids), before)  # per-id effects carry no weight
    assert seen and fam.interaction_only > 0


def _worst_per_id_z(teacher, ids: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    """The largest z-score of a per-id mean of the teacher's score, over ids seen 1000+ times."""
    z = teacher.standard(ids)
    worst = 0.0
    for f in teacher.signal_fields:
        counts = np.bincount(ids[:, f])
        means = np.bincount(ids[:, f], weights=z) / np.maximum(counts, 1)
        hot = counts >= 1_000
        worst = max(worst, float(np.max(np.abs(means[hot]) * np.sqrt(counts[hot]) / z.std())))
    return worst


def test_an_interaction_only_teacher_has_no_per_id_effect_on_any_field() -> None:
    # the teacher's kind and weights are drawn before any size-dependent draw: scan at tiny scale
    index = next(
        i
        for i in range(32)
        if (s := draw_instance(5, i, TINY).source)["teacher"] == "interaction_only"
        and s["weights"]["dcn"] > 0.2
    )
    data, teacher = draw_with_teacher(5, index, SuiteScale(rows=30_000, max_vocab=30))
    assert data.source["teacher"] == "interaction_only"
    ids, _ = _all(data)
    assert _worst_per_id_z(teacher, ids) < 5.0  # per-id means are sampling noise only
    teacher.self_cross = True  # with W's within-field blocks every id has an effect: the check can fail
    assert _worst_per_id_z(teacher, ids) > 5.0


def test_scale_parsing_and_bad_scales() -> None:
    assert parse_scale("small") == SCALES["small"]
    assert parse_scale("1000,50") == SuiteScale(rows=1000, max_vocab=50)
    with pytest.raises(ValueError, match="ROWS,MAX_VOCAB"):
        parse_scale("huge")
    with pytest.raises(ValueError, match="max_vocab >= 3"):
        SuiteScale(rows=1000, max_vocab=1)
