"""The one TFRecord schema shared by SynthCXR and every dataset converter.

Every source (MIMIC-CXR, CheXpert, RSNA, COVIDx, SIIM-ACR, Object-CXR, SynthCXR) writes
`tf.train.Example`s with exactly these keys, so the input pipeline, the TFX pipeline and
the export signature `from_examples` parse them one way.

Conventions
- Images are stored as shipped (PNG or JPEG bytes), never re-encoded lossy.
- CheXpert labels: 14 values in CHEXPERT_LABELS order, each 1 (positive), 0 (negative),
  -1 (uncertain) or LABEL_MISSING (-2, blank in the source).
- Boxes: normalised [xmin, ymin, xmax, ymax] in [0, 1] of the stored image, flattened;
  `objects/label` is the CheXpert index of each box's finding.
- Masks: one PNG (8-bit, 0/255) per entry of `mask/label` (a CheXpert index).
- Text and ids are UTF-8 strings; they are sensitive and must never be logged at INFO.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

SCHEMA_VERSION = 1

CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
NUM_CHEXPERT = len(CHEXPERT_LABELS)
# The CheXpert competition labels used for 5-label AUROC.
COMPETITION_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)
LABEL_MISSING = -2
SPLITS: tuple[str, ...] = ("train", "validate", "test")

# Feature keys (TFX penguin style: one place for the names).
IMAGE = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_ID = "image/id"
STUDY_ID = "study/id"
SUBJECT_ID = "subject/id"
VIEW = "image/view"
SPLIT = "split"
SOURCE = "source"
FINDINGS = "report/findings"
IMPRESSION = "report/impression"
CHEXPERT = "labels/chexpert"
CLASS_LABEL = "labels/class"
BOXES = "objects/bbox"
BOX_LABELS = "objects/label"
MASKS = "mask/encoded"
MASK_LABELS = "mask/label"
VERSION = "schema/version"

# Keys whose values are sensitive (report text, patient/study ids).
SENSITIVE_KEYS = (FINDINGS, IMPRESSION, IMAGE_ID, STUDY_ID, SUBJECT_ID)


def label_index(name: str) -> int:
    """CheXpert index of a label name (exact spelling of CHEXPERT_LABELS)."""
    try:
        return CHEXPERT_LABELS.index(name)
    except ValueError:
        raise ValueError(
            f"unknown CheXpert label {name!r}; expected one of {CHEXPERT_LABELS}"
        ) from None


@dataclasses.dataclass
class ExampleRecord:
    """One image (with its report and annotations) in schema form, before serialization."""

    image: bytes
    image_format: str  # "png" or "jpeg"
    height: int
    width: int
    image_id: str
    study_id: str = ""
    subject_id: str = ""
    view: str = ""
    split: str = "train"
    source: str = ""
    findings: str = ""
    impression: str = ""
    chexpert: Sequence[int] = dataclasses.field(
        default_factory=lambda: [LABEL_MISSING] * NUM_CHEXPERT
    )
    class_label: int = -1
    boxes: Sequence[Sequence[float]] = ()  # each [xmin, ymin, xmax, ymax], normalised
    box_labels: Sequence[int] = ()
    masks: Sequence[bytes] = ()  # PNG bytes
    mask_labels: Sequence[int] = ()

    def validate(self) -> None:
        """Raise ValueError naming the field that breaks the schema."""
        where = f"example {self.image_id!r}" if self.image_id else "example"
        if not self.image:
            raise ValueError(f"{where}: field 'image' is empty")
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(
                f"{where}: field 'image_format' must be png or jpeg, got {self.image_format!r}"
            )
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"{where}: fields 'height'/'width' must be positive")
        if self.split not in SPLITS:
            raise ValueError(f"{where}: field 'split' must be one of {SPLITS}, got {self.split!r}")
        if len(self.chexpert) != NUM_CHEXPERT:
            raise ValueError(
                f"{where}: field 'chexpert' needs {NUM_CHEXPERT} values, got {len(self.chexpert)}"
            )
        bad = [v for v in self.chexpert if v not in (1, 0, -1, LABEL_MISSING)]
        if bad:
            raise ValueError(
                f"{where}: field 'chexpert' has values {bad} outside {{1, 0, -1, {LABEL_MISSING}}}"
            )
        if len(self.boxes) != len(self.box_labels):
            raise ValueError(
                f"{where}: {len(self.boxes)} boxes but {len(self.box_labels)} box labels"
            )
        for box in self.boxes:
            if len(box) != 4:
                raise ValueError(f"{where}: field 'boxes' entries need 4 values, got {list(box)}")
            x0, y0, x1, y1 = box
            if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
                raise ValueError(
                    f"{where}: box {list(box)} is not a normalised [xmin, ymin, xmax, ymax]"
                )
        if len(self.masks) != len(self.mask_labels):
            raise ValueError(
                f"{where}: {len(self.masks)} masks but {len(self.mask_labels)} mask labels"
            )
        for lab in list(self.box_labels) + list(self.mask_labels):
            if not 0 <= lab < NUM_CHEXPERT:
                raise ValueError(f"{where}: annotation label {lab} is not a CheXpert index")


def _bytes(values: Sequence[bytes]):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _ints(values: Sequence[int]):
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values: Sequence[float]):
    import tensorflow as tf

    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def to_example(rec: ExampleRecord):
    """ExampleRecord -> tf.train.Example (validated first)."""
    import tensorflow as tf

    rec.validate()
    s = lambda x: _bytes([x.encode("utf-8")])  # noqa: E731
    feats = {
        IMAGE: _bytes([rec.image]),
        IMAGE_FORMAT: s(rec.image_format),
        IMAGE_HEIGHT: _ints([rec.height]),
        IMAGE_WIDTH: _ints([rec.width]),
        IMAGE_ID: s(rec.image_id),
        STUDY_ID: s(rec.study_id),
        SUBJECT_ID: s(rec.subject_id),
        VIEW: s(rec.view),
        SPLIT: s(rec.split),
        SOURCE: s(rec.source),
        FINDINGS: s(rec.findings),
        IMPRESSION: s(rec.impression),
        CHEXPERT: _ints(rec.chexpert),
        CLASS_LABEL: _ints([rec.class_label]),
        BOXES: _floats(np.asarray(rec.boxes, dtype=np.float32).reshape(-1)),
        BOX_LABELS: _ints(rec.box_labels),
        MASKS: _bytes(rec.masks),
        MASK_LABELS: _ints(rec.mask_labels),
        VERSION: _ints([SCHEMA_VERSION]),
    }
    return tf.train.Example(features=tf.train.Features(feature=feats))


def from_example(example) -> ExampleRecord:
    """tf.train.Example (or its serialized bytes) -> ExampleRecord, in Python."""
    import tensorflow as tf

    if isinstance(example, bytes):
        example = tf.train.Example.FromString(example)
    f = example.features.feature

    def s(key: str) -> str:
        v = f[key].bytes_list.value
        return v[0].decode("utf-8") if v else ""

    def i(key: str) -> list[int]:
        return list(f[key].int64_list.value)

    version = i(VERSION)
    if version and version[0] != SCHEMA_VERSION:
        raise ValueError(
            f"schema version {version[0]} is not supported (this code reads {SCHEMA_VERSION})"
        )
    boxes = np.asarray(f[BOXES].float_list.value, dtype=np.float32).reshape(-1, 4)
    return ExampleRecord(
        image=f[IMAGE].bytes_list.value[0] if f[IMAGE].bytes_list.value else b"",
        image_format=s(IMAGE_FORMAT),
        height=(i(IMAGE_HEIGHT) or [0])[0],
        width=(i(IMAGE_WIDTH) or [0])[0],
        image_id=s(IMAGE_ID),
        study_id=s(STUDY_ID),
        subject_id=s(SUBJECT_ID),
        view=s(VIEW),
        split=s(SPLIT),
        source=s(SOURCE),
        findings=s(FINDINGS),
        impression=s(IMPRESSION),
        chexpert=i(CHEXPERT),
        class_label=(i(CLASS_LABEL) or [-1])[0],
        boxes=[list(map(float, b)) for b in boxes],
        box_labels=i(BOX_LABELS),
        masks=list(f[MASKS].bytes_list.value),
        mask_labels=i(MASK_LABELS),
    )


def feature_spec() -> dict:
    """`tf.io.parse_example` spec: fixed-length scalars and labels, varlen annotations."""
    import tensorflow as tf

    scalar_str = lambda: tf.io.FixedLenFeature([], tf.string, default_value="")  # noqa: E731
    return {
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        IMAGE_FORMAT: scalar_str(),
        IMAGE_HEIGHT: tf.io.FixedLenFeature([], tf.int64, default_value=0),
        IMAGE_WIDTH: tf.io.FixedLenFeature([], tf.int64, default_value=0),
        IMAGE_ID: scalar_str(),
        STUDY_ID: scalar_str(),
        SUBJECT_ID: scalar_str(),
        VIEW: scalar_str(),
        SPLIT: scalar_str(),
        SOURCE: scalar_str(),
        FINDINGS: scalar_str(),
        IMPRESSION: scalar_str(),
        CHEXPERT: tf.io.FixedLenFeature(
            [NUM_CHEXPERT], tf.int64, default_value=[LABEL_MISSING] * NUM_CHEXPERT
        ),
        CLASS_LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        BOXES: tf.io.VarLenFeature(tf.float32),
        BOX_LABELS: tf.io.VarLenFeature(tf.int64),
        MASKS: tf.io.VarLenFeature(tf.string),
        MASK_LABELS: tf.io.VarLenFeature(tf.int64),
        VERSION: tf.io.FixedLenFeature([], tf.int64, default_value=SCHEMA_VERSION),
    }


def report_text(findings, impression):
    """The report the model reads: FINDINGS then IMPRESSION (works on str or tf.string)."""
    if isinstance(findings, str):
        return " ".join(p for p in (findings.strip(), impression.strip()) if p)
    import tensorflow as tf

    joined = tf.strings.join([findings, impression], separator=" ")
    return tf.strings.strip(joined)
