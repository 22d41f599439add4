"""Fuzzing (hypothesis, bounded): every parser of untrusted input either returns a
well-formed value or raises its one documented error.

- place_tf.data.reports: any str -> (str, str), never an exception;
- the converters' pure parsers (RLE, Object-CXR annotations, CheXpert/MIMIC/RSNA/COVIDx
  rows, CSV files of random bytes): only ParseError (read_csv: LayoutError for a file
  without the required header, Skipped rows otherwise);
- the exported SavedModel's `serving_default` (random bytes, PNG/JPEG with mutated
  headers, truncated files): a valid output or tf.errors.InvalidArgumentError whose message
  names the bad batch index; the process survives (in-process).
"""

import io
import math
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from place_tf.data import reports
from place_tf.data.convert import beam_skeleton as bs
from place_tf.data.convert import chexpert, covidx, mimic, object_cxr, rsna, siim

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

HEADERS = [
    "FINDINGS:",
    "IMPRESSION:",
    "FINDINGS AND IMPRESSION:",
    "Impression",
    "WET READ:",
    "CONCLUSION:",
    "INDICATION:",
    "___",
    "1. ",
    "2) ",
    "\r\n",
    "\n",
    "\t",
    "\x00",
    "\u00a0",
    ".",
    " ",
]
report_text = st.lists(st.one_of(st.sampled_from(HEADERS), st.text(max_size=30)), max_size=25).map(
    "".join
)


@FUZZ
@given(report_text)
def test_parse_report_never_raises_on_text(text):
    findings, impression = reports.parse_report(text)
    assert isinstance(findings, str) and isinstance(impression, str)
    for part in (findings, impression):
        assert part == part.strip() and "\n" not in part and "\r" not in part
        assert "\x00" not in part
    for s in reports.split_sentences(findings):
        assert s and s == s.strip()


rle_text = st.one_of(
    st.lists(st.integers(min_value=-3, max_value=400), max_size=12).map(
        lambda v: " ".join(map(str, v))
    ),
    st.text(alphabet="0123456789 -+.\t\n١٢e", max_size=40),
    st.text(max_size=20),
)


@FUZZ
@given(
    rle_text,
    st.integers(min_value=-2, max_value=20),
    st.integers(min_value=-2, max_value=20),
    st.booleans(),
)
def test_rle_decode_only_raises_parse_error(rle, h, w, relative):
    try:
        mask = siim.rle_decode(rle, h, w, relative=relative)
    except bs.ParseError:
        return
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    # What decodes re-encodes to the same mask.
    np.testing.assert_array_equal(siim.rle_decode(siim.rle_encode(mask, relative), h, w, relative), mask)  # fmt: skip


annotation_text = st.lists(
    st.one_of(
        st.sampled_from(["0", "1", "2", "3", "-1", "nan", "inf", "1e400", "-0", ";", " ", "x"]),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(min_value=-5, max_value=5000).map(str),
    ),
    max_size=15,
).map(" ".join)


@FUZZ
@given(annotation_text, st.integers(1, 4000), st.integers(1, 4000))
def test_object_cxr_annotation_only_raises_parse_error(text, h, w):
    try:
        objects = object_cxr.parse_object_cxr_annotation(text)
    except bs.ParseError:
        return
    for kind, points in objects:
        assert kind in (0, 1, 2)
        assert all(math.isfinite(x) and math.isfinite(y) and x >= 0 and y >= 0 for x, y in points)
    try:
        boxes = object_cxr.annotation_boxes(text, h, w)
    except bs.ParseError:
        return
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


cell = st.one_of(
    st.sampled_from(["", "1", "1.0", "0", "0.0", "-1", "-1.0", " 1.0 ", "2", "nan", "yes"]),
    st.text(max_size=12),
)
path_text = st.one_of(
    st.lists(
        st.sampled_from(
            ["CheXpert-v1.0", "train", "valid", "patient1", "study2", "..", ".", "", "a.jpg", "/"]
        ),  # fmt: skip
        max_size=7,
    ).map("/".join),
    st.text(max_size=40),
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {
            "Path": path_text,
            "Frontal/Lateral": st.sampled_from(["Frontal", "Lateral", "", "AP", "frontal"]),
            "AP/PA": st.sampled_from(["AP", "PA", "", "LL"]),
        },
        optional={name: cell for name in chexpert.schema.CHEXPERT_LABELS},
    ),
    st.sampled_from(["keep", "ones", "zeros", "ignore"]),
)
def test_chexpert_row_only_raises_parse_error(row, policy):
    try:
        out = chexpert.parse_chexpert_row(row, policy)
    except bs.ParseError:
        return
    assert len(out["chexpert"]) == 14
    assert set(out["chexpert"]) <= {1, 0, -1, -2}
    assert ".." not in out["rel_path"].split("/") and not out["rel_path"].startswith("/")


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["dicom_id", "subject_id", "study_id", "ViewPosition", "other"]),
        st.one_of(
            st.text(max_size=15),
            st.integers(-5, 10**9).map(str),
            st.sampled_from(["1.0", "12.0", "..", "a/b"]),
        ),  # fmt: skip
    )
)
def test_mimic_metadata_row_only_raises_parse_error(row):
    try:
        out = mimic.parse_metadata_row(row)
    except bs.ParseError:
        return
    assert out["subject_id"].isdigit() and out["study_id"].isdigit()
    assert "/" not in out["dicom_id"] and not out["dicom_id"].startswith(".")


number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-100, 5000).map(str),
    st.text(max_size=6),
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["patientId", "Target", "x", "y", "width", "height"]),
        st.one_of(number, st.sampled_from(["0", "1", "a/b", ".x", ""])),
    ),
    st.integers(1, 2048),
    st.integers(1, 2048),
)
def test_rsna_row_only_raises_parse_error(row, img_h, img_w):
    try:
        pid, target, box = rsna.parse_rsna_row(row)
    except bs.ParseError:
        return
    assert target in (0, 1) and (box is None) == (target == 0)
    if box is not None:
        try:
            x0, y0, x1, y1 = rsna.normalise_box(*box, img_h, img_w)
        except bs.ParseError:
            return
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=10), st.sampled_from(["a.png", "../x.png", "COVID-19", "normal", "pneumonia"])), max_size=6).map(" ".join))  # fmt: skip
def test_covidx_line_only_raises_parse_error(line):
    try:
        patient, filename, cls, source = covidx.parse_covidx_line(line)
    except bs.ParseError:
        return
    assert "/" not in filename and not filename.startswith(".")
    try:
        covidx.canonical_class(cls)
    except bs.ParseError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(st.lists(cell, max_size=4).map(",".join), max_size=6)
        .map("\n".join)
        .map(lambda t: ("ImageId,EncodedPixels\n" + t).encode()),
        st.text(max_size=100).map(lambda t: ('ImageId,"Encoded\n' + t).encode()),
    )
)
def test_read_csv_of_random_bytes_only_raises_documented_errors(tmp_path_factory, data):
    path = os.path.join(str(tmp_path_factory.mktemp("csv")), "rows.csv")
    with open(path, "wb") as f:
        f.write(data)
    try:
        rows = list(bs.read_csv(path, required=("ImageId", "EncodedPixels")))
    except (bs.ParseError, bs.LayoutError):
        return
    for row in rows:
        assert isinstance(row, (dict, bs.Skipped))
        if isinstance(row, dict):
            assert set(row) >= {"ImageId", "EncodedPixels"}


# ------------------------------------------------------------------ serving signature


def _encode(arr, fmt):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


_RNG = np.random.default_rng(0)
PNG = _encode(_RNG.integers(0, 256, (40, 30), dtype=np.uint8), "PNG")
JPEG = _encode(_RNG.integers(0, 256, (24, 36, 3), dtype=np.uint8), "JPEG")

mutated_image = st.builds(
    lambda base, edits, cut: _mutate(base, edits, cut),
    st.sampled_from([PNG, JPEG]),
    st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=4),
    st.one_of(st.none(), st.integers(0, 400)),
)


def _mutate(base, edits, cut):
    b = bytearray(base)
    for pos, val in edits:
        b[pos] = val
    return bytes(b[:cut] if cut is not None else b)


@pytest.fixture(scope="module")
def serving_fn(canary_run):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (the tokenizer's ops)

    loaded = tf.saved_model.load(canary_run["export_dir"])
    return loaded.signatures["serving_default"]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(st.binary(max_size=300), mutated_image), st.booleans())
def test_serving_signature_survives_hostile_image_bytes(serving_fn, data, with_good):
    import tensorflow as tf

    batch = [PNG, data] if with_good else [data]
    try:
        out = serving_fn(images=tf.constant(batch))
    except tf.errors.InvalidArgumentError as e:
        msg = e.message
        assert f"images[{len(batch) - 1}]" in msg and "images in this batch are bad" in msg
        return
    emb = out["image_embedding"].numpy()
    assert emb.shape[0] == len(batch) and np.all(np.isfinite(emb))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
