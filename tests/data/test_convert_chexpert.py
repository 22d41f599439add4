"""CheXpert converter, uncertain-label policies and the 5x200 subset on fixture trees."""

import csv
import io
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from place_tf.data import manifest, schema
from place_tf.data.convert import beam_skeleton as bs
from place_tf.data.convert import chexpert

BEAM_ARGS = ["--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1"]
PREFIX = "CheXpert-v1.0-small"
M = schema.LABEL_MISSING


def _jpeg(seed: int, h: int = 36, w: int = 30) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, size=(h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _csv(path, rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(chexpert.CSV_COLUMNS)
    for r in rows:
        w.writerow(r)
    _write(path, buf.getvalue().encode("utf-8"))


def _row(rel, fl="Frontal", appa="AP", **labels):
    cells = [labels.get(n.replace(" ", "_"), "") for n in schema.CHEXPERT_LABELS]
    return [f"{PREFIX}/{rel}", "Female", "68", fl, appa if fl == "Frontal" else "", *cells]


# Labels of the first training image: Atelectasis 1, Cardiomegaly -1, Edema 0, rest blank.
IMG1 = "train/patient00001/study1/view1_frontal.jpg"
IMG1_LABELS = {"Atelectasis": "1.0", "Cardiomegaly": "-1.0", "Edema": "0.0"}


def make_tree(root):
    images = {}
    train = [
        _row(IMG1, appa="PA", **IMG1_LABELS),
        _row("train/patient00001/study1/view2_lateral.jpg", fl="Lateral"),  # view_not_selected
        _row("train/patient00002/study1/view1_frontal.jpg"),  # missing_image
        _row("train/patient00003/study1/view1_frontal.jpg"),  # truncated_image
        _row("train/patient00005/study1/view1_frontal.jpg", Edema="yes"),  # malformed_row
        ["../../etc/passwd", "Male", "1", "Frontal", "AP"] + [""] * 14,  # malformed_row
        ["short", "row"],  # malformed_row (cell count)
        _row("train/patient00004/study2/view1_frontal.jpg", No_Finding="1.0"),  # train
        _row("train/patient00006/study1/view1_frontal.jpg"),  # excluded
    ]
    valid = [
        _row("valid/patient64541/study1/view1_frontal.jpg", Edema="1.0"),  # validate
    ]
    for i, r in enumerate(train + valid):
        rel = r[0][len(PREFIX) + 1 :]
        if not rel.startswith(("train/", "valid/")):
            continue
        data = _jpeg(i)
        images[rel] = data
        if "patient00002/" in rel:
            continue
        _write(os.path.join(root, rel), data[:300] if "patient00003/" in rel else data)
    _csv(os.path.join(root, "train.csv"), train)
    _csv(os.path.join(root, "valid.csv"), valid)
    return images


def read_records(out):
    import tensorflow as tf

    m = manifest.read_manifest(out)
    recs = {}
    for split in m["splits"]:
        for path in manifest.split_files(out, split):
            for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
                rec = schema.from_example(raw)
                recs[rec.image_id] = rec
    return m, recs


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    base = tmp_path_factory.mktemp("chexpert")
    root, out = str(base / PREFIX), str(base / "out")
    images = make_tree(root)
    exclude = str(base / "exclude.csv")
    _write(exclude, f"Path\n{PREFIX}/train/patient00006/study1/view1_frontal.jpg\n".encode())
    conv = chexpert.ChexpertConverter(
        root, uncertain_policy="ones", exclude=exclude, validate_holdout=0
    )
    bs.run_conversion(conv, out, shards=1, eval_shards=1, beam_args=BEAM_ARGS)
    return root, out, images


def test_counts_and_skips(converted):
    _, out, _ = converted
    m = manifest.read_manifest(out)
    assert m["source"] == "chexpert"
    # No test.csv: valid.csv is the test split (MGCA); no hold-out asked for here.
    assert {s: v["examples"] for s, v in m["splits"].items()} == {
        "train": 2,
        "validate": 0,
        "test": 1,
    }
    assert m["skipped"] == {
        "view_not_selected": 1,
        "missing_image": 1,
        "truncated_image": 1,
        "malformed_row": 3,
        "excluded": 1,
    }
    assert sorted(m["source_checksums"]) == ["train.csv", "valid.csv"]


def test_records_use_relative_ids_and_the_uncertain_policy(converted):
    _, out, images = converted
    _, recs = read_records(out)
    assert set(recs) == {
        IMG1,
        "train/patient00004/study2/view1_frontal.jpg",
        "valid/patient64541/study1/view1_frontal.jpg",
    }
    r = recs[IMG1]
    assert r.image == images[IMG1]
    assert (r.height, r.width, r.image_format, r.view) == (36, 30, "jpeg", "PA")
    assert (r.subject_id, r.study_id, r.split) == ("patient00001", "patient00001/study1", "train")
    want = [M] * schema.NUM_CHEXPERT
    want[schema.label_index("Atelectasis")] = 1
    want[schema.label_index("Cardiomegaly")] = 1  # -1.0 under "ones"
    want[schema.label_index("Edema")] = 0
    assert list(r.chexpert) == want
    assert recs["valid/patient64541/study1/view1_frontal.jpg"].split == "test"


@pytest.mark.parametrize(
    "policy,uncertain",
    [("keep", -1), ("ones", 1), ("zeros", 0), ("ignore", schema.LABEL_MISSING)],
)
def test_uncertain_policy_mapping(policy, uncertain):
    row = dict(zip(chexpert.CSV_COLUMNS, _row(IMG1, **IMG1_LABELS), strict=True))
    got = chexpert.parse_chexpert_row(row, policy)["chexpert"]
    assert got[schema.label_index("Cardiomegaly")] == uncertain
    assert got[schema.label_index("Atelectasis")] == 1
    assert got[schema.label_index("Edema")] == 0
    assert got[schema.label_index("Pneumonia")] == schema.LABEL_MISSING  # blank stays missing
    assert chexpert.apply_uncertain_policy([-1, 0, 1, M], policy) == [uncertain, 0, 1, M]


def test_parse_chexpert_row_fields():
    row = dict(zip(chexpert.CSV_COLUMNS, _row(IMG1, appa="pa"), strict=True))
    got = chexpert.parse_chexpert_row(row)
    assert got["rel_path"] == IMG1 and got["view"] == "PA" and got["frontal"]
    lat = dict(row, **{"Frontal/Lateral": "Lateral"})
    assert chexpert.parse_chexpert_row(lat)["view"] == "LATERAL"
    for bad in (
        dict(row, Path="/abs/train/patient1/study1/v.jpg"),
        dict(row, Path="x/train/../patient1/study1/v.jpg"),
        dict(row, Path="train/study1/v.jpg"),
        dict(row, **{"Frontal/Lateral": "Oblique"}),
        dict(row, Edema="2"),
        {k: v for k, v in row.items() if k != "Edema"},
    ):
        with pytest.raises(bs.ParseError):
            chexpert.parse_chexpert_row(bad)


def test_wrong_layout_names_the_expected_file(tmp_path):
    make_tree(str(tmp_path))
    os.remove(tmp_path / "valid.csv")
    with pytest.raises(bs.LayoutError, match="'valid.csv'"):
        chexpert.ChexpertConverter(str(tmp_path)).check_layout()


def test_wrong_csv_header_names_the_missing_column(tmp_path):
    make_tree(str(tmp_path))
    _write(str(tmp_path / "train.csv"), b"Path,Sex\nx,y\n")
    conv = chexpert.ChexpertConverter(str(tmp_path))
    with pytest.raises(bs.LayoutError, match=r"train.csv: missing column\(s\) \['Age'"):
        list(conv.rows())


# ---------------------------------------------------------------- 5x200


def make_5x200_tree(root, per_label=3):
    """per_label single-positive candidates per competition label, plus distractors."""
    rows, n = [], 0
    for label in schema.COMPETITION_LABELS:
        for _ in range(per_label):
            n += 1
            other = "Edema" if label != "Edema" else "Atelectasis"  # a 0.0 among the others
            labels = {label.replace(" ", "_"): "1.0", other: "0.0"}
            rows.append(_row(f"train/patient{n:05d}/study1/view1_frontal.jpg", **labels))
    distractors = [
        _row("train/patient90001/study1/view1_frontal.jpg", Atelectasis="1.0", Edema="1.0"),
        _row("train/patient90002/study1/view1_frontal.jpg", Atelectasis="1.0", Edema="-1.0"),
        _row("train/patient90003/study1/view2_lateral.jpg", fl="Lateral", Atelectasis="1.0"),
        _row("train/patient90004/study1/view1_frontal.jpg", No_Finding="1.0"),
        # MGCA's rule: every label but No Finding must be 0 or blank besides the one.
        _row("train/patient90005/study1/view1_frontal.jpg", Atelectasis="1.0", Pneumonia="1.0"),
        _row("train/patient90006/study1/view1_frontal.jpg", Edema="1.0", Fracture="-1.0"),
    ]
    rows += distractors
    for i, r in enumerate(rows):
        _write(os.path.join(root, r[0][len(PREFIX) + 1 :]), _jpeg(100 + i))
    _csv(os.path.join(root, "train.csv"), rows)
    _csv(os.path.join(root, "valid.csv"), [])
    return rows


def test_select_5x200_is_single_positive_seeded_and_deterministic(tmp_path):
    rows = make_5x200_tree(str(tmp_path))
    dict_rows = [dict(zip(chexpert.CSV_COLUMNS, r, strict=True)) for r in rows]
    a = chexpert.select_5x200(dict_rows, per_class=2, seed=0)
    b = chexpert.select_5x200(list(reversed(dict_rows)), per_class=2, seed=0)
    assert [(r["Path"], lab) for r, lab in a] == [(r["Path"], lab) for r, lab in b]
    assert [lab for _, lab in a] == [lab for lab in schema.COMPETITION_LABELS for _ in range(2)]
    for r, lab in a:
        positives = [c for c in schema.COMPETITION_LABELS if r[c] == "1.0"]
        assert positives == [lab]
        assert "patient9000" not in r["Path"]
    seeds = {
        tuple(r["Path"] for r, _ in chexpert.select_5x200(dict_rows, per_class=2, seed=s))
        for s in range(6)
    }
    assert len(seeds) > 1  # the seed matters
    with pytest.raises(ValueError, match="only 3 images are positive for 'Atelectasis' alone"):
        chexpert.select_5x200(dict_rows, per_class=4, seed=0)


def test_build_chexpert_5x200_writes_csv_and_test_split(tmp_path):
    root, out = str(tmp_path / PREFIX), str(tmp_path / "5x200")
    make_5x200_tree(root)
    m = chexpert.build_chexpert_5x200(root, out, per_class=2, seed=3, beam_args=BEAM_ARGS)
    assert m["source"] == "chexpert-5x200"
    assert list(m["splits"]) == ["test"] and m["splits"]["test"]["examples"] == 10
    assert m["skipped"] == {}
    with open(os.path.join(out, chexpert.FIVE_X_200_CSV)) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10
    assert list(table[0]) == ["Path", "label", *schema.COMPETITION_LABELS]
    _, recs = read_records(out)
    assert len(recs) == 10
    for row in table:
        rec = recs[row["Path"][len(PREFIX) + 1 :]]
        assert rec.split == "test"
        assert rec.class_label == schema.COMPETITION_LABELS.index(row["label"])
        assert rec.chexpert[schema.label_index(row["label"])] == 1


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(chexpert.CSV_COLUMNS),
        st.one_of(st.sampled_from(["1.0", "-1.0", "0", "", "Frontal", "AP"]), st.text(max_size=30)),
    ),
    st.sampled_from(chexpert.UNCERTAIN_POLICIES),
)
def test_fuzz_parse_chexpert_row_raises_only_parse_errors(row, policy):
    try:
        got = chexpert.parse_chexpert_row(row, policy)
    except bs.ParseError:
        return
    assert len(got["chexpert"]) == schema.NUM_CHEXPERT
    assert ".." not in got["rel_path"].split("/")


def test_split_protocol_official_with_test_csv_else_mgca_holdout(tmp_path):
    root = str(tmp_path / PREFIX)
    train = [_row(f"train/patient{i:05d}/study1/view1_frontal.jpg") for i in range(1, 11)]
    valid = [_row("valid/patient64541/study1/view1_frontal.jpg")]
    _csv(os.path.join(root, "train.csv"), train)
    _csv(os.path.join(root, "valid.csv"), valid)
    for r in train + valid:
        _write(os.path.join(root, r[0][len(PREFIX) + 1 :]), _jpeg(0))

    def splits_of(conv):
        conv.check_layout()
        return {r["rel_path"]: r["split"] for r in conv.rows() if isinstance(r, dict)}

    got = splits_of(chexpert.ChexpertConverter(root, validate_holdout=3, seed=0))
    held = {int(j) + 1 for j in np.random.RandomState(0).choice(10, 3, replace=False)}
    assert got["valid/patient64541/study1/view1_frontal.jpg"] == "test"
    for i in range(1, 11):
        want = "validate" if i in held else "train"
        assert got[f"train/patient{i:05d}/study1/view1_frontal.jpg"] == want
    with pytest.raises(bs.LayoutError, match="--validate_holdout 11 exceeds its 10 usable rows"):
        splits_of(chexpert.ChexpertConverter(root, validate_holdout=11))
    # With test.csv (and test/) the official split is kept: no hold-out.
    test = [_row("test/patient64741/study1/view1_frontal.jpg")]
    _csv(os.path.join(root, "test.csv"), test)
    _write(os.path.join(root, test[0][0][len(PREFIX) + 1 :]), _jpeg(1))
    conv = chexpert.ChexpertConverter(root, validate_holdout=3)
    got = splits_of(conv)
    assert conv.options()["protocol"] == "official"
    assert sorted(set(got.values())) == ["test", "train", "validate"]
    assert sum(v == "train" for v in got.values()) == 10
    assert got["valid/patient64541/study1/view1_frontal.jpg"] == "validate"
