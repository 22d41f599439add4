"""Label-fraction split files and the subject hash split."""

import io
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from place_tf.data import manifest, schema, splits

M = schema.LABEL_MISSING


def test_hash_split_is_stable_per_subject_and_follows_fractions():
    ids = [f"subject{i}" for i in range(20000)]
    got = [splits.hash_split(i) for i in ids]
    assert got == [splits.hash_split(i) for i in ids]  # deterministic
    c = Counter(got)
    assert abs(c["train"] / len(ids) - 0.8) < 0.02
    assert abs(c["validate"] / len(ids) - 0.1) < 0.01
    assert abs(c["test"] / len(ids) - 0.1) < 0.01
    salted = [splits.hash_split(i, salt="other") for i in ids[:500]]
    assert salted != got[:500]  # the salt reshuffles subjects
    assert {splits.hash_split(i, (0.5, 0.5, 0.0)) for i in ids[:2000]} == {"train", "validate"}
    assert {splits.hash_split(i, (0.0, 0.0, 1.0)) for i in ids[:200]} == {"test"}


@pytest.mark.parametrize(
    "fractions,match",
    [
        ((0.8, 0.1), "2 fractions for 3 names"),
        ((0.8, 0.3, 0.1), "sum to 1"),
        ((1.2, -0.1, -0.1), ">= 0"),
    ],
)
def test_hash_split_rejects_bad_fractions(fractions, match):
    with pytest.raises(ValueError, match=match):
        splits.hash_split("a", fractions)


def test_split_file_names():
    assert splits.split_file_name(0.01) == "train_1pct.txt"
    assert splits.split_file_name(0.1) == "train_10pct.txt"
    assert splits.split_file_name(1.0) == "train_100pct.txt"
    assert splits.split_file_name(0.005) == "train_0.5pct.txt"
    with pytest.raises(ValueError):
        splits.split_file_name(0.0)


def _class_examples():
    # 70 / 24 / 6 examples of classes 0 / 1 / 2.
    labels = [0] * 70 + [1] * 24 + [2] * 6
    return [(f"img{i:03d}", c, [M] * schema.NUM_CHEXPERT) for i, c in enumerate(labels)]


def test_class_stratified_sizes_nesting_and_determinism():
    ex = _class_examples()
    subsets = splits.label_fraction_subsets(ex, seed=0)
    cls = {i: c for i, c, _ in ex}
    # round(f * n_c), at least 1 per present class
    assert Counter(cls[i] for i in subsets[0.01]) == {0: 1, 1: 1, 2: 1}
    assert Counter(cls[i] for i in subsets[0.1]) == {0: 7, 1: 2, 2: 1}
    assert len(subsets[1.0]) == 100
    assert set(subsets[0.01]) <= set(subsets[0.1]) <= set(subsets[1.0])
    assert subsets == splits.label_fraction_subsets(list(reversed(ex)), seed=0)
    assert subsets[0.1] != splits.label_fraction_subsets(ex, seed=1)[0.1]


def test_chexpert_mode_keeps_a_positive_of_every_label():
    ex = []
    for i in range(200):
        v = [0] * schema.NUM_CHEXPERT
        v[i % 13] = 1
        if i == 7:
            v[13] = 1  # the only Support Devices positive
        ex.append((f"x{i:03d}", -1, v))
    subsets = splits.label_fraction_subsets(ex, seed=5)
    vec = {i: v for i, _, v in ex}
    for f, ids in subsets.items():
        covered = {k for i in ids for k in range(schema.NUM_CHEXPERT) if vec[i][k] == 1}
        assert covered == set(range(schema.NUM_CHEXPERT)), f
    assert "x007" in subsets[0.01]
    assert 13 <= len(subsets[0.01]) <= 14  # grown past round(0.01 * 200) = 2 for coverage
    assert len(subsets[0.1]) == 20 and len(subsets[1.0]) == 200
    assert set(subsets[0.01]) <= set(subsets[0.1])


def _png(seed):
    arr = np.random.default_rng(seed).integers(0, 255, size=(8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _corpus(path, n=40):
    m = manifest.Manifest(source="test")
    w = manifest.ShardedWriter(str(path), m, {"train": 2, "test": 1})
    for i in range(n):
        rec = schema.ExampleRecord(
            image=_png(i),
            image_format="png",
            height=8,
            width=8,
            image_id=f"id{i:02d}",
            class_label=int(i % 4 == 0),  # 10 positives, 30 negatives
        )
        w.write("train", schema.to_example(rec).SerializeToString())
    w.close()
    m.write(str(path))


def test_write_and_load_split_files(tmp_path):
    _corpus(tmp_path)
    paths = splits.write_label_fraction_splits(str(tmp_path), fractions=(0.1, 0.5, 1.0), seed=0)
    assert {os.path.basename(p) for p in paths.values()} == {
        "train_10pct.txt",
        "train_50pct.txt",
        "train_100pct.txt",
    }
    assert all(os.path.dirname(p) == str(tmp_path / "splits") for p in paths.values())
    ids = {f: splits.load_split_ids(p) for f, p in paths.items()}
    assert len(ids[0.1]) == 4  # 3 of 30 negatives + 1 of 10 positives
    assert sum(int(i[2:]) % 4 == 0 for i in ids[0.1]) == 1
    assert len(ids[0.5]) == 20 and len(ids[1.0]) == 40
    assert ids[1.0] == [f"id{i:02d}" for i in range(40)]
    with open(paths[0.1]) as f:
        first = f.read()
    assert first.startswith("# place_tf label-fraction split")
    splits.write_label_fraction_splits(str(tmp_path), fractions=(0.1,), seed=0)
    with open(paths[0.1]) as f:
        assert f.read() == first  # deterministic


def test_load_split_ids_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_1pct.txt"):
        splits.load_split_ids(str(tmp_path / "splits" / "train_1pct.txt"))


def test_load_split_ids_skips_comments_and_blanks(tmp_path):
    p = tmp_path / "s.txt"
    p.write_text("# header\n\na\n b \n#c\n")
    assert splits.load_split_ids(str(p)) == ["a", "b"]
