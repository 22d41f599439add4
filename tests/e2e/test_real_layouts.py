"""Real layouts end to end: trees written in the official download layouts -> `convert` ->
train (MIMIC) / evaluate (every dataset), through the CLIs a user runs.

One tiny model is pre-trained once (module fixture: MIMIC-CXR-JPG 2.0.0 layout -> convert
mimic -> `python -m place_tf.train --synthetic_images=0` -> export) and every evaluation
reuses it. Layouts (checked against the datasets' documentation and MGCA's / GLoRIA's
preprocessing):
- MIMIC-CXR-JPG 2.0.0: mimic-cxr-2.0.0-{metadata,split,chexpert}.csv.gz with PhysioNet's
  columns, files/pXX/pXXXXXXXX/sXXXXXXXX/<dicom_id>.jpg; MIMIC-CXR reports
  files/pXX/pXXXXXXXX/sXXXXXXXX.txt ("FINAL REPORT", EXAMINATION / INDICATION / TECHNIQUE /
  COMPARISON / FINDINGS / IMPRESSION).
- CheXpert-v1.0-small: CheXpert-v1.0-small/{train,valid}.csv (Path, Sex, Age,
  Frontal/Lateral, AP/PA, 14 labels 1.0/0.0/-1.0/blank), train/patientXXXXX/studyN/
  viewN_{frontal,lateral}.jpg, no test.csv.
- RSNA Pneumonia (Kaggle stage 2): stage_2_train_labels.csv (patientId,x,y,width,height,
  Target), stage_2_detailed_class_info.csv (patientId,class), stage_2_train_images/*.dcm.
- SIIM-ACR (Kaggle stage 1): train-rle.csv ("ImageId, EncodedPixels"),
  dicom-images-train/<study UID>/<series UID>/<ImageId>.dcm.
- Object-CXR: train.csv / dev.csv (image_name,annotation; "type x y x y ..." objects
  separated by ";"), train/*.jpg, dev/*.jpg.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from place_tf.config import TINY_MODEL_FIELDS
from place_tf.data import manifest, schema, splits, tokenizer

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BEAM = ["--direct_running_mode=in_memory", "--direct_num_workers=1", "--log_level=WARNING"]
MIMIC_LABELS = sorted(schema.CHEXPERT_LABELS)  # the PhysioNet CSV's column order
PTX = schema.label_index("Pneumothorax")


# ------------------------------------------------------------------ helpers
def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _image(seed: int, h: int, w: int, fmt: str = "JPEG", bright: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 120, size=(h, w), dtype=np.uint8)
    if bright:  # a "finding": a bright blob the probe can see
        arr[h // 4 : h // 2, w // 4 : w // 2] = 230
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _csv_text(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _dicom(arr, patient_id: str) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture, as RSNA / SIIM ship
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.ViewPosition = patient_id, "CR", "PA"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.astype(np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def convert(source: str, root: str, out: str, *extra: str) -> dict:
    from place_tf.data.convert.__main__ import main

    rc = main([source, "--input", root, "--output", out, *BEAM, *extra])
    assert rc == 0
    return manifest.read_manifest(out)


def convert_with_split_file(source: str, root: str, out: str, id_column: str, rows) -> dict:
    """`convert source --splits_from=<a CSV of (id_column, split) rows>` (a peer's split)."""
    path = out + "_split.csv"
    _write(path, _csv_text([id_column, "split"], rows).encode())
    return convert(source, root, out, f"--splits_from={path}")


def evaluate(task: str, model: str, data: str, out_json: str, *extra: str) -> dict:
    from place_tf.evaluate.__main__ import main

    assert main([task, f"--model={model}", f"--data={data}", f"--output={out_json}", *extra]) == 0
    with open(out_json) as f:
        return json.load(f)


def split_counts(m: dict) -> dict[str, int]:
    return {s: v["examples"] for s, v in m["splits"].items()}


def _finite_in_unit(x) -> bool:
    return x is not None and 0.0 <= float(x) <= 1.0


# ------------------------------------------------------------------ MIMIC-CXR-JPG
REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___M with shortness of breath

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 {findings}

 IMPRESSION:

 {impression}
"""
# (split, subjects, images per study) of the tree: train 12 subjects x 2 frontal images +
# 1 lateral each, validate 3 x 2, test 3 x 2.
MIMIC_PLAN = (("train", 12), ("validate", 3), ("test", 3))


def make_mimic_tree(root: str) -> dict:
    meta, split_rows, label_rows = [], [], []
    n = 0
    expected = {"train": 0, "validate": 0, "test": 0}
    for split, subjects in MIMIC_PLAN:
        for _ in range(subjects):
            n += 1
            sub, study = f"1{n:07d}", f"5{n:07d}"
            sick = n % 2 == 0  # cardiomegaly + effusion, else normal
            findings = (
                "The heart is enlarged. Small left pleural effusion."
                if sick
                else "The lungs are clear. Heart size is normal. No pleural effusion."
            )
            impression = "Cardiomegaly with small effusion." if sick else "No acute process."
            rel = f"files/p{sub[:2]}/p{sub}/s{study}"
            _write(os.path.join(root, rel + ".txt"), REPORT.format(**locals()).encode())
            labels = {name: "" for name in MIMIC_LABELS}
            labels.update(
                {"Cardiomegaly": "1.0", "Pleural Effusion": "1.0"}
                if sick
                else {"No Finding": "1.0", "Cardiomegaly": "0.0", "Pleural Effusion": "0.0"}
            )
            label_rows.append([sub, study, *(labels[c] for c in MIMIC_LABELS)])
            for k, view in enumerate(("PA", "AP", "LATERAL")):
                dicom = f"{n:08x}-{k:08x}-bde0afdd-112c0b34-7bc16630"
                _write(
                    os.path.join(root, rel, dicom + ".jpg"),
                    _image(100 * n + k, 48, 40, bright=sick),
                )
                meta.append(
                    [dicom, sub, study, "CHEST (PA AND LAT)", view, 48, 40, 21800101, 120000.0]
                    + ["CHEST (PA AND LAT)", "postero-anterior", "Erect"]
                )
                split_rows.append([dicom, study, sub, split])
                expected[split] += view != "LATERAL"
    meta_cols = [
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
    ]
    files = {
        "mimic-cxr-2.0.0-metadata.csv.gz": _csv_text(meta_cols, meta),
        "mimic-cxr-2.0.0-split.csv.gz": _csv_text(
            ["dicom_id", "study_id", "subject_id", "split"], split_rows
        ),
        "mimic-cxr-2.0.0-chexpert.csv.gz": _csv_text(
            ["subject_id", "study_id", *MIMIC_LABELS], label_rows
        ),
    }
    for name, text in files.items():
        _write(os.path.join(root, name), gzip.compress(text.encode(), mtime=0))
    return expected


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("real_layouts")


@pytest.fixture(scope="module")
def mimic_run(work):
    """(corpus dir, run dir, manifest, expected counts): convert mimic -> train -> export."""
    root, corpus, run = (str(work / d) for d in ("mimic-cxr-jpg/2.0.0", "mimic", "run"))
    expected = make_mimic_tree(root)
    m = convert("mimic", root, corpus, "--examples_per_shard=8")
    cmd = [
        sys.executable,
        "-m",
        "place_tf.train",
        *(f"--{k}={v}" for k, v in TINY_MODEL_FIELDS.items()),
        f"--corpus_dir={corpus}",
        "--synthetic_images=0",
        f"--model_dir={run}",
        "--per_replica_batch=8",
        "--max_steps=3",
        "--objective=convirt",
        "--nojit_compile",
        "--noprobe",
        "--export",
    ]
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return corpus, run, m, expected


def test_mimic_convert_writes_vocabulary_and_shards_that_follow_the_data(mimic_run):
    corpus, _, m, expected = mimic_run
    assert split_counts(m) == expected  # 24 / 6 / 6
    assert m["skipped"] == {"view_not_selected": 18}
    # --examples_per_shard=8: ceil(24 / 8) = 3 train shards, one each for 6 images.
    assert {s: len(v["shards"]) for s, v in m["splits"].items()} == {
        "train": 3,
        "validate": 1,
        "test": 1,
    }
    assert m["generator"]["sharding"]["rows"] == expected
    vocab = tokenizer.load_vocabulary(os.path.join(corpus, "vocab.txt"))
    info = m["generator"]["vocabulary"]
    assert info["size"] == len(vocab) and info["reports"] == expected["train"]
    assert m["generator"]["vocab_file"] == "vocab.txt"
    assert {"cardiomegaly", "effusion", "heart"} <= set(vocab)  # words of the train reports
    assert "technique" not in vocab  # only FINDINGS + IMPRESSION are learned from
    # The seeded 1 / 10 / 100 % label-fraction files, written by the converter.
    assert m["generator"]["label_fraction_splits"] == {
        "0.01": "train_1pct.txt",
        "0.1": "train_10pct.txt",
        "1": "train_100pct.txt",
    }
    ids = splits.load_split_ids(os.path.join(corpus, "splits", "train_100pct.txt"))
    assert len(ids) == expected["train"] == len(set(ids))
    # 1 % of 24 rounds to 0: the subset keeps the first positive of each label that has
    # one (place_tf.data.splits): a sick image covers Cardiomegaly and Pleural Effusion at
    # once, a normal one No Finding -> 2 images.
    assert len(splits.load_split_ids(os.path.join(corpus, "splits", "train_1pct.txt"))) == 2


def test_mimic_train_export_then_evaluate_linear(mimic_run, work):
    corpus, run, _, expected = mimic_run
    with open(os.path.join(run, "run_info.json")) as f:
        info = json.load(f)
    vocab = tokenizer.load_vocabulary(os.path.join(corpus, "vocab.txt"))
    assert info["configs"]["model"]["vocab_size"] == len(vocab)
    exports = os.listdir(os.path.join(run, "export"))
    assert exports and os.path.exists(os.path.join(run, "export", exports[0], "saved_model.pb"))
    r = evaluate("linear", run, corpus, str(work / "mimic_linear.json"), "--fraction=1.0")
    assert (r["n_val"], r["n_test"], r["protocol"]) == (
        expected["validate"],
        expected["test"],
        "chexpert5",
    )
    got = r["fractions"]["1"]
    assert got["n_train"] == expected["train"]
    # Both classes of Cardiomegaly and Pleural Effusion are in the 6 test images.
    assert set(got["per_label"]) == {"Cardiomegaly", "Pleural Effusion"}
    assert all(_finite_in_unit(v) for v in got["per_label"].values())


# ------------------------------------------------------------------ CheXpert-v1.0-small
CHEXPERT_COLS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *schema.CHEXPERT_LABELS]


def _chexpert_row(rel: str, frontal: bool, label: str | None):
    labels = {c: "" for c in schema.CHEXPERT_LABELS}
    if label:
        labels[label] = "1.0"
        for other in schema.COMPETITION_LABELS:
            labels[other] = labels[other] or "0.0"
    else:
        labels["No Finding"] = "1.0"
    return [
        f"CheXpert-v1.0-small/{rel}",
        "Female",
        "68",
        "Frontal" if frontal else "Lateral",
        "AP" if frontal else "",
        *(labels[c] for c in schema.CHEXPERT_LABELS),
    ]


def make_chexpert_tree(root: str) -> tuple[list, list]:
    """30 train rows (24 frontal + 6 lateral), 10 valid rows (frontal); no test.csv."""
    comp = schema.COMPETITION_LABELS
    train, valid = [], []
    for i in range(24):
        label = comp[i % 5] if i % 6 else None
        rel = f"train/patient{i + 1:05d}/study1/view1_frontal.jpg"
        train.append(_chexpert_row(rel, True, label))
        _write(os.path.join(root, rel), _image(i, 40, 32, bright=label is not None))
        if i % 4 == 0:
            rel = f"train/patient{i + 1:05d}/study1/view2_lateral.jpg"
            train.append(_chexpert_row(rel, False, label))
            _write(os.path.join(root, rel), _image(500 + i, 40, 32))
    for i in range(10):
        label = comp[i % 5]
        rel = f"valid/patient{64541 + i}/study1/view1_frontal.jpg"
        valid.append(_chexpert_row(rel, True, label))
        _write(os.path.join(root, rel), _image(900 + i, 40, 32, bright=True))
    _write(os.path.join(root, "train.csv"), _csv_text(CHEXPERT_COLS, train).encode())
    _write(os.path.join(root, "valid.csv"), _csv_text(CHEXPERT_COLS, valid).encode())
    return train, valid


@pytest.fixture(scope="module")
def chexpert_corpus(work):
    root, out = str(work / "CheXpert-v1.0-small"), str(work / "chexpert")
    train, valid = make_chexpert_tree(root)
    m = convert("chexpert", root, out, "--validate_holdout=8", "--seed=0")
    return out, m, train, valid


def test_chexpert_without_test_csv_follows_mgca_splits(chexpert_corpus):
    _, m, train, valid = chexpert_corpus
    # MGCA: numpy RandomState(0).choice over the train.csv rows, before the view filter.
    held = set(np.random.RandomState(0).choice(len(train), 8, replace=False).tolist())
    frontal = [r[3] == "Frontal" for r in train]
    want_val = sum(frontal[i] for i in held)
    counts = split_counts(m)
    assert counts == {"train": sum(frontal) - want_val, "validate": want_val, "test": len(valid)}
    assert m["generator"]["options"]["protocol"] == "mgca"
    assert m["generator"]["vocabulary"] is None  # label-only: no reports, no vocab.txt


def test_chexpert_linear_zero_shot_finetune_with_the_mimic_model(chexpert_corpus, mimic_run, work):
    out, m, _, valid = chexpert_corpus
    _, run, _, _ = mimic_run
    lin = evaluate("linear", run, out, str(work / "cx_linear.json"), "--fraction=1.0")
    assert (lin["n_test"], lin["n_val"]) == (len(valid), m["splits"]["validate"]["examples"])
    assert lin["fractions"]["1"]["n_train"] == m["splits"]["train"]["examples"]
    assert all(_finite_in_unit(v) for v in lin["fractions"]["1"]["per_label"].values())
    zs = evaluate("zero_shot", run, out, str(work / "cx_zs.json"))
    assert zs["multiclass"]["n"] == len(valid)  # each valid image has one competition label
    assert zs["multiclass"]["classes"] == {c: 2 for c in schema.COMPETITION_LABELS}
    assert _finite_in_unit(zs["multiclass"]["accuracy"])
    ft = evaluate("finetune", run, out, str(work / "cx_ft.json"), "--fraction=1.0", "--epochs=1")
    assert ft["task"] == "finetune" and ft["n_test"] == len(valid)
    assert all(_finite_in_unit(v) for v in ft["fractions"]["1"]["per_label"].values())


def test_report_tasks_on_a_label_only_corpus_say_it_has_no_reports(
    chexpert_corpus, mimic_run, work, capsys
):
    from place_tf.evaluate.__main__ import main

    out, _, _, _ = chexpert_corpus
    _, run, _, _ = mimic_run
    for task in ("retrieval", "report_generation"):
        rc = main([task, f"--model={run}", f"--data={out}", f"--output={work / 'x.json'}"])
        err = capsys.readouterr().err
        assert rc == 2 and "has no report text" in err and "'chexpert'" in err, err


# ------------------------------------------------------------------ RSNA
def make_rsna_tree(root: str) -> dict[str, str]:
    """24 patients, every third with one or two boxes; MGCA-style split files beside."""
    rows, classes, split_of = [], [], {}
    for i in range(24):
        pid = f"{i:08x}-0b3c-4c6e-9a1f-1234567890ab"
        arr = np.random.default_rng(i).integers(0, 100, size=(64, 64)).astype(np.uint8)
        if i % 3 == 0:
            arr[16:40, 8:32] = 220
            rows.append([pid, "8.0", "16.0", "24.0", "24.0", "1"])
            if i % 2 == 0:
                rows.append([pid, "40.0", "8.0", "12.0", "20.0", "1"])
            classes.append([pid, "Lung Opacity"])
        else:
            rows.append([pid, "", "", "", "", "0"])
            classes.append([pid, "Normal" if i % 2 else "No Lung Opacity / Not Normal"])
        _write(os.path.join(root, "stage_2_train_images", pid + ".dcm"), _dicom(arr, pid))
        split_of[pid] = "train" if i < 12 else ("validate" if i < 18 else "test")
    _write(
        os.path.join(root, "stage_2_train_labels.csv"),
        _csv_text(["patientId", "x", "y", "width", "height", "Target"], rows).encode(),
    )
    _write(
        os.path.join(root, "stage_2_detailed_class_info.csv"),
        _csv_text(["patientId", "class"], classes).encode(),
    )
    return split_of


def test_rsna_with_mgca_split_files_linear_segmentation_detection(work, mimic_run):
    root, out = str(work / "rsna-pneumonia"), str(work / "rsna")
    split_of = make_rsna_tree(root)
    files = {}
    for split, name in (("train", "train.csv"), ("validate", "val.csv"), ("test", "test.csv")):
        files[split] = str(work / "rsna_splits" / name)  # MGCA writes train/val/test.csv
        pids = [[p] for p, s in split_of.items() if s == split]
        _write(files[split], _csv_text(["patientId"], pids).encode())
    spec = ",".join(f"{s}={p}" for s, p in files.items())
    m = convert("rsna", root, out, f"--splits_from={spec}")
    assert split_counts(m) == dict(train=12, validate=6, test=6)
    _, run, _, _ = mimic_run
    lin = evaluate("linear", run, out, str(work / "rsna_linear.json"), "--fraction=1.0")
    assert lin["protocol"] == "binary" and lin["n_test"] == 6
    assert _finite_in_unit(lin["fractions"]["1"]["macro_auroc"])
    seg = evaluate("segmentation", run, out, str(work / "rsna_seg.json"), "--epochs=1")
    det = evaluate("detection", run, out, str(work / "rsna_det.json"), "--epochs=1")
    # Test patients 18..23: 18 and 21 have boxes (every third), so masks from the boxes.
    assert "Pneumonia" in seg["target"] and (seg["test_examples"], seg["test_positive"]) == (6, 2)
    assert det["labels"] == ["Pneumonia"] and det["test_boxes"] == 3  # 18 has two boxes
    assert _finite_in_unit(seg["dice"]) and _finite_in_unit(det["map"])


# ------------------------------------------------------------------ SIIM-ACR
def test_siim_linear_and_segmentation(work, mimic_run):
    from place_tf.data.convert import siim

    root, out = str(work / "siim-acr"), str(work / "siim")
    lines, split_rows = ["ImageId, EncodedPixels"], []
    for i in range(18):
        iid = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + i}.1517875{i:03d}.1"
        arr = np.random.default_rng(40 + i).integers(0, 100, size=(48, 48)).astype(np.uint8)
        mask = np.zeros((48, 48), bool)
        if i % 2 == 0:
            mask[8:30, 4:14] = True
            arr[mask] = 200
        lines.append(f"{iid}, {siim.rle_encode(mask)}")
        study, series = f"1.2.276.0.7230010.3.1.2.{i}", f"1.2.276.0.7230010.3.1.3.{i}"
        _write(
            os.path.join(root, "dicom-images-train", study, series, iid + ".dcm"),
            _dicom(arr, f"p{i}"),
        )
        split_rows.append([iid, "train" if i < 10 else ("valid" if i < 14 else "test")])
    _write(os.path.join(root, "train-rle.csv"), ("\n".join(lines) + "\n").encode())
    m = convert_with_split_file("siim", root, out, "ImageId", split_rows)
    assert split_counts(m) == dict(train=10, validate=4, test=4)
    _, run, _, _ = mimic_run
    lin = evaluate("linear", run, out, str(work / "siim_linear.json"), "--fraction=1.0")
    assert lin["protocol"] == "binary" and lin["n_test"] == 4
    seg = evaluate("segmentation", run, out, str(work / "siim_seg.json"), "--epochs=1")
    assert "Pneumothorax" in seg["target"] and (seg["test_examples"], seg["test_positive"]) == (
        4,
        2,
    )
    assert _finite_in_unit(seg["dice"])


# ------------------------------------------------------------------ Object-CXR
def test_object_cxr_detection_and_linear(work, mimic_run):
    root, out = str(work / "object-CXR"), str(work / "object_cxr")
    train, dev, split_rows = [], [], []
    for i in range(22):
        name = f"{i + 1:05d}.jpg"
        ann = "0 10 12 30 34;1 36 8 50 20" if i % 2 == 0 else ""
        if i % 4 == 1:
            ann = "2 8 8 20 8 14 26"  # a polygon
        arr_bytes = _image(700 + i, 56, 56, bright=bool(ann))
        if i < 16:
            train.append([name, ann])
            _write(os.path.join(root, "train", name), arr_bytes)
            split_rows.append([name, "train" if i < 11 else "validate"])
        else:
            dev.append([name, ann])
            _write(os.path.join(root, "dev", name), arr_bytes)
            split_rows.append([name, "test"])
    _write(os.path.join(root, "train.csv"), _csv_text(["image_name", "annotation"], train).encode())
    _write(os.path.join(root, "dev.csv"), _csv_text(["image_name", "annotation"], dev).encode())
    m = convert_with_split_file("object_cxr", root, out, "image_name", split_rows)
    assert split_counts(m) == dict(train=11, validate=5, test=6)
    _, run, _, _ = mimic_run
    det = evaluate("detection", run, out, str(work / "obj_det.json"), "--epochs=1")
    assert det["labels"] == ["Support Devices"] and _finite_in_unit(det["map"])
    lin = evaluate("linear", run, out, str(work / "obj_linear.json"), "--fraction=1.0")
    assert lin["protocol"] == "binary" and lin["n_test"] == 6


# ------------------------------------------------------------------ IU X-Ray (R2Gen)
def test_iu_xray_r2gen_annotation_report_generation(work, mimic_run):
    """R2Gen's iu_xray/ (annotation.json + images/<id>/0.png, 1.png) -> report_generation
    on its standard train / val / test lists."""
    root, out = str(work / "iu_xray"), str(work / "iu")
    sentences = ("The heart is normal in size.", "No pleural effusion.", "Lungs are clear.")
    ann = {"train": [], "val": [], "test": []}
    for i in range(18):
        key = "train" if i < 12 else ("val" if i < 15 else "test")
        uid = f"CXR{3000 + i}_IM-{1400 + i}"
        report = " ".join(sentences[j % 3] for j in range(i % 3 + 1))
        paths = [f"{uid}/0.png", f"{uid}/1.png"]  # frontal first, then lateral
        ann[key].append({"id": uid, "report": report, "image_path": paths, "split": key})
        for k, rel in enumerate(paths):
            _write(os.path.join(root, "images", rel), _image(300 + 2 * i + k, 48, 48, "PNG"))
    _write(os.path.join(root, "annotation.json"), json.dumps(ann).encode())
    m = convert("r2gen", root, out, "--source_name=iu_xray")
    assert split_counts(m) == dict(train=12, validate=3, test=3)
    _, run, _, _ = mimic_run
    r = evaluate("report_generation", run, out, str(work / "iu_rg.json"), "--epochs=1")
    assert (r["train_examples"], r["test_examples"]) == (12, 3)
    for k in ("bleu_1", "bleu_4", "rouge_l"):
        assert _finite_in_unit(r[k]), (k, r[k])


# ------------------------------------------------------------------ COVIDx
def test_covidx_multiclass_linear(work, mimic_run):
    """COVIDx CXR-2 lines "patient_id filename class source" (normal / pneumonia / COVID-19)."""
    root, out = str(work / "COVIDx"), str(work / "covidx")
    classes = ("normal", "pneumonia", "COVID-19")
    lines = {"train.txt": [], "test.txt": []}
    split_rows = []
    for i in range(27):
        txt, folder = ("train.txt", "train") if i < 21 else ("test.txt", "test")
        name = f"img{i:03d}.png" if i % 2 else f"img{i:03d}.jpg"
        lines[txt].append(f"{1000 + i} {name} {classes[i % 3]} rsna")
        fmt = "PNG" if name.endswith("png") else "JPEG"
        _write(os.path.join(root, folder, name), _image(800 + i, 40, 40, fmt, bright=i % 3 > 0))
        split_rows.append([name, "test" if i >= 21 else ("validate" if i >= 15 else "train")])
    for txt, ls in lines.items():
        _write(os.path.join(root, txt), ("\n".join(ls) + "\n").encode())
    m = convert_with_split_file("covidx", root, out, "filename", split_rows)
    assert split_counts(m) == dict(train=15, validate=6, test=6)
    _, run, _, _ = mimic_run
    lin = evaluate("linear", run, out, str(work / "covidx_linear.json"), "--fraction=1.0")
    assert lin["protocol"] == "multiclass" and lin["n_test"] == 6
    assert _finite_in_unit(lin["fractions"]["1"]["accuracy"])
