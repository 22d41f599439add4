"""place_tf.data.pipeline: batches of contract (a), determinism, sharding, counted skips."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from place_tf.data import manifest as manifest_lib
from place_tf.data import pipeline as P
from place_tf.data import schema
from place_tf.data.tokenizer import ReportTokenizer

SIZE = 32
MAXLEN = 8
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "finding", "."] + [str(i) for i in range(60)]


def _png(h, w, value=None, mode="L", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = np.full((h, w), value, np.uint16)
        img = Image.fromarray(arr)  # PIL picks I;16 for uint16
    else:
        arr = (
            np.full((h, w), value, np.uint8)
            if value is not None
            else rng.integers(0, 256, (h, w), dtype=np.uint8)
        )
        img = Image.fromarray(arr, mode="L")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_rgb(h, w, rgb):
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w, 3), rgb, np.uint8), mode="RGB").save(
        buf, format="JPEG", quality=100
    )
    return buf.getvalue()


def _example(i, **overrides):
    fields = dict(
        image=_png(40, 32, value=(i * 7) % 256),
        image_format="png",
        height=40,
        width=32,
        image_id=f"img{i}",
        findings=f"finding {i}.",
        impression="",
        chexpert=[1 if (j == i % 14) else schema.LABEL_MISSING for j in range(14)],
        class_label=i % 3,
    )
    fields.update(overrides)
    return schema.to_example(schema.ExampleRecord(**fields)).SerializeToString()


def _write(path, records, garbage=b""):
    with tf.io.TFRecordWriter(path) as w:
        for r in records:
            w.write(r)
    if garbage:
        with open(path, "ab") as f:
            f.write(garbage)
    return path


@pytest.fixture(scope="module")
def tok():
    return ReportTokenizer(VOCAB, max_length=MAXLEN)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus dir: 12 train examples (ids 0..11) in 3 shards, 5 test examples in 1."""
    d = str(tmp_path_factory.mktemp("corpus"))
    man = manifest_lib.Manifest(source="unit")
    w = manifest_lib.ShardedWriter(d, man, {"train": 3, "test": 1})
    for i in range(12):
        w.write("train", _example(i))
    for i in range(40, 45):
        w.write("test", _example(i))
    w.close()
    man.write(d)
    return d


def _example_ids(batches):
    """The example number i of every row, read back from its tokens '[CLS] finding i . [SEP]'."""
    out = []
    for b in batches:
        for row in np.asarray(b["token_ids"]):
            out.append(int(VOCAB[row[2]]))
    return out


def test_batches_follow_contract_a(corpus, tok):
    ds = P.make_dataset(corpus, "train", tok, 4, image_size=SIZE, training=True, deterministic=True)
    assert ds.cardinality().numpy() == tf.data.INFINITE_CARDINALITY  # repeat defaults to training
    batches = list(ds.take(4).as_numpy_iterator())
    for b in batches:
        assert set(b) == {"image", "token_ids", "padding_mask", "labels"}
        assert b["image"].shape == (4, SIZE, SIZE, 1) and b["image"].dtype == np.float32
        assert b["token_ids"].shape == (4, MAXLEN) and b["token_ids"].dtype == np.int32
        assert b["padding_mask"].shape == (4, MAXLEN) and b["padding_mask"].dtype == bool
        assert b["labels"].shape == (4, 14) and b["labels"].dtype == np.float32
        assert b["image"].min() >= -1.0 and b["image"].max() <= 1.0
        # [CLS] finding i . [SEP] [PAD]...: 5 real tokens.
        np.testing.assert_array_equal(b["token_ids"][:, 0], tok.cls_id)
        np.testing.assert_array_equal(b["token_ids"][:, 4], tok.sep_id)
        np.testing.assert_array_equal(b["padding_mask"].sum(1), 5)
        for row, labels in zip(_example_ids([b]), b["labels"], strict=True):
            assert labels[row % 14] == 1.0
            assert np.sum(labels == 1.0) == 1 and np.sum(labels == -2.0) == 13
    # Three epochs of 12 examples = 9 full batches: every example appears once per epoch.
    ids = _example_ids(ds.take(9).as_numpy_iterator())
    assert sorted(ids) == sorted(list(range(12)) * 3)


def test_eval_images_are_resized_with_pad_and_normalised(corpus, tok):
    ds = P.make_eval_dataset(corpus, "test", tok, 2, image_size=SIZE, with_text=True)
    batches = list(ds.as_numpy_iterator())
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]  # no drop_remainder
    b = batches[0]
    assert set(b) == {"image", "labels", "class_label", "token_ids", "padding_mask", "report"}
    # 40x32 -> 32x26 (aspect kept) centred with 3 columns of zero padding on each side.
    value = (40 * 7) % 256  # example 40
    img = b["image"][0, :, :, 0]
    np.testing.assert_allclose(img[:, :3], -1.0)
    np.testing.assert_allclose(img[:, 29:], -1.0)
    np.testing.assert_allclose(img[:, 3:29], (value / 255.0 - 0.5) / 0.5, atol=1e-5)
    assert [r.decode() for r in b["report"]] == ["finding 40.", "finding 41."]
    np.testing.assert_array_equal(b["class_label"], [40 % 3, 41 % 3])
    # Without a tokenizer (pixel-only consumers): the same images, no token fields.
    (c, *_) = P.make_eval_dataset(corpus, "test", None, 2, image_size=SIZE).as_numpy_iterator()
    assert set(c) == {"image", "labels", "class_label"}
    np.testing.assert_array_equal(c["image"], b["image"])


def test_deterministic_mode_gives_identical_batches_and_augments(corpus, tok):
    def first(augment, seed=0):
        ds = P.make_dataset(
            corpus, "train", tok, 4, image_size=SIZE, deterministic=True, augment=augment, seed=seed
        )
        return list(ds.take(3).as_numpy_iterator())

    a, b = first(True), first(True)
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    plain = first(False)
    assert _example_ids(plain) == _example_ids(a)  # same examples, same order
    assert not np.allclose(plain[0]["image"], a[0]["image"])  # augmentation moved pixels
    assert not np.allclose(first(True, seed=1)[0]["image"], a[0]["image"])


def _context(n, i):
    return tf.distribute.InputContext(
        num_input_pipelines=n, input_pipeline_id=i, num_replicas_in_sync=n
    )


@pytest.mark.parametrize(
    "split,expected", [("train", list(range(12))), ("test", list(range(40, 45)))]
)
def test_per_replica_sharding_is_disjoint_and_complete(corpus, tok, split, expected):
    # train: 3 files over 2 pipelines (file sharding); test: 1 file (record sharding).
    seen = []
    for i in range(2):
        ds = P.make_dataset(
            corpus,
            split,
            tok,
            4,
            image_size=SIZE,
            training=False,
            repeat=False,
            input_context=_context(2, i),
        )
        batches = list(ds.as_numpy_iterator())
        assert all(b["image"].shape[0] <= 2 for b in batches)  # per-replica batch = 4 / 2
        seen.append(_example_ids(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == expected


def test_bad_records_are_skipped_and_counted(tmp_path, tok):
    good = list(range(6))
    png = _png(40, 32, value=10)
    f1 = _write(
        str(tmp_path / "a.tfrecord"),
        [
            _example(0),
            _example(90, image=b"this is not an image"),
            _example(1),
            _example(91, findings="", impression="  "),
            _example(2),
            _example(92, height=41),  # PNG header says 40 rows
            _example(93, image=png[:60]),  # PNG magic but truncated data: decode fails
        ],
        garbage=b"appended garbage bytes",
    )
    f2 = _write(
        str(tmp_path / "b.tfrecord"),
        [
            _example(3),
            b"\x0a\x05\x0a\x03abc\x12",  # framing fine, not a valid Example
            _example(4),
            _example(5, image=_jpeg_rgb(40, 32, (200, 100, 50)), image_format="jpeg"),
            _example(94, image=_jpeg_rgb(20, 32, (1, 2, 3)), image_format="jpeg"),  # wrong shape
        ],
    )
    counter = P.SkipCounter()
    ds = P.make_eval_dataset([f1, f2], "train", tok, 3, image_size=SIZE, skip_counter=counter)
    batches = list(ds.as_numpy_iterator())
    assert sorted(_example_ids(batches)) == good
    assert counter.as_dict() == {
        "corrupt_record": 2,  # garbage tail of a.tfrecord, the non-Example record
        "bad_image": 2,  # not an image, undecodable PNG
        "wrong_shape": 2,
        "empty_report": 1,
        "not_frontal": 0,
    }
    # RGB JPEG -> luminance: 0.2989*200 + 0.587*100 + 0.114*50 = 124.18 (JPEG tolerance).
    rows = {i: (b, k) for b in batches for k, i in enumerate(_example_ids([b]))}
    b, k = rows[5]
    centre = b["image"][k, 8:24, 10:22, 0]
    np.testing.assert_allclose(centre, (124.18 / 255 - 0.5) / 0.5, atol=0.03)
    # A second pass counts again (counts are per pass), the training path counts the same.
    counter.reset()
    train = P.make_dataset(
        [f1, f2], "train", tok, 2, image_size=SIZE, repeat=False, skip_counter=counter
    )
    assert sorted(_example_ids(train.as_numpy_iterator())) == good
    assert counter.total() == 7
    assert train.skip_counter is counter


def test_gzip_shards_are_read(tmp_path, tok):
    path = str(tmp_path / "data_tfrecord-00000-of-00001.gz")  # as TFX ImportExampleGen writes
    with tf.io.TFRecordWriter(path, options="GZIP") as w:
        for i in (3, 4, 5):
            w.write(_example(i))
    counter = P.SkipCounter()
    ds = P.make_eval_dataset(path, "train", tok, 2, image_size=SIZE, skip_counter=counter)
    assert _example_ids(ds.as_numpy_iterator()) == [3, 4, 5]
    assert counter.total() == 0


def test_sixteen_bit_png_is_scaled_to_8bit_range(tmp_path, tok):
    f = _write(
        str(tmp_path / "c.tfrecord"),
        [_example(7, image=_png(32, 32, value=32896, mode="I;16"), height=32, width=32)],
    )
    (b,) = list(P.make_eval_dataset([f], "train", tok, 1, image_size=SIZE).as_numpy_iterator())
    # 32896 / 257 = 128 -> (128/255 - 0.5) / 0.5
    np.testing.assert_allclose(b["image"], (128 / 255 - 0.5) / 0.5, atol=1e-5)


def test_missing_shard_is_named(tmp_path, tok, corpus):
    missing = str(tmp_path / "nope-00000.tfrecord")
    with pytest.raises(FileNotFoundError, match="nope-00000.tfrecord"):
        P.make_dataset([missing], "train", tok, 2)
    with pytest.raises(FileNotFoundError, match="no TFRecord shard matches"):
        P.make_dataset(str(tmp_path / "*.tfrecord"), "train", tok, 2)
    # A corpus whose manifest lists a shard that is gone.
    d = tmp_path / "broken"
    d.mkdir()
    for name in os.listdir(corpus):
        (d / name).write_bytes((open(os.path.join(corpus, name), "rb")).read())
    gone = manifest_lib.read_manifest(str(d))["splits"]["train"]["shards"][1]
    os.remove(d / gone)
    with pytest.raises(FileNotFoundError, match=gone):
        P.make_dataset(str(d), "train", tok, 2)


def test_skip_counter_rejects_unknown_reason():
    c = P.SkipCounter()
    with pytest.raises(ValueError, match="unknown skip reason"):
        c.add("bogus", 1)
    c.add("bad_image", 3)
    assert c.as_dict()["bad_image"] == 3 and c.total() == 3


def test_label_only_examples_are_kept_for_image_tasks_and_skipped_for_text(tmp_path, tok, corpus):
    """CheXpert / RSNA / COVIDx corpora have no report text: image-only evaluation reads
    every example (require_report=False), text consumers still skip and count them."""
    from place_tf.evaluate import task_data

    d = str(tmp_path / "labels_only")
    man = manifest_lib.Manifest(source="chexpert")
    w = manifest_lib.ShardedWriter(d, man, {"train": 2, "test": 1})
    for i in range(5):
        w.write("train", _example(i, findings="", impression="", class_label=i % 2))
    w.write("test", _example(7, findings="", impression=""))
    w.close()
    man.write(d)
    counter = P.SkipCounter()
    ds = P.make_eval_dataset(d, "train", None, 2, image_size=SIZE, require_report=False)
    labels = np.concatenate([b["class_label"] for b in ds.as_numpy_iterator()])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]
    ds = P.make_eval_dataset(d, "train", tok, 2, image_size=SIZE, skip_counter=counter)
    assert list(ds.as_numpy_iterator()) == [] and counter.as_dict()["empty_report"] == 5
    assert not task_data.has_report_text(d, "train") and task_data.has_report_text(corpus, "test")
    with pytest.raises(task_data.NoReportTextError, match=r"source 'chexpert'.*retrieval"):
        task_data.require_report_text(d, "test", "retrieval")


def test_report_order_puts_impression_first_when_asked(tmp_path, tok):
    """--report_order=impression_findings (MGCA's pretrain_dataset) reaches the tokens."""
    path = _write(
        str(tmp_path / "r.tfrecord"), [_example(3, findings="finding 3.", impression="finding 5.")]
    )

    def first_number(order):
        ds = P.make_dataset(
            path, "train", tok, 1, image_size=32, training=False, report_order=order
        )
        row = np.asarray(next(iter(ds))["token_ids"])[0]
        return int(VOCAB[row[2]])

    assert first_number("findings_impression") == 3
    assert first_number("impression_findings") == 5
