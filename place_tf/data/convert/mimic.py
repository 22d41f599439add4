"""MIMIC-CXR-JPG 2.0.0 (+ MIMIC-CXR free-text reports) -> TFRecords: the pre-training corpus.

Layout (PhysioNet downloads):
  <input>/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id,subject_id,study_id,...,ViewPosition,...
  <input>/mimic-cxr-2.0.0-split.csv.gz      dicom_id,study_id,subject_id,split
  <input>/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id,study_id,<14 labels>
  <input>/files/p10/p10000032/s50414267/<dicom_id>.jpg
  <reports_dir>/files/p10/p10000032/s50414267.txt   (mimic-cxr-reports.zip unzipped;
                                                     --reports_dir, default --input)

One example per image (dicom_id). Defaults follow the PLACE / MGCA setting:
- frontal images only: ViewPosition in --views (default PA,AP; "all" keeps every view);
  other views are counted as skipped "view_not_selected";
- the official split: train / validate / test kept apart (images missing from the split
  file: "missing_split");
- the report's FINDINGS and IMPRESSION (place_tf.data.reports.parse_report); studies with
  neither are skipped "empty_report", unreadable reports "missing_report" /
  "non_utf8_report";
- CheXpert labels of the study (blank -> LABEL_MISSING; a study without a label row gets all
  LABEL_MISSING), uncertain handled by --uncertain_policy (default keep: -1).

Commands:
  python -m place_tf.data.convert mimic --input physionet.org/files/mimic-cxr-jpg/2.0.0 \\
      --reports_dir mimic-cxr-reports --output corpora/mimic --shards 512
  # Dataflow (input and output on GCS, which the workers share):
  python -m place_tf.data.convert mimic --input gs://B/mimic-cxr-jpg/2.0.0 \\
      --reports_dir gs://B/mimic-cxr-reports --output gs://B/corpora/mimic --shards 512 \\
      --runner DataflowRunner --project P --region R --temp_location gs://B/tmp \\
      --sdk_container_image IMAGE
  # Flink / Spark: --runner FlinkRunner --flink_master HOST:8081 (or SparkRunner ...)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from place_tf.data import reports, schema
from place_tf.data.convert import beam_skeleton as bs
from place_tf.data.convert.chexpert import UNCERTAIN_POLICIES, parse_labels, parse_views

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv.gz"
DEFAULT_VIEWS = ("PA", "AP")
_SPLITS = {"train": "train", "validate": "validate", "test": "test"}


def _digits(value: str, field: str) -> str:
    v = str(value).strip()
    if v.endswith(".0"):  # pandas round trips sometimes write ids as floats
        v = v[:-2]
    if not v.isdigit() or not v.isascii():
        raise bs.ParseError(f"{field}: {value[:20]!r} is not a numeric id")
    return v


def parse_metadata_row(row: Mapping[str, str]) -> dict:
    """metadata.csv row -> {dicom_id, subject_id, study_id, view}; ParseError if malformed."""
    dicom_id = str(row.get("dicom_id", "")).strip()
    if not dicom_id or "/" in dicom_id or "\\" in dicom_id or dicom_id.startswith("."):
        raise bs.ParseError("dicom_id: empty or not a file name")
    return {
        "dicom_id": dicom_id,
        "subject_id": _digits(row.get("subject_id", ""), "subject_id"),
        "study_id": _digits(row.get("study_id", ""), "study_id"),
        "view": str(row.get("ViewPosition", "")).strip().upper(),
    }


def image_rel_path(subject_id: str, study_id: str, dicom_id: str) -> str:
    """files/p10/p10000032/s50414267/<dicom_id>.jpg"""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def report_rel_path(subject_id: str, study_id: str) -> str:
    """files/p10/p10000032/s50414267.txt"""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt"


class MimicConverter(bs.Converter):
    name = "mimic-cxr"
    splits = ("train", "validate", "test")
    default_shards = 512

    def __init__(
        self,
        input_dir: str,
        reports_dir: str = "",
        views: Sequence[str] | str = DEFAULT_VIEWS,
        uncertain_policy: str = "keep",
    ):
        super().__init__(input_dir)
        if uncertain_policy not in UNCERTAIN_POLICIES:
            raise ValueError(
                f"--uncertain_policy must be one of {UNCERTAIN_POLICIES}, got {uncertain_policy!r}"
            )
        self.reports_dir = reports_dir or input_dir
        self.views = parse_views(views)
        self.uncertain_policy = uncertain_policy

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument(
            "--reports_dir", default="", help="folder holding files/pXX/.../sXXX.txt"
        )
        parser.add_argument(
            "--views", default=",".join(DEFAULT_VIEWS), help="ViewPosition values kept, or 'all'"
        )
        parser.add_argument("--uncertain_policy", default="keep", choices=UNCERTAIN_POLICIES)

    @classmethod
    def from_args(cls, args) -> MimicConverter:
        return cls(args.input, args.reports_dir, args.views, args.uncertain_policy)

    def split_file_key(self, value: str) -> str:
        """'files/p10/p10000032/s50414267/<dicom_id>.jpg' or '<dicom_id>' -> dicom_id."""
        name = super().split_file_key(value)
        return name[: -len(".jpg")] if name.endswith(".jpg") else name

    def check_layout(self) -> None:
        hint = "pass the MIMIC-CXR-JPG 2.0.0 folder (physionet.org/files/mimic-cxr-jpg/2.0.0)"
        for name in (METADATA_CSV, SPLIT_CSV, CHEXPERT_CSV):
            bs.require_file(self.input_dir, name, hint)
        bs.require_dir(self.input_dir, "files", hint)
        bs.require_dir(
            self.reports_dir,
            "files",
            "unzip mimic-cxr-reports.zip into --input or pass its folder as --reports_dir",
        )

    def source_files(self) -> list[str]:
        return [bs.join(self.input_dir, n) for n in (METADATA_CSV, SPLIT_CSV, CHEXPERT_CSV)]

    def _labels(self) -> dict[str, list[int] | None]:
        """study_id -> labels (None: that study's label row is malformed)."""
        out: dict[str, list[int] | None] = {}
        path = bs.join(self.input_dir, CHEXPERT_CSV)
        for row in bs.read_csv(path, required=("subject_id", "study_id", *schema.CHEXPERT_LABELS)):
            if isinstance(row, bs.Skipped):
                continue  # cannot tell which study; its images get all-missing labels
            try:
                study = _digits(row["study_id"], "study_id")
            except bs.ParseError:
                continue
            try:
                out[study] = parse_labels(row, self.uncertain_policy)
            except bs.ParseError:
                out[study] = None
        return out

    def _splits(self) -> dict[str, str | None]:
        """dicom_id -> split (None: the split cell is not train/validate/test)."""
        out: dict[str, str | None] = {}
        path = bs.join(self.input_dir, SPLIT_CSV)
        for row in bs.read_csv(path, required=("dicom_id", "split")):
            if isinstance(row, bs.Skipped):
                continue
            out[row["dicom_id"].strip()] = _SPLITS.get(row["split"].strip().lower())
        return out

    def rows(self):
        labels = self._labels()
        splits = self._splits()
        missing = [schema.LABEL_MISSING] * schema.NUM_CHEXPERT
        path = bs.join(self.input_dir, METADATA_CSV)
        for row in bs.read_csv(
            path, required=("dicom_id", "subject_id", "study_id", "ViewPosition")
        ):
            if isinstance(row, bs.Skipped):
                yield row
                continue
            try:
                meta = parse_metadata_row(row)
            except bs.ParseError as e:
                yield bs.Skipped(bs.MALFORMED_ROW, str(e))
                continue
            if self.views and meta["view"] not in self.views:
                yield bs.Skipped(bs.VIEW_NOT_SELECTED)
                continue
            if meta["dicom_id"] not in splits:
                yield bs.Skipped(bs.MISSING_SPLIT, meta["dicom_id"])
                continue
            split = splits[meta["dicom_id"]]
            study_labels = labels.get(meta["study_id"], missing)
            if split is None or study_labels is None:
                yield bs.Skipped(bs.MALFORMED_ROW, f"{meta['dicom_id']}: split or labels")
                continue
            sub, study = meta["subject_id"], meta["study_id"]
            yield {
                **meta,
                "_key": meta["dicom_id"],
                "split": split,
                "chexpert": list(study_labels),
                "image_path": bs.join(
                    self.input_dir, *image_rel_path(sub, study, meta["dicom_id"]).split("/")
                ),
                "report_path": bs.join(self.reports_dir, *report_rel_path(sub, study).split("/")),
            }

    def convert(self, row: dict) -> schema.ExampleRecord | bs.Skipped:
        text = bs.read_report(row["report_path"])
        findings, impression = reports.parse_report(text)
        if not findings and not impression:
            return bs.Skipped(bs.EMPTY_REPORT, row["_key"])
        return bs.image_record(
            row["image_path"],
            image_id=row["dicom_id"],
            study_id=row["study_id"],
            subject_id=row["subject_id"],
            view=row["view"],
            split=row["split"],
            source=self.name,
            findings=findings,
            impression=impression,
            chexpert=row["chexpert"],
        )
