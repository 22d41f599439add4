"""SIIM-ACR Pneumothorax Segmentation -> TFRecords with masks (segmentation, classification).

Layout (Kaggle stage-1 download, as used by GLoRIA/MGCA):
  <input>/train-rle.csv             ImageId, EncodedPixels  ("-1" = no pneumothorax;
                                    several rows per image = several regions)
  <input>/dicom-images-train/<study UID>/<series UID>/<ImageId>.dcm

Masks: the SIIM RLE is the "relative" format of Kaggle's mask_functions.py: pairs
(offset, length), each offset counted from the end of the previous run, over the pixels in
column-major order (the reference decoder does `rle2mask(...).T`). `rle_decode` does exactly
that; --rle_format absolute reads the standard 1-based "start length" pairs of the stage-2
CSV (also column-major). All rows of an image are merged (union). Every example carries
one 8-bit PNG mask (0/255, zero for negatives) with `mask/label` = Pneumothorax;
`labels/class` = has pneumothorax; `labels/chexpert` has Pneumothorax set, rest missing.
An image with any undecodable RLE is skipped as "bad_rle"; a CSV row whose ImageId has no
DICOM as "missing_image".

Splits: by patient hash (DICOM PatientID, else ImageId), --split_fractions default
0.7,0.15,0.15 (GLoRIA/MGCA), salt "siim".

Command:
  python -m place_tf.data.convert siim --input siim-acr-pneumothorax --output corpora/siim
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from place_tf.data import schema, splits
from place_tf.data.convert import beam_skeleton as bs
from place_tf.data.convert.rsna import split_fractions_arg

RLE_CSV = "train-rle.csv"
IMAGES_DIR = "dicom-images-train"
NO_MASK = "-1"


def rle_decode(rle: str, height: int, width: int, relative: bool = True) -> np.ndarray:
    """SIIM RLE -> (height, width) uint8 mask with 0/255 (Kaggle `rle2mask(rle, w, h).T`).

    "-1" (or blank) is an empty mask. ParseError for anything else that is not pairs of
    non-negative integers with positive lengths inside the image; never another error for
    a str input.
    """
    if not isinstance(rle, str):
        raise bs.ParseError(f"RLE: expected text, got {type(rle).__name__}")
    if height <= 0 or width <= 0:
        raise bs.ParseError(f"RLE: image size {height}x{width} is empty")
    size = height * width
    flat = np.zeros(size, dtype=np.uint8)
    text = rle.strip()
    if text in ("", NO_MASK):
        return flat.reshape(width, height).T.copy()
    tokens = text.split()
    if len(tokens) % 2:
        raise bs.ParseError(f"RLE: odd number of values ({len(tokens)})")
    try:
        values = [int(t) for t in tokens if t.isascii() and t.isdigit()]
    except ValueError:
        values = []
    if len(values) != len(tokens):
        raise bs.ParseError("RLE: values must be non-negative integers")
    pos = 0
    for start, length in zip(values[0::2], values[1::2], strict=True):
        if length < 1:
            raise bs.ParseError("RLE: run length must be positive")
        if relative:
            pos += start
        else:
            if start < 1 or start - 1 < pos:
                raise bs.ParseError("RLE: absolute starts must be 1-based and increasing")
            pos = start - 1
        if pos + length > size:
            raise bs.ParseError(f"RLE: run ends at pixel {pos + length}, image has {size}")
        flat[pos : pos + length] = 255
        pos += length
    # Column-major: the flat index walks down each column, as the reference decoder's
    # reshape(width, height).T.
    return flat.reshape(width, height).T.copy()


def rle_encode(mask, relative: bool = True) -> str:
    """Inverse of `rle_decode` ("-1" for an empty mask): the Kaggle mask2rle format."""
    flat = (np.asarray(mask) > 0).T.reshape(-1).astype(np.int8)
    padded = np.concatenate([[0], flat, [0]])
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) == 0:
        return NO_MASK
    out = []
    prev_end = 0
    for s, e in zip(starts, ends, strict=True):
        out += [int(s - prev_end), int(e - s)] if relative else [int(s + 1), int(e - s)]
        prev_end = e
    return " ".join(map(str, out))


class SiimConverter(bs.Converter):
    name = "siim-acr-pneumothorax"
    splits = ("train", "validate", "test")
    default_shards = 32

    def __init__(
        self,
        input_dir: str,
        split_fractions: Sequence[float] | str = (0.7, 0.15, 0.15),
        rle_format: str = "relative",
        rle_csv: str = RLE_CSV,
        images_dir: str = IMAGES_DIR,
    ):
        super().__init__(input_dir)
        if rle_format not in ("relative", "absolute"):
            raise ValueError(f"--rle_format must be relative or absolute, got {rle_format!r}")
        self.split_fractions = split_fractions_arg(split_fractions)
        self.rle_format = rle_format
        self.rle_csv = rle_csv
        self.images_dir = images_dir

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--split_fractions", default="0.7,0.15,0.15")
        parser.add_argument("--rle_format", default="relative", choices=("relative", "absolute"))
        parser.add_argument("--rle_csv", default=RLE_CSV)
        parser.add_argument("--images_dir", default=IMAGES_DIR)

    @classmethod
    def from_args(cls, args) -> SiimConverter:
        return cls(args.input, args.split_fractions, args.rle_format, args.rle_csv, args.images_dir)

    def check_layout(self) -> None:
        hint = "pass the SIIM-ACR folder holding train-rle.csv and dicom-images-train/"
        bs.require_file(self.input_dir, self.rle_csv, hint)
        bs.require_dir(self.input_dir, self.images_dir, hint)

    def source_files(self) -> list[str]:
        return [bs.join(self.input_dir, self.rle_csv)]

    def rows(self):
        dicoms: dict[str, str] = {}
        for path in bs.find_files(bs.join(self.input_dir, self.images_dir), ".dcm"):
            dicoms.setdefault(path.replace("\\", "/").rsplit("/", 1)[-1][: -len(".dcm")], path)
        images: dict[str, list[str]] = {}
        path = bs.join(self.input_dir, self.rle_csv)
        for row in bs.read_csv(path, required=("ImageId", "EncodedPixels")):
            if isinstance(row, bs.Skipped):
                yield row
                continue
            image_id = row["ImageId"].strip()
            if not image_id or "/" in image_id:
                yield bs.Skipped(bs.MALFORMED_ROW, "ImageId: empty or not a file name")
                continue
            images.setdefault(image_id, []).append(row["EncodedPixels"])
        for image_id, rles in images.items():
            if image_id not in dicoms:
                yield bs.Skipped(bs.MISSING_IMAGE, image_id)
                continue
            yield {
                "_key": image_id,
                "image_id": image_id,
                "rles": rles,
                "image_path": dicoms[image_id],
            }

    def convert(self, row: dict) -> schema.ExampleRecord:
        png, h, w, ds = bs.load_dicom_as_png(row["image_path"])
        mask = np.zeros((h, w), dtype=bool)
        try:
            for rle in row["rles"]:
                mask |= rle_decode(rle, h, w, relative=self.rle_format == "relative") > 0
        except bs.ParseError as e:
            raise bs.SkipError(bs.BAD_RLE, str(e)) from None
        positive = int(mask.any())
        chexpert = [schema.LABEL_MISSING] * schema.NUM_CHEXPERT
        pneumothorax = schema.label_index("Pneumothorax")
        chexpert[pneumothorax] = positive
        subject = str(ds.get("PatientID", "") or "").strip() or row["image_id"]
        return schema.ExampleRecord(
            image=png,
            image_format="png",
            height=h,
            width=w,
            image_id=row["image_id"],
            subject_id=subject,
            view=str(ds.get("ViewPosition", "")).strip().upper(),
            split=row.get("split") or splits.hash_split(subject, self.split_fractions, salt="siim"),
            source=self.name,
            chexpert=chexpert,
            class_label=positive,
            masks=[bs.mask_png(mask)],
            mask_labels=[pneumothorax],
        )
