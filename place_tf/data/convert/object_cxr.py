"""Object-CXR (foreign objects on chest X-rays, MIDL 2020 challenge) -> TFRecords with boxes.

Layout (challenge download):
  <input>/train.csv  <input>/dev.csv    image_name,annotation
  <input>/train/<image_name>.jpg  <input>/dev/<image_name>.jpg

`annotation` is ";"-separated objects "TYPE x1 y1 x2 y2 ...": TYPE 0 rectangle and 1 ellipse
give their bounding box corners (4 numbers); TYPE 2 is a polygon of >= 3 points. Each
object becomes the pixel bounding box of its points, normalised by the image size and
clipped to [0, 1]. A blank annotation means no foreign object.

Label choice: CheXpert has no "foreign object" finding, and the schema's box labels are
CheXpert indices, so boxes are labelled --box_label, default "Support Devices" (the
closest finding; many Object-CXR objects are in fact devices, wires, clips). Detection
training treats the boxes as one class anyway. `labels/class` = 1 if the image has any
object, else 0 (the challenge's classification task); `labels/chexpert` stays missing.

Splits: train.csv -> train, minus a --validate_fraction (default 0.2: 6400/1600 as in
MGCA) moved to "validate" by image-name hash (salt "object-cxr"); dev.csv -> test.
Malformed annotations are skipped as "bad_annotation", repeated image names as
"duplicate_row".

Command:
  python -m place_tf.data.convert object_cxr --input object-CXR --output corpora/object_cxr
"""

from __future__ import annotations

import math

from place_tf.data import schema, splits
from place_tf.data.convert import beam_skeleton as bs

CSV_SPLITS = (("train.csv", "train", "train"), ("dev.csv", "dev", "test"))
RECTANGLE, ELLIPSE, POLYGON = 0, 1, 2


def parse_object_cxr_annotation(text: str) -> list[tuple[int, list[tuple[float, float]]]]:
    """'0 10 20 30 40;2 1 1 5 1 3 4' -> [(0, [(10, 20), (30, 40)]), (2, [(1, 1), (5, 1), (3, 4)])].

    ParseError for an unknown type, a wrong number of coordinates, non-finite or negative
    numbers; never another error for a str input. Blank -> [].
    """
    if not isinstance(text, str):
        raise bs.ParseError(f"annotation: expected text, got {type(text).__name__}")
    objects = []
    for part in text.split(";"):
        tokens = part.split()
        if not tokens:
            continue
        if tokens[0] not in ("0", "1", "2"):
            raise bs.ParseError(f"annotation: object type {tokens[0][:10]!r} is not 0, 1 or 2")
        kind = int(tokens[0])
        try:
            nums = [float(t) for t in tokens[1:]]
        except ValueError:
            raise bs.ParseError("annotation: coordinates must be numbers") from None
        if any(not math.isfinite(v) or v < 0 for v in nums):
            raise bs.ParseError("annotation: coordinates must be finite and >= 0")
        if kind in (RECTANGLE, ELLIPSE) and len(nums) != 4:
            raise bs.ParseError(f"annotation: type {kind} needs 4 numbers, got {len(nums)}")
        if kind == POLYGON and (len(nums) % 2 or len(nums) < 6):
            raise bs.ParseError(
                f"annotation: polygon needs >= 3 x,y points, got {len(nums)} numbers"
            )
        objects.append((kind, list(zip(nums[0::2], nums[1::2], strict=True))))
    return objects


def annotation_boxes(text: str, height: int, width: int) -> list[list[float]]:
    """Normalised [xmin, ymin, xmax, ymax] of each object (bounding box of its points)."""
    boxes = []
    for _, points in parse_object_cxr_annotation(text):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(max(min(xs) / width, 0.0), 1.0), min(max(max(xs) / width, 0.0), 1.0)
        y0, y1 = min(max(min(ys) / height, 0.0), 1.0), min(max(max(ys) / height, 0.0), 1.0)
        if not (x1 > x0 and y1 > y0):
            raise bs.ParseError("annotation: object has no area inside the image")
        boxes.append([x0, y0, x1, y1])
    return boxes


class ObjectCxrConverter(bs.Converter):
    name = "object-cxr"
    splits = ("train", "validate", "test")
    default_shards = 32

    def __init__(
        self, input_dir: str, box_label: str = "Support Devices", validate_fraction: float = 0.2
    ):
        super().__init__(input_dir)
        self.box_label = box_label
        self._box_index = schema.label_index(box_label)
        if not 0.0 <= validate_fraction < 1.0:
            raise ValueError(f"--validate_fraction must be in [0, 1), got {validate_fraction}")
        self.validate_fraction = float(validate_fraction)

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--box_label", default="Support Devices")
        parser.add_argument("--validate_fraction", type=float, default=0.2)

    @classmethod
    def from_args(cls, args) -> ObjectCxrConverter:
        return cls(args.input, args.box_label, args.validate_fraction)

    def check_layout(self) -> None:
        hint = "pass the object-CXR folder holding train.csv, dev.csv, train/ and dev/"
        for name, folder, _ in CSV_SPLITS:
            bs.require_file(self.input_dir, name, hint)
            bs.require_dir(self.input_dir, folder, hint)

    def source_files(self) -> list[str]:
        return [bs.join(self.input_dir, name) for name, _, _ in CSV_SPLITS]

    def rows(self):
        fractions = (1.0 - self.validate_fraction, self.validate_fraction, 0.0)
        seen: set[tuple[str, str]] = set()
        for name, folder, split in CSV_SPLITS:
            path = bs.join(self.input_dir, name)
            for row in bs.read_csv(path, required=("image_name", "annotation")):
                if isinstance(row, bs.Skipped):
                    yield row
                    continue
                image = row["image_name"].strip()
                if not image or "/" in image or "\\" in image or image.startswith("."):
                    yield bs.Skipped(bs.MALFORMED_ROW, "image_name: empty or not a file name")
                    continue
                if (folder, image) in seen:
                    yield bs.Skipped(bs.DUPLICATE_ROW, image)
                    continue
                seen.add((folder, image))
                out_split = split
                if split == "train" and self.validate_fraction > 0:
                    out_split = splits.hash_split(image, fractions, salt="object-cxr")
                yield {
                    "_key": image,
                    "image_name": image,
                    "annotation": row["annotation"],
                    "split": out_split,
                    "image_path": bs.join(self.input_dir, folder, image),
                }

    def convert(self, row: dict) -> schema.ExampleRecord:
        try:  # syntax first: no image read for a row that cannot be used
            parse_object_cxr_annotation(row["annotation"])
        except bs.ParseError as e:
            raise bs.SkipError(bs.BAD_ANNOTATION, str(e)) from None
        rec = bs.image_record(row["image_path"], image_id=row["image_name"], split=row["split"])
        try:
            rec.boxes = annotation_boxes(row["annotation"], rec.height, rec.width)
        except bs.ParseError as e:
            raise bs.SkipError(bs.BAD_ANNOTATION, str(e)) from None
        rec.box_labels = [self._box_index] * len(rec.boxes)
        rec.class_label = int(bool(rec.boxes))
        return rec
