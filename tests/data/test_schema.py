"""place_tf.data.schema: Example round trips (Python and tf.io) and validate() errors."""

import numpy as np
import pytest
import tensorflow as tf

from place_tf.data import schema


def _record(**overrides):
    fields = dict(
        image=b"\x89PNG\r\n\x1a\nfake",
        image_format="png",
        height=40,
        width=32,
        image_id="img-1",
        study_id="study-1",
        subject_id="subject-1",
        view="PA",
        split="validate",
        source="unit",
        findings="Small right pleural effusion.",
        impression="Effusion. Ünïcode ok.",
        chexpert=[1, 0, -1, schema.LABEL_MISSING] + [0] * 10,
        class_label=2,
        boxes=[[0.125, 0.25, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0]],  # float32-exact
        box_labels=[10, 13],
        masks=[b"mask-a", b"mask-b"],
        mask_labels=[10, 2],
    )
    fields.update(overrides)
    return schema.ExampleRecord(**fields)


def test_python_round_trip_keeps_every_field():
    rec = _record()
    ex = schema.to_example(rec)
    back = schema.from_example(ex.SerializeToString())
    assert back == rec
    assert schema.from_example(ex) == rec  # proto or bytes


def test_feature_spec_parses_what_to_example_writes():
    rec = _record()
    parsed = tf.io.parse_single_example(
        schema.to_example(rec).SerializeToString(), schema.feature_spec()
    )
    assert parsed[schema.IMAGE].numpy() == rec.image
    assert parsed[schema.IMAGE_HEIGHT].numpy() == 40 and parsed[schema.IMAGE_WIDTH].numpy() == 32
    assert parsed[schema.FINDINGS].numpy().decode() == rec.findings
    assert parsed[schema.IMPRESSION].numpy().decode("utf-8") == rec.impression
    np.testing.assert_array_equal(parsed[schema.CHEXPERT].numpy(), rec.chexpert)
    assert parsed[schema.CLASS_LABEL].numpy() == 2
    boxes = tf.sparse.to_dense(parsed[schema.BOXES]).numpy().reshape(-1, 4)
    np.testing.assert_allclose(boxes, rec.boxes)
    np.testing.assert_array_equal(tf.sparse.to_dense(parsed[schema.BOX_LABELS]).numpy(), [10, 13])
    masks = tf.sparse.to_dense(parsed[schema.MASKS], default_value=b"").numpy().tolist()
    assert masks == [b"mask-a", b"mask-b"]
    assert parsed[schema.VERSION].numpy() == schema.SCHEMA_VERSION


def test_feature_spec_defaults_for_absent_optional_keys():
    minimal = tf.train.Example(
        features=tf.train.Features(
            feature={schema.IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))}
        )
    )
    parsed = tf.io.parse_single_example(minimal.SerializeToString(), schema.feature_spec())
    np.testing.assert_array_equal(parsed[schema.CHEXPERT].numpy(), [schema.LABEL_MISSING] * 14)
    assert parsed[schema.CLASS_LABEL].numpy() == -1
    assert parsed[schema.FINDINGS].numpy() == b""


def test_report_text_joins_sections_in_python_and_tf():
    assert schema.report_text("  Findings here. ", "Impression.") == "Findings here. Impression."
    assert schema.report_text("", " Only impression. ") == "Only impression."
    assert schema.report_text("", "") == ""
    out = schema.report_text(tf.constant(["A.", "", ""]), tf.constant(["B.", "C.", ""]))
    assert [s.decode() for s in out.numpy()] == ["A. B.", "C.", ""]


def test_label_index_names_the_bad_label():
    assert schema.label_index("Pleural Effusion") == 10
    with pytest.raises(ValueError, match="unknown CheXpert label 'Effusion'"):
        schema.label_index("Effusion")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"image": b""}, "field 'image' is empty"),
        ({"image_format": "bmp"}, "field 'image_format' must be png or jpeg"),
        ({"height": 0}, "'height'/'width' must be positive"),
        ({"split": "dev"}, "field 'split' must be one of"),
        ({"chexpert": [1] * 13}, "needs 14 values, got 13"),
        ({"chexpert": [2] + [0] * 13}, r"values \[2\] outside"),
        ({"box_labels": [10]}, "2 boxes but 1 box labels"),
        ({"boxes": [[0.1, 0.2, 0.5], [0, 0, 1, 1]]}, "entries need 4 values"),
        ({"boxes": [[0.5, 0.2, 0.4, 0.75], [0, 0, 1, 1]]}, "is not a normalised"),
        ({"boxes": [[0.1, 0.2, 0.5, 1.5], [0, 0, 1, 1]]}, "is not a normalised"),
        ({"mask_labels": [10]}, "2 masks but 1 mask labels"),
        ({"box_labels": [10, 14]}, "annotation label 14 is not a CheXpert index"),
    ],
)
def test_validate_names_the_broken_field(overrides, message):
    rec = _record(**overrides)
    with pytest.raises(ValueError, match=message) as e:
        rec.validate()
    assert "example 'img-1'" in str(e.value)
    with pytest.raises(ValueError, match=message):
        schema.to_example(rec)  # never serialises an invalid record


def test_from_example_rejects_another_schema_version():
    ex = schema.to_example(_record())
    ex.features.feature[schema.VERSION].int64_list.value[:] = [schema.SCHEMA_VERSION + 1]
    with pytest.raises(ValueError, match="schema version 2 is not supported"):
        schema.from_example(ex)
