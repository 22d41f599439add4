"""Your own data -> TFRecords: a CSV of image path, optional report text and optional labels.

Layout:
  <input>/<--csv, default data.csv>   one row per image; columns (names configurable):
      image_path   path of a JPEG / PNG / DICOM (.dcm) file, relative to <input> (or absolute)
      report       optional: report text; with FINDINGS:/IMPRESSION: headers the sections
                   are parsed (place_tf.data.reports.parse_report), plain text is FINDINGS
      split        optional: train / valid / val / validate / test (else a hash split by
                   subject, --split_fractions, default 0.8,0.1,0.1)
      subject_id   optional: keeps a patient's images in one split (default: the image path)
      <CheXpert label names>   optional, any subset: 1 / 0 / -1 / blank (1.0 / 0.0 / -1.0)
      label        optional: an integer class (labels/class), e.g. a binary or multi-class task
A corpus with report text gets `vocab.txt` learned from its train reports, so it can be
pre-trained on (`python -m place_tf.train --corpus_dir=...`); without, it is a label-only
corpus for the image tasks. Rows: a missing image is "missing_image", a row without text
where --require_report is set is "empty_report", bad label cells are "malformed_row".

Command:
  python -m place_tf.data.convert generic --input my_data --csv my_data/data.csv \\
      --output corpora/mine
"""

from __future__ import annotations

from collections.abc import Sequence

from place_tf.data import reports, schema, splits
from place_tf.data.convert import beam_skeleton as bs
from place_tf.data.convert.chexpert import parse_label_value
from place_tf.data.convert.rsna import split_fractions_arg

DEFAULT_CSV = "data.csv"


class GenericConverter(bs.Converter):
    name = "generic"
    splits = ("train", "validate", "test")
    default_shards = 16

    def __init__(
        self,
        input_dir: str,
        csv: str = "",
        image_column: str = "image_path",
        report_column: str = "report",
        split_fractions: Sequence[float] | str = (0.8, 0.1, 0.1),
        require_report: bool = False,
        source_name: str = "generic",
    ):
        super().__init__(input_dir)
        self.csv = csv or bs.join(input_dir, DEFAULT_CSV)
        self.image_column = image_column
        self.report_column = report_column
        self.split_fractions = split_fractions_arg(split_fractions)
        self.require_report = bool(require_report)
        self.name = source_name or "generic"

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--csv", default="", help=f"the CSV (default <input>/{DEFAULT_CSV})")
        parser.add_argument("--image_column", default="image_path")
        parser.add_argument("--report_column", default="report")
        parser.add_argument("--split_fractions", default="0.8,0.1,0.1")
        parser.add_argument(
            "--require_report", action="store_true", help="skip rows without report text"
        )
        parser.add_argument("--source_name", default="generic", help="manifest 'source'")

    @classmethod
    def from_args(cls, args) -> GenericConverter:
        return cls(
            args.input,
            args.csv,
            args.image_column,
            args.report_column,
            args.split_fractions,
            args.require_report,
            args.source_name,
        )

    def check_layout(self) -> None:
        if not bs.exists(self.csv):
            raise bs.LayoutError(f"CSV {self.csv} not found (--csv, default <input>/{DEFAULT_CSV})")
        next(iter(bs.read_csv(self.csv, required=(self.image_column,))), None)

    def source_files(self) -> list[str]:
        return [self.csv]

    def _image_path(self, value: str) -> str:
        v = value.strip()
        if "://" in v or v.startswith("/"):
            return v
        parts = [p for p in v.replace("\\", "/").split("/") if p not in ("", ".")]
        if not parts or ".." in parts:
            raise bs.ParseError(f"{self.image_column}: empty or escapes the input folder")
        return bs.join(self.input_dir, *parts)

    def rows(self):
        for row in bs.read_csv(self.csv, required=(self.image_column,)):
            if isinstance(row, bs.Skipped):
                yield row
                continue
            try:
                path = self._image_path(row[self.image_column])
                chexpert = [
                    parse_label_value(row[c], c) if c in row else schema.LABEL_MISSING
                    for c in schema.CHEXPERT_LABELS
                ]
                cls_cell = str(row.get("label", "")).strip()
                if cls_cell and not cls_cell.lstrip("-").isdigit():
                    raise bs.ParseError(f"label: {cls_cell[:10]!r} is not an integer")
                split = None
                if str(row.get("split", "")).strip():
                    split = bs.SPLIT_ALIASES.get(row["split"].strip().lower())
                    if split is None:
                        raise bs.ParseError(f"split: {row['split'][:20]!r} is unknown")
            except bs.ParseError as e:
                yield bs.Skipped(bs.MALFORMED_ROW, str(e))
                continue
            key = row[self.image_column].strip()
            subject = str(row.get("subject_id", "")).strip() or key
            yield {
                "_key": key,
                "image_path": path,
                "report": row.get(self.report_column, ""),
                "subject_id": subject,
                "study_id": str(row.get("study_id", "")).strip(),
                "chexpert": chexpert,
                "class_label": int(cls_cell) if cls_cell else -1,
                "split": split or splits.hash_split(subject, self.split_fractions, salt="generic"),
            }

    def split_file_key(self, value: str) -> str:
        return str(value).strip()

    def convert(self, row: dict) -> schema.ExampleRecord | bs.Skipped:
        text = str(row["report"] or "")
        findings, impression = reports.parse_report(text) if text.strip() else ("", "")
        if text.strip() and not findings and not impression:
            findings = reports.normalize_section(text)  # plain text, no section headers
        if self.require_report and not (findings or impression):
            return bs.Skipped(bs.EMPTY_REPORT, row["_key"])
        return bs.image_record(
            row["image_path"],
            image_id=row["_key"],
            study_id=row["study_id"],
            subject_id=row["subject_id"],
            split=row["split"],
            source=self.name,
            findings=findings,
            impression=impression,
            chexpert=row["chexpert"],
            class_label=row["class_label"],
        )
