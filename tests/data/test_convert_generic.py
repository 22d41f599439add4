"""`generic` (your own CSV) and `r2gen` (R2Gen annotation.json) converters, peer split files
(--splits_from) and shard planning, on small trees."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from place_tf.data import manifest, schema, tokenizer
from place_tf.data.convert import beam_skeleton as bs
from place_tf.data.convert import generic, r2gen

BEAM_ARGS = ["--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1"]


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _png(seed: int, h: int = 24, w: int = 20) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, size=(h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _records(out):
    import tensorflow as tf

    m = manifest.read_manifest(out)
    recs = {}
    for split in m["splits"]:
        for path in manifest.split_files(out, split):
            for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
                rec = schema.from_example(raw)
                recs[rec.image_id] = rec
    return m, recs


def test_generic_csv_reports_labels_splits_and_vocabulary(tmp_path):
    root, out = str(tmp_path / "mine"), str(tmp_path / "out")
    rows = [
        "image_path,report,split,Cardiomegaly,Edema,label",
        'a.png,"FINDINGS: Heart is enlarged.\nIMPRESSION: Cardiomegaly.",train,1.0,,1',
        "sub/b.png,Lungs are clear without effusion.,train,0.0,0,0",  # plain text -> findings
        "c.png,,valid,,,",  # no report: kept (label-only row), split valid -> validate
        "d.png,Zebraword only in test.,test,,-1.0,",
        "e.png,Missing file.,train,,,",  # missing_image
        "f.png,Bad label.,train,yes,,",  # malformed_row
        "g.png,Bad split.,holdout,,,",  # malformed_row
    ]
    _write(os.path.join(root, "data.csv"), ("\n".join(rows) + "\n").encode())
    for i, name in enumerate(["a.png", "sub/b.png", "c.png", "d.png", "f.png", "g.png"]):
        _write(os.path.join(root, name), _png(i))
    m = bs.run_conversion(generic.GenericConverter(root), out, beam_args=BEAM_ARGS)
    assert m["skipped"] == {"missing_image": 1, "malformed_row": 2}
    assert {s: v["examples"] for s, v in m["splits"].items()} == {
        "train": 2,
        "validate": 1,
        "test": 1,
    }
    _, recs = _records(out)
    a, b, c = recs["a.png"], recs["sub/b.png"], recs["c.png"]
    assert (a.findings, a.impression) == ("Heart is enlarged.", "Cardiomegaly.")
    assert (b.findings, b.impression) == ("Lungs are clear without effusion.", "")
    assert (c.findings, c.impression, c.split) == ("", "", "validate")
    card, edema = schema.label_index("Cardiomegaly"), schema.label_index("Edema")
    assert (a.chexpert[card], a.chexpert[edema], a.class_label) == (1, schema.LABEL_MISSING, 1)
    assert (b.chexpert[card], b.chexpert[edema], b.class_label) == (0, 0, 0)
    assert recs["d.png"].chexpert[edema] == -1 and recs["d.png"].class_label == -1
    # vocab.txt from the 2 train reports only: their letters are in it, the "z" of the test
    # report's "Zebraword" is not (words seen once stay pieces in a WordPiece vocabulary).
    vocab = tokenizer.load_vocabulary(os.path.join(out, "vocab.txt"))
    assert {"h", "##t", "."} <= set(vocab) and not {"z", "##z"} & set(vocab)
    assert m["generator"]["vocabulary"]["reports"] == 2


def test_generic_require_report_and_missing_csv(tmp_path):
    root = str(tmp_path / "mine")
    with pytest.raises(bs.LayoutError, match="data.csv not found"):
        generic.GenericConverter(root).check_layout()
    _write(os.path.join(root, "data.csv"), b"path,report\nx.png,\n")
    with pytest.raises(bs.LayoutError, match=r"missing column\(s\) \['image_path'\]"):
        generic.GenericConverter(root).check_layout()
    conv = generic.GenericConverter(root, image_column="path", require_report=True)
    conv.check_layout()
    _write(os.path.join(root, "x.png"), _png(0))
    (row,) = list(conv.rows())
    assert conv.convert_row(row) == bs.Skipped(bs.EMPTY_REPORT, "x.png")


def _r2gen_tree(root):
    ann = {
        "train": [
            {"id": "CXR1_1_IM-0001", "report": "The heart is normal. No effusion.",
             "image_path": ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png"], "split": "train"},
            {"id": "CXR2_1_IM-0002", "report": "Mild cardiomegaly.",
             "image_path": ["CXR2_1_IM-0002/0.png", "CXR2_1_IM-0002/1.png"], "split": "train"},
            {"id": "CXR3", "report": "No image list.", "image_path": "CXR3/0.png"},
            {"id": "CXR4", "report": "  ", "image_path": ["CXR4/0.png"], "split": "train"},
        ],
        "val": [{"id": "CXR5", "report": "Clear lungs.", "image_path": ["CXR5/0.png"],
                 "split": "val"}],
        "test": [{"id": "CXR6", "report": "Small effusion.", "image_path": ["CXR6/0.png"],
                  "split": "test"}],
    }  # fmt: skip
    _write(os.path.join(root, "annotation.json"), json.dumps(ann).encode())
    for i, rel in enumerate(
        ["CXR1_1_IM-0001/0.png", "CXR1_1_IM-0001/1.png", "CXR2_1_IM-0002/0.png"]
        + ["CXR4/0.png", "CXR5/0.png", "CXR6/0.png"]
    ):
        _write(os.path.join(root, "images", rel), _png(10 + i))


@pytest.mark.parametrize("images, train", [("first", 2), ("all", 3)])
def test_r2gen_annotation_splits_and_skips(tmp_path, images, train):
    root, out = str(tmp_path / "iu_xray"), str(tmp_path / "out")
    _r2gen_tree(root)
    conv = r2gen.R2GenConverter(root, images=images, source_name="iu_xray")
    m = bs.run_conversion(conv, out, beam_args=BEAM_ARGS)
    assert m["source"] == "iu_xray"
    counts = {s: v["examples"] for s, v in m["splits"].items()}
    assert counts == {"train": train, "validate": 1, "test": 1}
    # CXR2's second image is not on disk: only `all` reads it.
    want = {"malformed_row": 1, "empty_report": 1}
    if images == "all":
        want["missing_image"] = 1
    assert m["skipped"] == want
    _, recs = _records(out)
    assert recs["CXR6/0.png"].findings == "Small effusion." and recs["CXR6/0.png"].split == "test"
    assert recs["CXR1_1_IM-0001/0.png"].study_id == "CXR1_1_IM-0001"
    assert os.path.exists(os.path.join(out, "vocab.txt"))


def test_read_split_file_forms_and_errors(tmp_path):
    one = tmp_path / "split.csv"
    one.write_text("Path,Split\nCheXpert-v1.0-small/train/p1/s1/v.jpg,train\nx/q.jpg,valid\n")
    got = bs.read_split_file(str(one))
    assert got == {"CheXpert-v1.0-small/train/p1/s1/v.jpg": "train", "x/q.jpg": "validate"}
    got = bs.read_split_file(str(one), lambda v: v.rsplit("/", 1)[-1])  # a converter's key
    assert got == {"v.jpg": "train", "q.jpg": "validate"}
    (tmp_path / "tr.csv").write_text("patientId\nP1\nP2\n")
    (tmp_path / "te.csv").write_text("patientId,bbox\nP3,\n")
    spec = f"train={tmp_path / 'tr.csv'},test={tmp_path / 'te.csv'}"
    assert bs.read_split_file(spec) == {"P1": "train", "P2": "train", "P3": "test"}
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageId,split\nA,train\nB,holdout\n")
    with pytest.raises(bs.LayoutError, match=r"bad.csv:3: split 'holdout' is unknown"):
        bs.read_split_file(str(bad))
    twice = tmp_path / "twice.csv"
    twice.write_text("ImageId,split\nA,train\nA,test\n")
    with pytest.raises(bs.LayoutError, match="twice.csv:3: an image is in two splits"):
        bs.read_split_file(str(twice))
    with pytest.raises(bs.LayoutError, match="needs an id column"):
        (tmp_path / "noid.csv").write_text("name,split\nA,train\n")
        bs.read_split_file(str(tmp_path / "noid.csv"))


class _Sized(bs.Converter):
    name = "sized"

    def __init__(self, root, n_train, n_test):
        super().__init__(root)
        self.n = {"train": n_train, "test": n_test}

    def rows(self):
        for split, n in self.n.items():
            for i in range(n):
                yield {"_key": f"{split}{i}", "split": split, "image_path": self.input_dir + "/x"}
        yield bs.Skipped(bs.MALFORMED_ROW)


def test_plan_shards_follows_rows_and_image_bytes(tmp_path):
    _write(str(tmp_path / "x"), b"\0" * 1000)  # every image 1000 bytes
    conv = _Sized(str(tmp_path), 2500, 3)
    counts, plan = bs.plan_shards(conv, target_shard_bytes=1_000_000)
    # train: 2500 * 1000 B / 1 MB -> 3 shards; validate 0 rows -> 1; test 3 rows -> 1.
    assert counts == {"train": 3, "validate": 1, "test": 1}
    assert plan["estimated_example_bytes"] == 1000
    assert plan["rows"] == {"train": 2500, "validate": 0, "test": 3}
    counts, _ = bs.plan_shards(conv, examples_per_shard=1000)
    assert counts == {"train": 3, "validate": 1, "test": 1}
    counts, _ = bs.plan_shards(conv, target_shard_bytes=100)  # never more shards than rows
    assert counts == {"train": 2500, "validate": 1, "test": 3}
