"""prepare/load_prepared on real samples and small synthetic files; DataError cases."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchrec_dimgrow.data import (
    MISSING,
    DataError,
    PreparedData,
    csv_stream,
    load_prepared,
    prepare,
    vocab_path,
)
from torchrec_dimgrow.data.criteo import bucketize
from torchrec_dimgrow.data.movielens import FIELDS as MOVIELENS_FIELDS

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ALICCP_DENSE = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]


def vocab_of(cache: Path, field: str) -> dict[str, int]:
    return json.loads(vocab_path(cache).read_text())["vocab"][field]


def write_splits(root: Path, suffix: str, train: str, val: str, test: str) -> str:
    """Write PREFIX_{train,val,test}{suffix}; returns the prefix."""
    for name, text in (("train", train), ("val", val), ("test", test)):
        (root / f"d_{name}{suffix}").write_text(text)
    return str(root / "d")


def assert_clean(parent: Path, cache: Path) -> None:
    """After an error: no cache_dir and no staging leftovers beside it."""
    assert not cache.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{cache.name}.")]


def criteo_row(label: str = "0", ints: list[str] | None = None, cats: list[str] | None = None) -> str:
    ints = ints if ints is not None else ["1"] * 13
    cats = cats if cats is not None else ["aa"] * 26
    return "\t".join([label, *ints, *cats]) + "\n"


# --- criteo ---------------------------------------------------------------------------------


def test_criteo_bucketize_known_values() -> None:
    raw = np.array([-1, 0, 1, 2, 3, 10, 100, 1000, 123456])
    expected = [-1, 0, 1, 2, 1, 5, 21, 47, 137]
    assert bucketize(raw).tolist() == expected
    assert expected[4:] == [int(math.log(v) ** 2) for v in raw[4:]]


def test_criteo_tokens_and_dense(tmp_path: Path) -> None:
    rows = [
        criteo_row("1", ["5", "", "-1"] + ["1"] * 10),
        criteo_row("0", ["5", "", "2"] + ["1"] * 10, ["", *["aa"] * 25]),
        criteo_row("0", ["100", "7", "2"] + ["1"] * 10),
    ]
    prefix = write_splits(tmp_path, ".tsv", "".join(rows), rows[0], rows[2])
    data = prepare(prefix, "criteo", tmp_path / "c", min_count=1)
    assert len(data.fields) == 39 and data.num_dense == 13
    assert data.fields[:2] == ["I1", "I2"] and data.fields[-1] == "C26"
    assert set(vocab_of(tmp_path / "c", "I1")) == {"2", "21"}  # 5 -> 2, 100 -> 21
    assert set(vocab_of(tmp_path / "c", "I2")) == {MISSING, "3"}  # 7 -> floor(ln(7)^2) = 3
    assert set(vocab_of(tmp_path / "c", "I3")) == {"-1", "2"}
    assert set(vocab_of(tmp_path / "c", "C1")) == {"aa", MISSING}
    dense = np.asarray(data.train.dense)
    np.testing.assert_allclose(dense[0, :3], [math.log(6), 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(dense[2, :3], [math.log(101), math.log(8), math.log(3)], rtol=1e-6)
    assert data.train.labels.tolist() == [1.0, 0.0, 0.0]


def test_criteo_sample(tmp_path: Path) -> None:
    start = time.perf_counter()
    data = prepare(str(SHARED / "criteo" / "criteo_head8k"), "criteo", tmp_path / "c")
    assert time.perf_counter() - start < 10
    assert len(data.fields) == 39 and data.num_dense == 13
    assert [len(data.train), len(data.val), len(data.test)] == [7200, 409, 391]
    for split in (data.train, data.val, data.test):
        assert split.dense is not None and split.dense.shape == (len(split), 13)
        assert split.ids.dtype == np.int64 and split.ids.min() >= 0
        assert (split.ids < np.array(data.vocab_sizes)).all()
    assert 0.15 < float(np.mean(data.train.labels)) < 0.3
    batch = next(iter(data.val.batches(32)))
    assert batch.dense_features.shape == (32, 13)
    assert batch.sparse_features.keys() == data.fields


def test_criteo_single_file_is_split_randomly(tmp_path: Path) -> None:
    path = str(SHARED / "criteo" / "criteo_head8k_train.tsv")
    data = prepare(path, "criteo", tmp_path / "a", split_seed=1)
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == 7200 and abs(sizes[0] - 5760) < 150 and abs(sizes[1] - 720) < 100
    again = prepare(path, "criteo", tmp_path / "b", split_seed=1)
    np.testing.assert_array_equal(data.val.ids, again.val.ids)
    other = prepare(path, "criteo", tmp_path / "c", split_seed=2)
    assert len(other.val) != len(data.val) or not np.array_equal(other.val.ids, data.val.ids)


# --- vocab ----------------------------------------------------------------------------------


def small_csv(tmp_path: Path) -> str:
    train = "label,f,g\n1,a,x\n0,a,x\n1,a,y\n0,b,x\n0,c,x\n1,c,y\n"
    val = "label,f,g\n1,z,x\n0,z,x\n1,z,x\n0,b,q\n"
    test = "g,label,f,extra\nx,0,a,1\n"
    return write_splits(tmp_path, ".csv", train, val, test)


def test_vocab_min_count_and_unseen_values(tmp_path: Path) -> None:
    data = prepare(small_csv(tmp_path), "csv", tmp_path / "v", min_count=2)
    assert data.fields == ["f", "g"]
    assert vocab_of(tmp_path / "v", "f") == {"a": 1, "c": 2}  # b seen once -> bucket 0
    assert vocab_of(tmp_path / "v", "g") == {"x": 1, "y": 2}
    assert data.vocab_sizes == [3, 3]
    assert data.train.ids[:, 0].tolist() == [1, 1, 1, 0, 2, 2]
    # z is frequent in val but never enters the vocab; q is unseen.
    assert data.val.ids.tolist() == [[0, 1], [0, 1], [0, 1], [0, 0]]
    assert data.test.ids.tolist() == [[1, 1]]  # columns are matched by name, extras ignored
    assert prepare(small_csv(tmp_path), "csv", tmp_path / "v1", min_count=1).vocab_sizes == [4, 3]
    assert vocab_of(tmp_path / "v1", "f") == {"a": 1, "c": 2, "b": 3}


def test_table_configs(tmp_path: Path) -> None:
    data = prepare(small_csv(tmp_path), "csv", tmp_path / "v")
    configs = data.table_configs(8)
    assert [(c.name, c.feature_names, c.num_embeddings, c.embedding_dim) for c in configs] == [
        ("f", ["f"], 3, 8),
        ("g", ["g"], 3, 8),
    ]
    assert [(c.name, c.embedding_dim) for c in data.table_configs({"f": 0, "g": 4})] == [("g", 4)]
    with pytest.raises(DataError, match="missing fields"):
        data.table_configs({"f": 2})


def test_parquet_matches_csv(tmp_path: Path) -> None:
    table = pa.table({"label": [1, 0, 1, 0], "user": [7, 7, 8, 7], "city": ["p", None, "p", "q"]})
    for split in ("train", "val", "test"):
        pq.write_table(table, tmp_path / f"t_{split}.parquet")
    data = prepare(str(tmp_path / "t"), "parquet", tmp_path / "p")
    assert data.fields == ["user", "city"]
    assert vocab_of(tmp_path / "p", "user") == {"7": 1}
    assert vocab_of(tmp_path / "p", "city") == {"p": 1}
    assert data.train.ids.tolist() == [[1, 1], [1, 0], [0, 1], [1, 0]]
    assert data.train.labels.dtype == np.float32 and data.train.labels.tolist() == [1, 0, 1, 0]


def test_parquet_bad_label_names_file_and_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"label": [1, 0, 3], "u": [1, 2, 3]}), tmp_path / "t_train.parquet")
    for split in ("val", "test"):
        pq.write_table(pa.table({"label": [1], "u": [1]}), tmp_path / f"t_{split}.parquet")
    with pytest.raises(DataError, match=r"t_train\.parquet: row 3: label must be 0 or 1, got 3"):
        prepare(str(tmp_path / "t"), "parquet", tmp_path / "p")
    assert_clean(tmp_path, tmp_path / "p")


# --- real samples ---------------------------------------------------------------------------


def test_movielens_sample(tmp_path: Path) -> None:
    start = time.perf_counter()
    data = prepare(str(SHARED / "movielens-100k"), "movielens", tmp_path / "ml")
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"prepare took {elapsed:.1f}s"
    expected = ["user_id", "item_id", "age", "gender", "occupation", "zip", "release_year", "first_genre"]
    assert data.fields == expected and data.num_dense == 0
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == 100_000
    assert abs(sizes[0] - 80_000) < 1000 and abs(sizes[1] - 10_000) < 600 and abs(sizes[2] - 10_000) < 600
    assert 0.53 < float(np.mean(data.train.labels)) < 0.57
    assert data.vocab_sizes[0] == 944  # 943 users + bucket 0
    assert data.vocab_sizes[3] == 3  # M, F + bucket 0
    genres = vocab_of(tmp_path / "ml", "first_genre")
    assert set(genres) <= {str(i) for i in range(19)} | {MISSING}
    years = vocab_of(tmp_path / "ml", "release_year")
    assert "1995" in years and all(y == MISSING or (y.isdigit() and len(y) == 4) for y in years)
    reseeded = prepare(str(SHARED / "movielens-100k"), "movielens", tmp_path / "ml2", split_seed=1)
    assert len(reseeded.train) != len(data.train) or not np.array_equal(reseeded.train.ids, data.train.ids)


def _movielens_1m(directory: Path, ratings: int = 400) -> Path:
    """A small directory in MovieLens-1M's layout ("::"-separated, latin-1, colons in titles)."""
    directory.mkdir()
    users = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117-6026", "4::F::45::7::02460"]
    (directory / "users.dat").write_text("\n".join(users) + "\n", encoding="latin1")
    movies = [
        "1::Toy Story (1995)::Animation|Children's|Comedy",
        "2::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure",
        "3::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi",
        "4::Untitled::Drama",
    ]
    (directory / "movies.dat").write_text("\n".join(movies) + "\n", encoding="latin1")
    rng = np.random.default_rng(0)
    lines = [
        f"{rng.integers(1, 5)}::{rng.integers(1, 5)}::{rng.integers(1, 6)}::97830{i:04d}"
        for i in range(ratings)
    ]
    (directory / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin1")
    return directory


def test_movielens_1m_layout_gives_the_same_fields(tmp_path: Path) -> None:
    """The raw ML-1M release (the DimGrow code's MovieLens) reads with the same --format."""
    directory = _movielens_1m(tmp_path / "ml-1m")
    data = prepare(str(directory), "movielens", tmp_path / "cache", min_count=1)
    assert data.fields == MOVIELENS_FIELDS  # the 100K release's 8 fields (test_movielens_sample)
    assert sum(len(split) for split in (data.train, data.val, data.test)) == 400
    ratings = [int(line.split("::")[2]) for line in (directory / "ratings.dat").read_text().split()]
    positives = sum(int(split.labels.sum()) for split in (data.train, data.val, data.test))
    assert positives == sum(r > 3 for r in ratings)  # label: rating > 3
    # every user and movie is rated in train (400 draws over 4 x 4); "Untitled" has no year
    assert set(vocab_of(tmp_path / "cache", "release_year")) == {"1995", "1977", MISSING}
    assert set(vocab_of(tmp_path / "cache", "first_genre")) == {"Animation", "Action", "Adventure", "Drama"}
    assert set(vocab_of(tmp_path / "cache", "zip")) == {"48067", "70072", "55117-6026", "02460"}
    assert set(vocab_of(tmp_path / "cache", "age")) == {"1", "56", "25", "45"}
    with (directory / "ratings.dat").open("a", encoding="latin1") as fh:
        fh.write("9::1::5::978300000\n")  # a user users.dat does not know
    with pytest.raises(DataError, match=r"ratings\.dat: line 401: id '9' not found in users\.dat"):
        prepare(str(directory), "movielens", tmp_path / "cache2")


def test_avazu_sample_with_headerless_dev_and_test(tmp_path: Path) -> None:
    data = prepare(str(SHARED / "avazu" / "avazu_head9k"), "avazu", tmp_path / "az")
    assert len(data.fields) == 22 and data.num_dense == 0
    assert data.fields[0] == "hour" and "id" not in data.fields and "click" not in data.fields
    assert [len(data.train), len(data.val), len(data.test)] == [8087, 480, 432]
    assert vocab_of(tmp_path / "az", "hour") == {"0": 1}  # 14102100 -> hour of day 0
    assert 0.12 < float(np.mean(data.train.labels)) < 0.23


def test_aliccp_sample_as_csv_template(tmp_path: Path) -> None:
    template = str(SHARED / "aliccp" / "ali_ccp_{split}_sample.csv")
    data = prepare(
        template, "csv", tmp_path / "ali", label_col="click", drop_cols=["purchase", *ALICCP_DENSE]
    )
    assert len(data.fields) == 23 and data.fields[0] == "101" and data.fields[-1] == "150_14"
    # The files hold 100/50/50 data rows (SOURCE.md's 99/49/49 misses the unterminated last line).
    assert [len(data.train), len(data.val), len(data.test)] == [100, 50, 50]
    # --format aliccp: the same 23 fields without naming the label and the dropped columns
    preset = prepare(template, "aliccp", tmp_path / "ali2")
    assert preset.fields == data.fields and "purchase" not in preset.fields
    assert [len(preset.train), len(preset.val), len(preset.test)] == [100, 50, 50]
    assert np.array_equal(preset.train.labels, data.train.labels)


def test_aliccp_without_the_conversion_column_is_named(tmp_path: Path) -> None:
    header = "click,101,121,D109_14"
    prefix = write_splits(tmp_path, ".csv", *[f"{header}\n0,1,2,0.5\n1,2,1,0.1\n"] * 3)
    with pytest.raises(DataError, match=r"d_train\.csv: drop_cols \['purchase'\] not found"):
        prepare(prefix, "aliccp", tmp_path / "x")


# --- cache ----------------------------------------------------------------------------------


def test_prepared_cache_is_reused_and_invalidated(tmp_path: Path) -> None:
    prefix = small_csv(tmp_path)
    cache = tmp_path / "cache"
    first = prepare(prefix, "csv", cache)
    stamp = (cache / "meta.json").stat().st_mtime_ns
    again = prepare(prefix, "csv", cache)
    assert (cache / "meta.json").stat().st_mtime_ns == stamp
    assert again.source == first.source and again.source["format"] == "csv"
    assert isinstance(again.train.ids, np.memmap) and again.train.ids.mode == "r"
    loaded = load_prepared(cache)
    assert isinstance(loaded, PreparedData) and loaded.fields == first.fields
    np.testing.assert_array_equal(loaded.val.ids, first.val.ids)
    prepare(prefix, "csv", cache, min_count=1)  # other settings -> rebuilt in place
    assert (cache / "meta.json").stat().st_mtime_ns != stamp
    assert vocab_of(cache, "f") == {"a": 1, "c": 2, "b": 3}
    Path(f"{prefix}_train.csv").write_text("label,f,g\n1,a,x\n0,a,x\n")  # changed input -> rebuilt
    assert len(prepare(prefix, "csv", cache, min_count=1).train) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_foreign_directory_is_not_replaced(tmp_path: Path) -> None:
    cache = tmp_path / "mine"
    cache.mkdir()
    (cache / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing"):
        prepare(small_csv(tmp_path), "csv", cache)
    assert (cache / "notes.txt").read_text() == "keep me"


def test_load_prepared_without_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no prepared dataset"):
        load_prepared(tmp_path)


# --- errors ---------------------------------------------------------------------------------


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown format 'xls'"):
        prepare(small_csv(tmp_path), "xls", tmp_path / "x")
    assert_clean(tmp_path, tmp_path / "x")


def test_missing_file_names_path_and_split(tmp_path: Path) -> None:
    prefix = small_csv(tmp_path)
    Path(f"{prefix}_test.csv").unlink()
    with pytest.raises(DataError, match=r"missing test split file: .*d_test\.csv"):
        prepare(prefix, "csv", tmp_path / "x")
    with pytest.raises(DataError, match=r"missing MovieLens file .*u\.data: no ratings file .*ratings\.dat"):
        prepare(str(tmp_path), "movielens", tmp_path / "x")
    assert_clean(tmp_path, tmp_path / "x")


@pytest.mark.parametrize("fmt", ["criteo", "avazu", "aliccp", "movielens"])
def test_column_flags_on_a_fixed_format_are_refused_not_ignored(tmp_path: Path, fmt: str) -> None:
    """data.drop_cols C3 on Criteo used to be ignored: the search ran on C3 anyway, exit 0."""
    with pytest.raises(
        DataError, match=rf"data\.drop_cols C3: only --format csv or parquet .* --format {fmt} fixes"
    ):
        prepare(str(SHARED / "criteo" / "criteo_head8k"), fmt, tmp_path / "x", drop_cols=["C3"])
    with pytest.raises(DataError, match=r"data\.label_col y: only --format csv or parquet"):
        prepare(str(SHARED / "criteo" / "criteo_head8k"), fmt, tmp_path / "x", label_col="y")
    assert not (tmp_path / "x").exists()


def test_missing_label_column(tmp_path: Path) -> None:
    prefix = small_csv(tmp_path)
    with pytest.raises(DataError, match=r"d_train\.csv: label column 'click' not found"):
        prepare(prefix, "csv", tmp_path / "x", label_col="click")
    Path(f"{prefix}_val.csv").write_text("f,g\na,x\n")
    with pytest.raises(DataError, match=r"d_val\.csv: missing column\(s\) \['label'\]"):
        prepare(prefix, "csv", tmp_path / "x")
    assert_clean(tmp_path, tmp_path / "x")


def test_bad_label_names_file_line_and_value(tmp_path: Path) -> None:
    prefix = small_csv(tmp_path)
    Path(f"{prefix}_test.csv").write_text("label,f,g\n0,a,x\n1,a,x\n2,b,y\n")
    with pytest.raises(DataError, match=r"d_test\.csv: line 4: label must be 0 or 1, got '2'"):
        prepare(prefix, "csv", tmp_path / "x")
    assert_clean(tmp_path, tmp_path / "x")


def test_bad_label_line_is_exact_across_read_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(csv_stream, "BLOCK_SIZE", 4096)
    rows = [criteo_row() for _ in range(2000)]
    rows[1499] = criteo_row("yes")
    prefix = write_splits(tmp_path, ".tsv", "".join(rows[:10]), "".join(rows), criteo_row())
    with pytest.raises(DataError, match=r"d_val\.tsv: line 1500: label must be 0 or 1, got 'yes'"):
        prepare(prefix, "criteo", tmp_path / "x")
    assert_clean(tmp_path, tmp_path / "x")


def test_wrong_column_count_names_file_and_line(tmp_path: Path) -> None:
    prefix = small_csv(tmp_path)
    Path(f"{prefix}_val.csv").write_text("label,f,g\n1,a,x\n0,a\n")
    with pytest.raises(DataError, match=r"d_val\.csv: line 3: expected 3 columns, got 2"):
        prepare(prefix, "csv", tmp_path / "x")
    bad = criteo_row() + criteo_row() + "1\t2\t3\n"
    tsv = write_splits(tmp_path, ".tsv", bad, criteo_row(), criteo_row())
    with pytest.raises(DataError, match=r"d_train\.tsv: line 3: expected 40 columns, got 3"):
        prepare(tsv, "criteo", tmp_path / "x")
    assert_clean(tmp_path, tmp_path / "x")


def test_bad_integer_names_file_line_and_column(tmp_path: Path) -> None:
    bad = criteo_row() + criteo_row(ints=["1", "x1"] + ["1"] * 11)
    prefix = write_splits(tmp_path, ".tsv", bad, criteo_row(), criteo_row())
    with pytest.raises(DataError, match=r"d_train\.tsv: line 2: column I2 must be an integer, got 'x1'"):
        prepare(prefix, "criteo", tmp_path / "x")
    assert_clean(tmp_path, tmp_path / "x")


@pytest.mark.parametrize("empty", ["", "label,f,g\n"])
def test_empty_split_names_file(tmp_path: Path, empty: str) -> None:
    prefix = small_csv(tmp_path)
    Path(f"{prefix}_val.csv").write_text(empty)
    with pytest.raises(DataError, match=r"d_val\.csv: .*(empty|no data rows)"):
        prepare(prefix, "csv", tmp_path / "sub" / "x")
    assert not (tmp_path / "sub").exists()  # parents created for the cache are removed too


def test_empty_train_split_names_file(tmp_path: Path) -> None:
    prefix = write_splits(tmp_path, ".tsv", "", criteo_row(), criteo_row())
    with pytest.raises(DataError, match=r"d_train\.tsv"):
        prepare(prefix, "criteo", tmp_path / "x")
    assert_clean(tmp_path, tmp_path / "x")


def test_failed_rebuild_keeps_previous_cache(tmp_path: Path) -> None:
    prefix = small_csv(tmp_path)
    cache = tmp_path / "cache"
    prepare(prefix, "csv", cache)
    Path(f"{prefix}_val.csv").write_text("label,f,g\n5,a,x\n")
    with pytest.raises(DataError, match="line 2"):
        prepare(prefix, "csv", cache)
    assert len(load_prepared(cache).val) == 4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_vocab_encode_paths_agree() -> None:
    from torchrec_dimgrow.data.vocab import FieldVocab

    vocab = FieldVocab(pa.array([f"v{i}" for i in range(100)]))
    column = pa.array(["v3", "zz", "v99", "v3", "v0"])
    expected = [4, 0, 100, 4, 1]
    assert vocab.encode(column).tolist() == expected  # 100 values > 4 x 5 rows: dict path
    assert vocab.encode(pa.array(column.to_pylist() * 40)).tolist() == expected * 40  # index_in path


def test_avazu_header_detected_per_file(tmp_path: Path) -> None:
    header = "id,click,hour,C1,site_id\n"
    rows = "1,0,14102105,1005,s1\n2,1,14102223,1005,s2\n3,0,14102105,1005,s1\n"
    prefix = write_splits(tmp_path, ".csv", header + rows, header + rows, rows)
    data = prepare(prefix, "avazu", tmp_path / "az", min_count=1)
    assert data.fields == ["hour", "C1", "site_id"]
    assert [len(data.train), len(data.val), len(data.test)] == [3, 3, 3]
    assert set(vocab_of(tmp_path / "az", "hour")) == {"5", "23"}
    np.testing.assert_array_equal(data.test.ids, data.train.ids)
