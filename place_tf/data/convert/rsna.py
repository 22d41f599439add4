"""RSNA Pneumonia Detection Challenge (stage 2) -> TFRecords with boxes (detection, classification).

Layout (Kaggle download):
  <input>/stage_2_train_labels.csv    patientId,x,y,width,height,Target
  <input>/stage_2_train_images/<patientId>.dcm

- One example per patient (image); several CSV rows of a patient are several boxes.
- Boxes are [x, y, x + width, y + height] / [image width, height], clipped to [0, 1];
  `objects/label` is the CheXpert index of --box_label (default "Pneumonia"; "Lung Opacity"
  is the other sensible choice: RSNA boxes mark opacities suspicious for pneumonia).
- `labels/class` = Target (0/1); `labels/chexpert` has Pneumonia = Target, the rest
  LABEL_MISSING.
- Segmentation masks from the boxes (MGCA's RSNA segmentation protocol: the union of the
  patient's boxes filled, label --box_label; an empty mask for a negative), unless
  --nomasks_from_boxes.
- DICOM -> PNG (beam_skeleton.dicom_to_png: 8-bit stays 8-bit, MONOCHROME1 inverted).
- Only the train labels are public, so splits are by patient hash (--split_fractions,
  default 0.7,0.15,0.15 train/validate/test as in GLoRIA/MGCA; salt "rsna").
- A patient with any malformed row (Target not 0/1, box not four finite numbers with
  positive size, Target differing between rows) is skipped once as "malformed_row".

Commands:
  python -m place_tf.data.convert rsna --input rsna-pneumonia-detection-challenge \\
      --output corpora/rsna
  python -m place_tf.data.convert rsna --input gs://B/rsna --output gs://B/corpora/rsna \\
      --runner DataflowRunner --project P --region R --temp_location gs://B/tmp \\
      --sdk_container_image IMAGE
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from place_tf.data import schema, splits
from place_tf.data.convert import beam_skeleton as bs

LABELS_CSV = "stage_2_train_labels.csv"
IMAGES_DIR = "stage_2_train_images"
COLUMNS = ("patientId", "x", "y", "width", "height", "Target")


def _patient_id(value: str) -> str:
    pid = str(value).strip()
    if not pid or "/" in pid or "\\" in pid or pid.startswith("."):
        raise bs.ParseError("patientId: empty or not a file name")
    return pid


def parse_rsna_row(
    row: Mapping[str, str],
) -> tuple[str, int, tuple[float, float, float, float] | None]:
    """(patientId, Target, (x, y, width, height) or None); ParseError naming the field."""
    pid = _patient_id(row.get("patientId", ""))
    target = str(row.get("Target", "")).strip()
    if target not in ("0", "1"):
        raise bs.ParseError(f"Target: {target[:10]!r} is not 0 or 1")
    if target == "0":
        return pid, 0, None
    vals = []
    for f in ("x", "y", "width", "height"):
        try:
            v = float(str(row.get(f, "")).strip())
        except ValueError:
            raise bs.ParseError(f"{f}: not a number") from None
        if not math.isfinite(v):
            raise bs.ParseError(f"{f}: not finite")
        vals.append(v)
    x, y, w, h = vals
    if w <= 0 or h <= 0:
        raise bs.ParseError("width/height: must be positive")
    return pid, 1, (x, y, w, h)


def normalise_box(x: float, y: float, w: float, h: float, img_h: int, img_w: int) -> list[float]:
    """Pixel (x, y, width, height) -> normalised [xmin, ymin, xmax, ymax] clipped to [0, 1].

    ParseError when nothing of the box is inside the image.
    """
    x0, y0 = min(max(x / img_w, 0.0), 1.0), min(max(y / img_h, 0.0), 1.0)
    x1, y1 = min(max((x + w) / img_w, 0.0), 1.0), min(max((y + h) / img_h, 0.0), 1.0)
    if not (x1 > x0 and y1 > y0):
        raise bs.ParseError("box lies outside the image")
    return [x0, y0, x1, y1]


def split_fractions_arg(value) -> tuple[float, float, float]:
    if isinstance(value, str):
        value = [float(v) for v in value.split(",")]
    value = tuple(float(v) for v in value)
    if len(value) != 3 or any(v < 0 for v in value) or abs(sum(value) - 1) > 1e-6:
        raise ValueError(f"--split_fractions needs three numbers >= 0 summing to 1, got {value}")
    return value


class RsnaConverter(bs.Converter):
    name = "rsna-pneumonia"
    splits = ("train", "validate", "test")
    default_shards = 32

    def __init__(
        self,
        input_dir: str,
        box_label: str = "Pneumonia",
        split_fractions: Sequence[float] | str = (0.7, 0.15, 0.15),
        labels_csv: str = LABELS_CSV,
        images_dir: str = IMAGES_DIR,
        masks_from_boxes: bool = True,
    ):
        super().__init__(input_dir)
        self.masks_from_boxes = bool(masks_from_boxes)
        self.box_label = box_label
        self._box_index = schema.label_index(box_label)
        self.split_fractions = split_fractions_arg(split_fractions)
        self.labels_csv = labels_csv
        self.images_dir = images_dir

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--box_label", default="Pneumonia", help="CheXpert name for boxes")
        parser.add_argument("--split_fractions", default="0.7,0.15,0.15")
        parser.add_argument("--labels_csv", default=LABELS_CSV)
        parser.add_argument("--images_dir", default=IMAGES_DIR)
        parser.add_argument(
            "--nomasks_from_boxes",
            dest="masks_from_boxes",
            action="store_false",
            help="no segmentation masks (by default the filled boxes, as MGCA)",
        )

    @classmethod
    def from_args(cls, args) -> RsnaConverter:
        return cls(
            args.input,
            args.box_label,
            args.split_fractions,
            args.labels_csv,
            args.images_dir,
            args.masks_from_boxes,
        )

    def split_file_key(self, value: str) -> str:
        """'<patientId>' or '.../<patientId>.dcm' -> patientId."""
        name = super().split_file_key(value)
        return name[: -len(".dcm")] if name.endswith(".dcm") else name

    def check_layout(self) -> None:
        hint = "pass the unzipped rsna-pneumonia-detection-challenge folder"
        bs.require_file(self.input_dir, self.labels_csv, hint)
        bs.require_dir(self.input_dir, self.images_dir, hint)

    def source_files(self) -> list[str]:
        return [bs.join(self.input_dir, self.labels_csv)]

    def rows(self):
        patients: dict[str, list] = {}
        bad: set[str] = set()
        for row in bs.read_csv(bs.join(self.input_dir, self.labels_csv), required=COLUMNS):
            if isinstance(row, bs.Skipped):
                yield row
                continue
            try:
                pid = _patient_id(row.get("patientId", ""))
            except bs.ParseError as e:
                yield bs.Skipped(bs.MALFORMED_ROW, str(e))
                continue
            try:
                _, target, box = parse_rsna_row(row)
                patients.setdefault(pid, []).append((target, box))
            except bs.ParseError:
                patients.setdefault(pid, [])
                bad.add(pid)
        for pid, entries in patients.items():
            targets = {t for t, _ in entries}
            if pid in bad or len(targets) != 1:
                yield bs.Skipped(bs.MALFORMED_ROW, pid)
                continue
            yield {
                "_key": pid,
                "patient_id": pid,
                "target": targets.pop(),
                "boxes": [b for _, b in entries if b is not None],
                "image_path": bs.join(self.input_dir, self.images_dir, pid + ".dcm"),
                "split": splits.hash_split(pid, self.split_fractions, salt="rsna"),
            }

    def convert(self, row: dict) -> schema.ExampleRecord:
        png, h, w, ds = bs.load_dicom_as_png(row["image_path"])
        try:
            boxes = [normalise_box(*b, img_h=h, img_w=w) for b in row["boxes"]]
        except bs.ParseError as e:
            raise bs.SkipError(bs.BAD_ANNOTATION, str(e)) from None
        chexpert = [schema.LABEL_MISSING] * schema.NUM_CHEXPERT
        chexpert[schema.label_index("Pneumonia")] = row["target"]
        masks = []
        if self.masks_from_boxes:
            masks = [bs.mask_png(box_mask(boxes, h, w))]
        return schema.ExampleRecord(
            image=png,
            image_format="png",
            height=h,
            width=w,
            image_id=row["patient_id"],
            subject_id=row["patient_id"],
            view=str(ds.get("ViewPosition", "")).strip().upper(),
            split=row["split"],
            source=self.name,
            chexpert=chexpert,
            class_label=row["target"],
            boxes=boxes,
            box_labels=[self._box_index] * len(boxes),
            masks=masks,
            mask_labels=[self._box_index] * len(masks),
        )


def box_mask(boxes, height: int, width: int):
    """(height, width) bool mask: the union of normalised [x0, y0, x1, y1] boxes, filled
    over the pixels they cover (rounded outward)."""
    import numpy as np

    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        c0, r0 = int(np.floor(x0 * width)), int(np.floor(y0 * height))
        c1, r1 = int(np.ceil(x1 * width)), int(np.ceil(y1 * height))
        mask[r0:r1, c0:c1] = True
    return mask
