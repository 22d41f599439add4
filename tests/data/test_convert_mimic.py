"""MIMIC-CXR converter on a fixture tree in the PhysioNet layout, broken rows included."""

import csv
import gzip
import hashlib
import io
import logging
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from place_tf.data import manifest, schema
from place_tf.data.convert import beam_skeleton as bs
from place_tf.data.convert import mimic

BEAM_ARGS = ["--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1"]

MIMIC_LABEL_ORDER = sorted(schema.CHEXPERT_LABELS)  # the CSV's columns are alphabetical

GOOD_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:

 The lungs are clear.  No pleural
 effusion.

 IMPRESSION:

 1. No acute process.
 2. ___ catheter in place
"""
GOOD_FINDINGS = "The lungs are clear. No pleural effusion."
GOOD_IMPRESSION = "No acute process. ___ catheter in place"


def _jpeg(seed: int, h: int = 32, w: int = 40) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, size=(h, w), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_csv_gz(path, header, rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    # mtime=0: the file's bytes, and so the manifest's checksums, are the same every run.
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(buf.getvalue().encode("utf-8"))


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


# (dicom_id, subject, study, view, split, image kind, report kind) -> expected outcome
ROWS = [
    ("d01", "10000001", "50000001", "PA", "train", "ok", "ok"),  # train
    ("d15", "10000001", "50000001", "AP", "train", "ok", "ok"),  # train, same study
    ("d02", "10000001", "50000001", "LATERAL", "train", "ok", "ok"),  # view_not_selected
    ("d03", "10000001", "50000002", "AP", "validate", "ok", "ok"),  # validate
    ("d04", "11000002", "50000003", "PA", "test", "ok", "ok"),  # test, no label row
    ("d05", "11000002", "50000004", "PA", "train", "missing", "ok"),  # missing_image
    ("d06", "11000002", "50000005", "PA", "train", "truncated", "ok"),  # truncated_image
    ("d07", "11000002", "50000006", "PA", "train", "ok", "empty"),  # empty_report
    ("d08", "11000002", "50000007", "PA", "train", "ok", "latin1"),  # non_utf8_report
    ("d09", "abc", "50000010", "PA", "train", "ok", "ok"),  # malformed_row (subject id)
    ("d11", "12000003", "50000008", "PA", "train", "ok", "missing"),  # missing_report
    ("d12", "12000003", "50000011", "PA", None, "ok", "ok"),  # missing_split
    ("d13", "12000003", "50000009", "AP", "train", "ok", "ok"),  # malformed_row (labels)
    ("d14", "12000003", "50000012", "PA", "train", "garbage", "ok"),  # undecodable_image
]
EXPECTED_SKIPS = {
    "view_not_selected": 1,
    "missing_image": 1,
    "truncated_image": 1,
    "empty_report": 1,
    "non_utf8_report": 1,
    "malformed_row": 3,  # d09, the short CSV line, d13
    "missing_report": 1,
    "missing_split": 1,
    "undecodable_image": 1,
}
# Study 50000001 labels: Atelectasis 1, Cardiomegaly -1 (uncertain), Edema 0, rest blank.
STUDY1_LABELS = {"Atelectasis": "1.0", "Cardiomegaly": "-1.0", "Edema": "0.0"}


# mimic-cxr-2.0.0-metadata.csv has PhysioNet's 12 columns; ViewCodeSequence names the view.
VIEW_NAMES = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}


def make_tree(root, reports_root):
    images = {}
    meta_rows, split_rows = [], []
    for i, (dicom, sub, study, view, split, img, rep) in enumerate(ROWS):
        meta_rows.append(
            [dicom, sub, study, "CHEST (PA AND LAT)", view, 32, 40, 21800506, 213014.531]
            + ["CHEST (PA AND LAT)", VIEW_NAMES.get(view, ""), "Erect"]
        )
        if split:
            split_rows.append([dicom, study, sub, split])
        if sub.isdigit():
            rel = mimic.image_rel_path(sub, study, dicom)
            data = _jpeg(i)
            images[dicom] = data
            if img == "ok":
                _write(os.path.join(root, rel), data)
            elif img == "truncated":
                _write(os.path.join(root, rel), data[: len(data) // 2])
            elif img == "garbage":
                _write(os.path.join(root, rel), b"not an image at all" * 10)
            rpath = os.path.join(reports_root, mimic.report_rel_path(sub, study))
            if rep == "ok":
                _write(rpath, GOOD_REPORT.encode("utf-8"))
            elif rep == "empty":
                _write(rpath, b"INDICATION: cough\n\nCOMPARISON: none\n")
            elif rep == "latin1":
                _write(rpath, "FINDINGS: Caf\xe9 opacity.\n".encode("latin-1"))
    meta_rows.insert(5, ["dshort", "10000001"])  # malformed: too few cells
    _write_csv_gz(
        os.path.join(root, mimic.METADATA_CSV),
        [
            "dicom_id",
            "subject_id",
            "study_id",
            "PerformedProcedureStepDescription",
            "ViewPosition",
            "Rows",
            "Columns",
            "StudyDate",
            "StudyTime",
            "ProcedureCodeSequence_CodeMeaning",
            "ViewCodeSequence_CodeMeaning",
            "PatientOrientationCodeSequence_CodeMeaning",
        ],
        meta_rows,
    )
    _write_csv_gz(
        os.path.join(root, mimic.SPLIT_CSV),
        ["dicom_id", "study_id", "subject_id", "split"],
        split_rows,
    )
    lab_rows = []
    for sub, study in {(r[1], r[2]) for r in ROWS if r[1].isdigit()}:
        if study == "50000003":
            continue  # a study without CheXpert labels
        cells = {n: "" for n in MIMIC_LABEL_ORDER}
        if study == "50000001":
            cells.update(STUDY1_LABELS)
        if study == "50000009":
            cells["Edema"] = "2.0"  # malformed value
        lab_rows.append([sub, study] + [cells[n] for n in MIMIC_LABEL_ORDER])
    _write_csv_gz(
        os.path.join(root, mimic.CHEXPERT_CSV),
        ["subject_id", "study_id", *MIMIC_LABEL_ORDER],
        lab_rows,
    )
    return images


def read_corpus(out):
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
    base = tmp_path_factory.mktemp("mimic")
    root, reports_root, out = str(base / "jpg"), str(base / "reports"), str(base / "out")
    images = make_tree(root, reports_root)
    logger = logging.getLogger()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep(level=logging.INFO)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        conv = mimic.MimicConverter(root, reports_dir=reports_root)
        m = bs.run_conversion(conv, out, shards=2, eval_shards=1, beam_args=BEAM_ARGS)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return root, out, images, m, records


def test_counts_and_skip_reasons_match_the_fixture(converted):
    root, out, _, m, _ = converted
    on_disk = manifest.read_manifest(out)
    assert on_disk["source"] == "mimic-cxr" and on_disk["schema_version"] == schema.SCHEMA_VERSION
    assert {s: v["examples"] for s, v in on_disk["splits"].items()} == {
        "train": 2,
        "validate": 1,
        "test": 1,
    }
    assert on_disk["skipped"] == EXPECTED_SKIPS
    assert on_disk["splits"]["train"]["shards"] == [
        manifest.shard_name("train", 0, 2),
        manifest.shard_name("train", 1, 2),
    ]
    assert on_disk["splits"]["test"]["shards"] == ["test-00000-of-00001.tfrecord"]
    for name in (mimic.METADATA_CSV, mimic.SPLIT_CSV, mimic.CHEXPERT_CSV):
        with open(os.path.join(root, name), "rb") as f:
            want = "sha256:" + hashlib.sha256(f.read()).hexdigest()
        assert on_disk["source_checksums"][name] == want
    for name, digest in on_disk["shard_checksums"].items():
        assert manifest.sha256_file(os.path.join(out, name)) == digest
    assert not [n for n in os.listdir(out) if n.startswith(bs.STATS_PREFIX)]


def test_examples_hold_image_bytes_report_sections_and_labels(converted):
    _, out, images, _, _ = converted
    _, recs = read_corpus(out)
    assert set(recs) == {"d01", "d15", "d03", "d04"}
    r = recs["d01"]
    assert r.image == images["d01"]  # stored as shipped
    assert (r.image_format, r.height, r.width) == ("jpeg", 32, 40)
    assert (r.subject_id, r.study_id, r.view, r.split, r.source) == (
        "10000001",
        "50000001",
        "PA",
        "train",
        "mimic-cxr",
    )
    assert r.findings == GOOD_FINDINGS and r.impression == GOOD_IMPRESSION
    want = [schema.LABEL_MISSING] * schema.NUM_CHEXPERT
    want[schema.label_index("Atelectasis")] = 1
    want[schema.label_index("Cardiomegaly")] = -1  # default policy keeps uncertain
    want[schema.label_index("Edema")] = 0
    assert list(r.chexpert) == want
    assert recs["d03"].split == "validate" and recs["d04"].split == "test"
    assert list(recs["d04"].chexpert) == [schema.LABEL_MISSING] * schema.NUM_CHEXPERT


def test_no_report_text_or_ids_logged_at_info(converted):
    *_, records = converted
    text = "\n".join(r.getMessage() for r in records if r.levelno >= logging.INFO)
    assert "mimic-cxr" in text  # the summary was logged
    for secret in ("lungs are clear", "No acute process", "d01", "10000001", "50000001"):
        assert secret not in text


def test_wrong_layout_names_the_expected_file(tmp_path):
    root = tmp_path / "jpg"
    make_tree(str(root), str(root))
    os.remove(root / mimic.SPLIT_CSV)
    with pytest.raises(bs.LayoutError, match="mimic-cxr-2.0.0-split.csv.gz"):
        mimic.MimicConverter(str(root)).check_layout()


def test_missing_reports_folder_points_to_reports_dir(tmp_path):
    root = tmp_path / "jpg"
    make_tree(str(root), str(tmp_path / "reports"))
    with pytest.raises(bs.LayoutError, match=r"'files/'.*--reports_dir"):
        mimic.MimicConverter(str(root), reports_dir=str(tmp_path / "nowhere")).check_layout()


def test_cli_wrong_layout_exits_2_naming_the_file(tmp_path, capsys):
    from place_tf.data.convert.__main__ import main

    (tmp_path / "in").mkdir()
    rc = main(["mimic", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "mimic-cxr-2.0.0-metadata.csv.gz" in capsys.readouterr().err


def test_existing_corpus_needs_overwrite(converted):
    root, out, *_ = converted
    with pytest.raises(FileExistsError, match="--overwrite"):
        bs.run_conversion(mimic.MimicConverter(root), out, beam_args=BEAM_ARGS)


def test_parse_metadata_row_rejects_bad_ids():
    ok = mimic.parse_metadata_row(
        {"dicom_id": "ab-1", "subject_id": "10000001", "study_id": "5.0", "ViewPosition": " pa "}
    )
    assert ok == {"dicom_id": "ab-1", "subject_id": "10000001", "study_id": "5", "view": "PA"}
    for bad in (
        {"dicom_id": "", "subject_id": "1", "study_id": "2"},
        {"dicom_id": "../x", "subject_id": "1", "study_id": "2"},
        {"dicom_id": "a", "subject_id": "p1", "study_id": "2"},
        {"dicom_id": "a", "subject_id": "1", "study_id": "２"},  # full-width digit
    ):
        with pytest.raises(bs.ParseError):
            mimic.parse_metadata_row(bad)


def test_manifest_generator_records_options_without_ids(converted):
    _, out, *_ = converted
    m = manifest.read_manifest(out)
    assert m["generator"]["options"]["views"] == ["PA", "AP"]
    assert m["generator"]["options"]["uncertain_policy"] == "keep"
    # Look at every key and string value except checksums: a hex digest may
    # contain "d01" by chance, and a real id leak would be a whole field.
    strings = [s for s in _json_strings(m) if not re.fullmatch(r"sha256:[0-9a-f]{64}", s)]
    assert any("train-00000-of-00002" in s for s in strings)  # the walk sees the manifest
    for secret in ("d01", "10000001", "50000001"):
        assert not [s for s in strings if secret in s], secret


def _json_strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _json_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _json_strings(v)
    elif isinstance(node, str):
        yield node


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["dicom_id", "subject_id", "study_id", "ViewPosition"]),
        st.text(max_size=15),
    )
)
def test_fuzz_parse_metadata_row_raises_only_parse_errors(row):
    try:
        got = mimic.parse_metadata_row(row)
    except bs.ParseError:
        return
    assert got["subject_id"].isdigit() and "/" not in got["dicom_id"]
