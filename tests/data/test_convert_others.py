"""RSNA, COVIDx, SIIM-ACR and Object-CXR converters on fixture trees with broken rows."""

import io
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from place_tf.data import manifest, schema, splits
from place_tf.data.convert import beam_skeleton as bs
from place_tf.data.convert import covidx, object_cxr, rsna, siim

BEAM_ARGS = ["--runner=DirectRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1"]
FUZZ = settings(max_examples=150, deadline=None)


# ---------------------------------------------------------------- fixture helpers


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _array(seed, h, w, dtype=np.uint8, high=255):
    return np.random.default_rng(seed).integers(0, high, size=(h, w)).astype(dtype)


def _encode(arr, fmt) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _dicom(arr, photometric="MONOCHROME2", bits=8, patient_id="anon", window=None) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.Modality = "CR"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if bits <= 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype(np.uint8 if bits <= 8 else np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _read(out):
    import tensorflow as tf

    m = manifest.read_manifest(out)
    recs = {}
    for split in m["splits"]:
        for path in manifest.split_files(out, split):
            for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
                rec = schema.from_example(raw)
                assert rec.image_id not in recs
                recs[rec.image_id] = rec
    counts = {s: v["examples"] for s, v in m["splits"].items()}
    assert sum(counts.values()) == len(recs)
    for rec in recs.values():
        assert counts[rec.split] > 0
    return m, recs


def _png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


def _skips(rows):
    out = {}
    for r in rows:
        if isinstance(r, bs.Skipped):
            out[r.reason] = out.get(r.reason, 0) + 1
    return out


# ---------------------------------------------------------------- DICOM -> PNG


def test_dicom_8bit_is_kept_exactly_and_monochrome1_inverted():
    arr = _array(0, 40, 32)
    png, h, w, ds = bs.dicom_to_png(_dicom(arr, patient_id="x1"))
    assert (h, w) == (40, 32) and ds.PatientID == "x1"
    got = _png_array(png)
    assert got.dtype == np.uint8 and np.array_equal(got, arr)
    inv = _png_array(bs.dicom_to_png(_dicom(arr, photometric="MONOCHROME1"))[0])
    assert np.array_equal(inv, 255 - arr)


def test_dicom_12bit_becomes_16bit_png_shifted_left_by_4():
    arr = _array(1, 33, 35, np.uint16, high=4096)
    got = _png_array(bs.dicom_to_png(_dicom(arr, bits=12))[0])
    assert got.dtype in (np.uint16, np.int32)
    assert np.array_equal(got.astype(np.int64), arr.astype(np.int64) << 4)


def test_dicom_window_is_applied():
    # Window centre 1000, width 2 (LINEAR): x <= 999 -> minimum, x > 1000 -> maximum.
    arr = np.array([[500, 1500], [999, 4000]], dtype=np.uint16)
    got = _png_array(bs.dicom_to_png(_dicom(arr, bits=12, window=(1000, 2)))[0])
    assert got.astype(np.int64).tolist() == [[0, 65535], [0, 65535]]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_corrupt_dicom_is_a_bad_dicom_skip():
    with pytest.raises(bs.SkipError) as e:
        bs.dicom_to_png(b"DICM" * 50)
    assert e.value.reason == bs.BAD_DICOM


# ---------------------------------------------------------------- RSNA


def _rsna_tree(root):
    rows = [
        "patientId,x,y,width,height,Target",
        "P1,8,16,16,8,1",
        "P1,40.0,8,16,24,1",  # second box of P1
        "P2,,,,,0",
        "P3,1,1,5,5,1",  # missing_image
        "P4,1,1,abc,5,1",  # malformed_row (patient skipped)
        "P5,,,,,0",
        "P5,1,1,5,5,1",  # malformed_row: targets disagree
        "P9,1,1",  # malformed_row (cell count)
        "P6,1,1,5,5,1",  # bad_dicom
        "P7,56,56,16,16,1",  # clipped to the image
        "P8,100,100,5,5,1",  # bad_annotation (outside the image)
    ]
    _write(os.path.join(root, rsna.LABELS_CSV), ("\n".join(rows) + "\n").encode())
    arrays = {}
    for i, pid in enumerate(["P1", "P2", "P4", "P5", "P7", "P8"]):
        arrays[pid] = _array(10 + i, 64, 64)
        _write(os.path.join(root, rsna.IMAGES_DIR, pid + ".dcm"), _dicom(arrays[pid]))
    _write(os.path.join(root, rsna.IMAGES_DIR, "P6.dcm"), b"\x00" * 300)
    return arrays


def test_rsna_boxes_labels_and_skips(tmp_path):
    root, out = str(tmp_path / "rsna"), str(tmp_path / "out")
    arrays = _rsna_tree(root)
    bs.run_conversion(rsna.RsnaConverter(root), out, shards=1, beam_args=BEAM_ARGS)
    m, recs = _read(out)
    assert m["source"] == "rsna-pneumonia"
    assert m["skipped"] == {
        "missing_image": 1,
        "malformed_row": 3,
        "bad_dicom": 1,
        "bad_annotation": 1,
    }
    assert set(recs) == {"P1", "P2", "P7"}
    pneu = schema.label_index("Pneumonia")
    p1 = recs["P1"]
    assert p1.image_format == "png" and np.array_equal(_png_array(p1.image), arrays["P1"])
    assert np.allclose(p1.boxes, [[0.125, 0.25, 0.375, 0.375], [0.625, 0.125, 0.875, 0.5]])
    assert list(p1.box_labels) == [pneu, pneu] and p1.class_label == 1
    assert p1.chexpert[pneu] == 1 and p1.view == "PA"
    # MGCA's segmentation protocol: the boxes, filled, are the mask (hand-computed pixels).
    want = np.zeros((64, 64), np.uint8)
    want[16:24, 8:24] = 255
    want[8:32, 40:56] = 255
    assert len(p1.masks) == 1 and list(p1.mask_labels) == [pneu]
    assert np.array_equal(_png_array(p1.masks[0]), want)
    assert not _png_array(recs["P2"].masks[0]).any()
    assert recs["P2"].class_label == 0 and len(recs["P2"].boxes) == 0
    assert recs["P2"].chexpert[pneu] == 0
    assert np.allclose(recs["P7"].boxes, [[0.875, 0.875, 1.0, 1.0]])
    for pid, rec in recs.items():
        assert rec.split == splits.hash_split(pid, (0.7, 0.15, 0.15), salt="rsna")


def test_rsna_layout_and_row_parser(tmp_path):
    with pytest.raises(bs.LayoutError, match="stage_2_train_labels.csv"):
        rsna.RsnaConverter(str(tmp_path)).check_layout()
    row = {"patientId": "a", "x": "1", "y": "2", "width": "3", "height": "4", "Target": "1"}
    assert rsna.parse_rsna_row(row) == ("a", 1, (1.0, 2.0, 3.0, 4.0))
    assert rsna.parse_rsna_row(dict(row, Target="0", x="")) == ("a", 0, None)
    for bad in (
        dict(row, Target="2"),
        dict(row, width="0"),
        dict(row, x="nan"),
        dict(row, patientId=""),
    ):
        with pytest.raises(bs.ParseError):
            rsna.parse_rsna_row(bad)


@FUZZ
@given(st.dictionaries(st.sampled_from(rsna.COLUMNS), st.text(max_size=12)))
def test_fuzz_parse_rsna_row_raises_only_parse_errors(row):
    try:
        rsna.parse_rsna_row(row)
    except bs.ParseError:
        pass


# ---------------------------------------------------------------- COVIDx


def _covidx_tree(root):
    arrays = {}
    train = [
        "1 a.png negative rsna",
        "2 b.jpg positive cohen",
        "3 c.png pneumonia sirm",
        "4 d.png COVID-19 actmed",
        "5 e.png negative rsna",  # missing_image
        "6 f.png weird rsna",  # malformed_row (class)
        "7 g.png",  # malformed_row (fields)
        "8 a.png negative rsna",  # duplicate_row
        "patient with spaces h.png normal bimcv",
    ]
    test = ["9 t1.png positive bimcv", "10 t2.jpg negative rsna"]  # t2 truncated
    for i, name in enumerate(["a.png", "b.jpg", "c.png", "d.png", "h.png"]):
        arrays[name] = _array(20 + i, 32, 48)
        fmt = "PNG" if name.endswith("png") else "JPEG"
        _write(os.path.join(root, "train", name), _encode(arrays[name], fmt))
    arrays["t1.png"] = _array(30, 40, 40)
    _write(os.path.join(root, "test", "t1.png"), _encode(arrays["t1.png"], "PNG"))
    _write(os.path.join(root, "test", "t2.jpg"), _encode(_array(31, 40, 40), "JPEG")[:200])
    _write(os.path.join(root, "train.txt"), ("\n".join(train) + "\n").encode())
    _write(os.path.join(root, "test.txt"), ("\n".join(test) + "\n").encode())
    return arrays


def test_covidx_classes_splits_and_skips(tmp_path):
    root, out = str(tmp_path / "covidx"), str(tmp_path / "out")
    arrays = _covidx_tree(root)
    bs.run_conversion(
        covidx.CovidxConverter(root, validate_fraction=0.5), out, shards=1, beam_args=BEAM_ARGS
    )
    m, recs = _read(out)
    assert m["skipped"] == {
        "missing_image": 1,
        "malformed_row": 2,
        "duplicate_row": 1,
        "truncated_image": 1,
    }
    assert {k: r.class_label for k, r in recs.items()} == {
        "a.png": 0,
        "b.jpg": 1,
        "c.png": 2,
        "d.png": 1,
        "h.png": 0,
        "t1.png": 1,
    }
    with open(os.path.join(root, "train", "a.png"), "rb") as f:
        assert recs["a.png"].image == f.read()  # PNG as shipped
    assert recs["b.jpg"].image_format == "jpeg" and recs["a.png"].image_format == "png"
    assert recs["h.png"].subject_id == "patient with spaces"
    assert np.array_equal(_png_array(recs["h.png"].image), arrays["h.png"])
    assert (recs["t1.png"].height, recs["t1.png"].width) == (40, 40)
    assert recs["t1.png"].split == "test"
    for name in ("a.png", "b.jpg", "c.png", "d.png", "h.png"):
        want = splits.hash_split(recs[name].subject_id, (0.5, 0.5, 0.0), salt="covidx")
        assert recs[name].split == want


def test_covidx_class_mapping_is_configurable(tmp_path):
    assert covidx.class_index("normal") == 0
    assert covidx.class_index("COVID-19") == 1
    assert covidx.class_index("pneumonia") == 2
    order = ("normal", "pneumonia", "covid-19")  # COVID-Net order
    assert [covidx.class_index(c, order) for c in ("negative", "pneumonia", "positive")] == [
        0,
        1,
        2,
    ]
    assert covidx.class_index("pneumonia", ("negative", "positive")) == -1
    with pytest.raises(bs.ParseError):
        covidx.class_index("flu")
    with pytest.raises(ValueError, match="same class twice"):
        covidx.CovidxConverter(str(tmp_path), classes="normal,negative")
    _covidx_tree(str(tmp_path))
    rows = list(covidx.CovidxConverter(str(tmp_path), classes="negative,positive").rows())
    assert _skips(rows) == {"class_not_selected": 1, "malformed_row": 2, "duplicate_row": 1}


def test_covidx_layout_names_expected_folder(tmp_path):
    _write(str(tmp_path / "train.txt"), b"")
    _write(str(tmp_path / "test.txt"), b"")
    with pytest.raises(bs.LayoutError, match="'train/'"):
        covidx.CovidxConverter(str(tmp_path)).check_layout()


@FUZZ
@given(st.text(max_size=60))
def test_fuzz_parse_covidx_line_raises_only_parse_errors(line):
    try:
        patient, filename, _, _ = covidx.parse_covidx_line(line)
        assert "/" not in filename
    except bs.ParseError:
        pass


# ---------------------------------------------------------------- SIIM


def kaggle_rle2mask(rle, width, height):
    """Verbatim logic of the SIIM Kaggle mask_functions.rle2mask (reference)."""
    mask = np.zeros(width * height)
    array = np.asarray([int(x) for x in rle.split()])
    starts = array[0::2]
    lengths = array[1::2]
    current_position = 0
    for index, start in enumerate(starts):
        current_position += start
        mask[current_position : current_position + lengths[index]] = 255
        current_position += lengths[index]
    return mask.reshape(width, height)


def test_rle_decode_hand_computed_mask():
    # H=4, W=3, column-major: "1 2 3 1" sets flat pixels 1, 2 and 6 ->
    # (row 1, col 0), (row 2, col 0), (row 2, col 1).
    want = np.array([[0, 0, 0], [255, 0, 0], [255, 255, 0], [0, 0, 0]], dtype=np.uint8)
    got = siim.rle_decode("1 2 3 1", height=4, width=3)
    assert got.shape == (4, 3) and np.array_equal(got, want)
    assert np.array_equal(siim.rle_decode("2 2 7 1", 4, 3, relative=False), want)
    assert np.array_equal(got, kaggle_rle2mask("1 2 3 1", 3, 4).T)
    assert siim.rle_encode(want) == "1 2 3 1"
    assert siim.rle_encode(want, relative=False) == "2 2 7 1"
    assert not siim.rle_decode(" -1", 4, 3).any() and siim.rle_encode(np.zeros((4, 3))) == "-1"


@pytest.mark.parametrize(
    "rle", ["1 2 3", "1 x", "1 -2", "1 0", "0 13", "5 2 5 2", "1.5 2", "1e3 2", "٣ 2"]
)
def test_rle_decode_rejects_malformed(rle):
    with pytest.raises(bs.ParseError):
        siim.rle_decode(rle, 4, 3)


@FUZZ
@given(st.integers(1, 9), st.integers(1, 9), st.data())
def test_rle_roundtrip_matches_kaggle_reference(h, w, data):
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))).reshape(
        h, w
    )
    rle = siim.rle_encode(mask)
    got = siim.rle_decode(rle, h, w)
    assert np.array_equal(got > 0, mask)
    if rle != "-1":
        assert np.array_equal(got, kaggle_rle2mask(rle, w, h).T)
    assert np.array_equal(siim.rle_decode(siim.rle_encode(mask, False), h, w, False) > 0, mask)


@FUZZ
@given(st.text(max_size=40))
def test_fuzz_rle_decode_raises_only_parse_errors(rle):
    try:
        out = siim.rle_decode(rle, 5, 4)
        assert out.shape == (5, 4)
    except bs.ParseError:
        pass


def _siim_tree(root):
    h, w = 32, 24
    arrays = {}
    for i, (iid, pid) in enumerate([("I1", "PA1"), ("I2", "PA2"), ("I3", "PA3"), ("I5", "PA5")]):
        arrays[iid] = _array(40 + i, h, w)
        path = os.path.join(root, siim.IMAGES_DIR, f"1.2.{i}", f"1.3.{i}", iid + ".dcm")
        _write(path, _dicom(arrays[iid], patient_id=pid))
    m1 = np.zeros((h, w), bool)
    m1[2:5, 3] = True
    m2 = np.zeros((h, w), bool)
    m2[10:12, 20:22] = True
    lines = [
        "ImageId, EncodedPixels",  # the Kaggle header has the leading space
        f"I1, {siim.rle_encode(m1)}",
        f"I1, {siim.rle_encode(m2)}",  # second region of I1: merged
        "I2, -1",
        "I3, 5 x",  # bad_rle
        "I4, -1",  # missing_image
        "I5, 760 10",  # bad_rle: runs past the 768 pixels
        "I6, 1 2, 3",  # malformed_row
    ]
    _write(os.path.join(root, siim.RLE_CSV), ("\n".join(lines) + "\n").encode())
    return arrays, m1 | m2


def test_siim_masks_labels_and_skips(tmp_path):
    root, out = str(tmp_path / "siim"), str(tmp_path / "out")
    arrays, want_mask = _siim_tree(root)
    bs.run_conversion(siim.SiimConverter(root), out, shards=1, beam_args=BEAM_ARGS)
    m, recs = _read(out)
    assert m["source"] == "siim-acr-pneumothorax"
    assert m["skipped"] == {"bad_rle": 2, "missing_image": 1, "malformed_row": 1}
    assert set(recs) == {"I1", "I2"}
    ptx = schema.label_index("Pneumothorax")
    i1, i2 = recs["I1"], recs["I2"]
    assert np.array_equal(_png_array(i1.image), arrays["I1"])
    assert (i1.height, i1.width) == (32, 24)
    assert list(i1.mask_labels) == [ptx] and i1.class_label == 1 and i1.chexpert[ptx] == 1
    assert np.array_equal(_png_array(i1.masks[0]), want_mask.astype(np.uint8) * 255)
    assert i2.class_label == 0 and not _png_array(i2.masks[0]).any()
    assert i1.subject_id == "PA1"
    assert i1.split == splits.hash_split("PA1", (0.7, 0.15, 0.15), salt="siim")


def test_siim_layout_names_expected_folder(tmp_path):
    _write(str(tmp_path / siim.RLE_CSV), b"ImageId, EncodedPixels\n")
    with pytest.raises(bs.LayoutError, match="'dicom-images-train/'"):
        siim.SiimConverter(str(tmp_path)).check_layout()


# ---------------------------------------------------------------- Object-CXR


def _object_tree(root):
    arrays = {}
    train = [
        "image_name,annotation",
        "a.jpg,0 8 12 24 36;1 40 4 56 20",
        "b.jpg,",
        "c.jpg,2 10 10 20 5 30 25",
        "d.jpg,3 1 2 3 4",  # bad_annotation (type)
        "e.jpg,0 1 2 3",  # bad_annotation (count)
        "f.jpg,0 1 2 3 4",  # missing_image
        "a.jpg,0 1 2 3 4",  # duplicate_row
        'g.jpg,"0 1 2 3 4",extra',  # malformed_row
    ]
    dev = ["image_name,annotation", "x.jpg,0 0 0 64 48", "y.jpg,0 100 100 120 120"]
    for i, name in enumerate(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]):
        arrays[name] = _encode(_array(50 + i, 48, 64), "JPEG")
        _write(os.path.join(root, "train", name), arrays[name])
    for i, name in enumerate(["x.jpg", "y.jpg"]):
        arrays[name] = _encode(_array(60 + i, 48, 64), "JPEG")
        _write(os.path.join(root, "dev", name), arrays[name])
    _write(os.path.join(root, "train.csv"), ("\n".join(train) + "\n").encode())
    _write(os.path.join(root, "dev.csv"), ("\n".join(dev) + "\n").encode())
    return arrays


def test_object_cxr_boxes_and_skips(tmp_path):
    root, out = str(tmp_path / "object-CXR"), str(tmp_path / "out")
    files = _object_tree(root)
    bs.run_conversion(object_cxr.ObjectCxrConverter(root), out, shards=1, beam_args=BEAM_ARGS)
    m, recs = _read(out)
    assert m["skipped"] == {
        "bad_annotation": 3,
        "missing_image": 1,
        "duplicate_row": 1,
        "malformed_row": 1,
    }
    assert set(recs) == {"a.jpg", "b.jpg", "c.jpg", "x.jpg"}
    dev_idx = schema.label_index("Support Devices")
    a = recs["a.jpg"]
    assert a.image == files["a.jpg"] and (a.height, a.width) == (48, 64)
    assert np.allclose(
        a.boxes, [[8 / 64, 12 / 48, 24 / 64, 36 / 48], [40 / 64, 4 / 48, 56 / 64, 20 / 48]]
    )
    assert list(a.box_labels) == [dev_idx, dev_idx] and a.class_label == 1
    assert recs["b.jpg"].class_label == 0 and len(recs["b.jpg"].boxes) == 0
    assert np.allclose(recs["c.jpg"].boxes, [[10 / 64, 5 / 48, 30 / 64, 25 / 48]])
    assert recs["x.jpg"].split == "test" and np.allclose(recs["x.jpg"].boxes, [[0, 0, 1, 1]])
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        assert recs[name].split == splits.hash_split(name, (0.8, 0.2, 0.0), salt="object-cxr")


def test_parse_object_cxr_annotation():
    got = object_cxr.parse_object_cxr_annotation("0 10 20 30 40; 2 1 1 5 1 3 4;")
    assert got == [(0, [(10.0, 20.0), (30.0, 40.0)]), (2, [(1.0, 1.0), (5.0, 1.0), (3.0, 4.0)])]
    assert object_cxr.parse_object_cxr_annotation("  ") == []
    for bad in ("5 1 2 3 4", "1 1 2 3", "2 1 1 2 2", "0 1 2 3 x", "0 1 2 3 inf", "0 -1 2 3 4"):
        with pytest.raises(bs.ParseError):
            object_cxr.parse_object_cxr_annotation(bad)


@FUZZ
@given(st.text(alphabet="012 ;.-x\n9e", max_size=50))
def test_fuzz_object_cxr_annotation_raises_only_parse_errors(text):
    try:
        boxes = object_cxr.annotation_boxes(text, 48, 64)
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    except bs.ParseError:
        pass


def test_object_cxr_layout_names_expected_file(tmp_path):
    _write(str(tmp_path / "train.csv"), b"image_name,annotation\n")
    os.makedirs(tmp_path / "train")
    with pytest.raises(bs.LayoutError, match="'dev.csv'"):
        object_cxr.ObjectCxrConverter(str(tmp_path)).check_layout()


@pytest.mark.slow
def test_cli_multi_processing_direct_runner_matches_in_memory(tmp_path):
    """The default CLI path (DirectRunner multi_processing, 2 workers) gives the same corpus."""
    import subprocess
    import sys

    root, out = str(tmp_path / "object-CXR"), str(tmp_path / "out")
    _object_tree(root)
    cmd = [sys.executable, "-m", "place_tf.data.convert", "object_cxr", "--input", root]
    cmd += ["--output", out, "--shards", "2", "--direct_num_workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "object-cxr: wrote train=" in proc.stderr
    m, recs = _read(out)
    assert m["generator"]["converter"] == "object-cxr"
    assert m["splits"]["train"]["shards"] == [
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]
    assert m["skipped"] == {
        "bad_annotation": 3,
        "missing_image": 1,
        "duplicate_row": 1,
        "malformed_row": 1,
    }
    assert set(recs) == {"a.jpg", "b.jpg", "c.jpg", "x.jpg"}


# ---------------------------------------------------------------- skeleton


class _Toy(bs.Converter):
    name = "toy"
    splits = ("train",)

    def convert(self, row):
        if row["kind"] == "boom":
            raise RuntimeError("unexpected")
        if row["kind"] == "badsplit":
            split = "test"
        else:
            split = "train"
        png = _encode(_array(0, 8, 8), "PNG")
        return schema.ExampleRecord(png, "png", 8, 8, image_id=row["_key"], split=split)


def test_convert_row_turns_unexpected_errors_into_counted_skips(caplog):
    conv = _Toy("/nowhere")
    split, raw = conv.convert_row({"_key": "k1", "kind": "ok"})
    rec = schema.from_example(raw)
    assert (split, rec.image_id, rec.source) == ("train", "k1", "toy")
    with caplog.at_level("WARNING"):
        boom = conv.convert_row({"_key": "secret-id", "kind": "boom"})
    assert boom.reason == bs.CONVERSION_ERROR and "RuntimeError" in boom.detail
    assert "secret-id" not in caplog.text and "RuntimeError" in caplog.text
    assert conv.convert_row({"_key": "k3", "kind": "badsplit"}).reason == bs.CONVERSION_ERROR
    assert conv.convert_row(bs.Skipped("x")) == bs.Skipped("x")


@FUZZ
@given(st.text(alphabet='ab,"\n\r\x00;-', max_size=60))
def test_fuzz_read_csv_yields_rows_or_skips(text):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.csv")
        _write(path, text.encode("utf-8"))
        try:
            rows = list(bs.read_csv(path, required=("a",)))
        except bs.LayoutError:
            return
        for r in rows:
            assert isinstance(r, bs.Skipped) or (isinstance(r, dict) and "a" in r)


def test_read_csv_non_utf8_is_a_parse_error(tmp_path):
    _write(str(tmp_path / "f.csv"), "a,b\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(bs.ParseError, match="not UTF-8"):
        list(bs.read_csv(str(tmp_path / "f.csv")))


def test_default_beam_args():
    got = bs.default_beam_args([])
    assert got[0] == "--runner=DirectRunner"
    assert "--direct_running_mode=multi_processing" in got
    assert any(a.startswith("--direct_num_workers=") for a in got)
    assert bs.default_beam_args(["--runner", "DataflowRunner"]) == ["--runner", "DataflowRunner"]
    kept = bs.default_beam_args(["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    assert kept.count("--direct_running_mode=in_memory") == 1 and len(kept) == 3
