"""COVIDx CXR (CXR-2/3/4 style) -> TFRecords for COVID-19 classification.

Layout (Kaggle / COVID-Net download):
  <input>/train.txt  <input>/test.txt  [<input>/val.txt]
      one image per line: "patient_id filename class source"
  <input>/train/<filename>  <input>/test/<filename>  [<input>/val/<filename>]

Class mapping (`labels/class`): --classes lists class names in index order, default
"negative,positive,pneumonia" -> negative 0, positive 1, pneumonia 2. Names are matched
case-insensitively with aliases: "normal" = negative, "covid-19"/"covid" = positive. So
CXR-3/4 files (negative/positive) use 0/1, and CXR-2 files (normal/pneumonia/COVID-19) use
0/2/1; pass --classes normal,pneumonia,covid-19 for the COVID-Net order 0/1/2, or
--classes negative,positive to make a binary corpus (other classes are skipped as
"class_not_selected"). An unknown class word is a "malformed_row". `labels/chexpert` stays
LABEL_MISSING (COVIDx "negative" mixes normal and non-COVID disease).

Splits: train.txt -> train (minus a patient-hash --validate_fraction, default 0.1, into
"validate", unless val.txt exists, which then is "validate"), test.txt -> test. Patient
ids may contain spaces: the last three fields are taken from the right. Images are stored
as shipped (PNG or JPEG, whatever the file is). A repeated filename is skipped as
"duplicate_row".

Command:
  python -m place_tf.data.convert covidx --input COVIDx --output corpora/covidx
"""

from __future__ import annotations

from collections.abc import Sequence

from place_tf.data import schema, splits
from place_tf.data.convert import beam_skeleton as bs

CANONICAL = {
    "negative": "negative",
    "normal": "negative",
    "positive": "positive",
    "covid-19": "positive",
    "covid19": "positive",
    "covid": "positive",
    "pneumonia": "pneumonia",
}
DEFAULT_CLASSES = ("negative", "positive", "pneumonia")
LIST_FILES = (
    ("train.txt", "train", "train"),
    ("val.txt", "val", "validate"),
    ("test.txt", "test", "test"),
)


def parse_covidx_line(line: str) -> tuple[str, str, str, str]:
    """'patient_id filename class source' -> the four fields; ParseError if malformed."""
    if not isinstance(line, str):
        raise bs.ParseError(f"expected text, got {type(line).__name__}")
    tokens = line.split()
    if len(tokens) < 4:
        raise bs.ParseError(f"{len(tokens)} fields, expected 'patient_id filename class source'")
    patient, filename, cls, source = " ".join(tokens[:-3]), tokens[-3], tokens[-2], tokens[-1]
    if "/" in filename or "\\" in filename or filename.startswith("."):
        raise bs.ParseError("filename: not a plain file name")
    return patient, filename, cls, source


def canonical_class(name: str) -> str:
    """Alias -> canonical class name; ParseError for an unknown word."""
    c = CANONICAL.get(str(name).strip().lower())
    if c is None:
        raise bs.ParseError(f"class {str(name)[:20]!r} is not one of {sorted(CANONICAL)}")
    return c


def class_index(name: str, classes: Sequence[str] = DEFAULT_CLASSES) -> int:
    """Index of a class word under --classes, -1 when the class is not selected."""
    order = [canonical_class(c) for c in classes]
    c = canonical_class(name)
    return order.index(c) if c in order else -1


class CovidxConverter(bs.Converter):
    name = "covidx"
    splits = ("train", "validate", "test")
    default_shards = 32

    def __init__(
        self,
        input_dir: str,
        classes: Sequence[str] | str = DEFAULT_CLASSES,
        validate_fraction: float = 0.1,
    ):
        super().__init__(input_dir)
        if isinstance(classes, str):
            classes = [c for c in classes.split(",") if c.strip()]
        self.classes = tuple(c.strip() for c in classes)
        canon = [canonical_class(c) for c in self.classes]
        if len(set(canon)) != len(canon) or not canon:
            raise ValueError(f"--classes {self.classes}: empty or names the same class twice")
        if not 0.0 <= validate_fraction < 1.0:
            raise ValueError(f"--validate_fraction must be in [0, 1), got {validate_fraction}")
        self.validate_fraction = float(validate_fraction)

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--classes", default=",".join(DEFAULT_CLASSES))
        parser.add_argument("--validate_fraction", type=float, default=0.1)

    @classmethod
    def from_args(cls, args) -> CovidxConverter:
        return cls(args.input, args.classes, args.validate_fraction)

    def check_layout(self) -> None:
        hint = "pass the COVIDx folder holding train.txt, test.txt, train/ and test/"
        for txt, folder, _ in LIST_FILES:
            if txt == "val.txt" and not bs.exists(bs.join(self.input_dir, txt)):
                continue
            bs.require_file(self.input_dir, txt, hint)
            bs.require_dir(self.input_dir, folder, hint)

    def _lists(self) -> list[tuple[str, str, str]]:
        return [
            (bs.join(self.input_dir, txt), folder, split)
            for txt, folder, split in LIST_FILES
            if bs.exists(bs.join(self.input_dir, txt))
        ]

    def source_files(self) -> list[str]:
        return [p for p, _, _ in self._lists()]

    def rows(self):
        lists = self._lists()
        has_val = any(split == "validate" for _, _, split in lists)
        fractions = (1.0 - self.validate_fraction, self.validate_fraction, 0.0)
        seen: set[tuple[str, str]] = set()
        for path, folder, split in lists:
            try:
                text = bs.read_text(path)
            except bs.ParseError:
                raise bs.LayoutError(f"{path}: not a UTF-8 text file") from None
            for line in text.splitlines():
                if not line.strip():
                    continue
                try:
                    patient, filename, cls, _ = parse_covidx_line(line)
                    index = class_index(cls, self.classes)
                except bs.ParseError as e:
                    yield bs.Skipped(bs.MALFORMED_ROW, str(e))
                    continue
                if index < 0:
                    yield bs.Skipped(bs.CLASS_NOT_SELECTED)
                    continue
                if (folder, filename) in seen:
                    yield bs.Skipped(bs.DUPLICATE_ROW, filename)
                    continue
                seen.add((folder, filename))
                out_split = split
                if split == "train" and not has_val and self.validate_fraction > 0:
                    out_split = splits.hash_split(patient, fractions, salt="covidx")
                yield {
                    "_key": filename,
                    "patient_id": patient,
                    "filename": filename,
                    "class_label": index,
                    "split": out_split,
                    "image_path": bs.join(self.input_dir, folder, filename),
                }

    def convert(self, row: dict) -> schema.ExampleRecord:
        return bs.image_record(
            row["image_path"],
            image_id=row["filename"],
            subject_id=row["patient_id"],
            split=row["split"],
            source=self.name,
            class_label=row["class_label"],
        )
