"""R2Gen-format report generation sets (IU X-Ray, MIMIC-CXR) -> TFRecords with reports.

Layout (the `iu_xray/` and `mimic_cxr/` folders R2Gen, R2GenCMN and their successors
distribute):
  <input>/annotation.json   {"train": [entry, ...], "val": [...], "test": [...]}
      entry: {"id": str, "report": str, "image_path": [relative paths], "split": str,
              optional "study_id", "subject_id" (MIMIC-CXR)}
  <input>/images/<image_path>   e.g. iu_xray/images/CXR2384_IM-0942/0.png,
                                mimic_cxr/images/p10/p10000032/s50414267/<dicom_id>.jpg

The top-level key gives the split (train / val -> validate / test), so `evaluate
report_generation` runs on the standard splits. The report (R2Gen's cleaned FINDINGS text)
is stored as FINDINGS. One example per study from its first image (--images first,
default: R2Gen's MIMIC-CXR loader reads image_path[0]; IU X-Ray lists the frontal view
first) or one per listed image (--images all). The vocabulary is learned from the train
reports, as for every corpus with reports. An entry without a list of image paths is a
"malformed_row", an empty report "empty_report", a missing file "missing_image".

Command:
  python -m place_tf.data.convert r2gen --input data/iu_xray --output corpora/iu_xray
"""

from __future__ import annotations

import json

from place_tf.data import reports, schema
from place_tf.data.convert import beam_skeleton as bs

ANNOTATION = "annotation.json"
IMAGES_DIR = "images"
SPLIT_KEYS = (("train", "train"), ("val", "validate"), ("test", "test"))


class R2GenConverter(bs.Converter):
    name = "r2gen"
    splits = ("train", "validate", "test")
    default_shards = 16

    def __init__(self, input_dir: str, images: str = "first", source_name: str = "r2gen"):
        super().__init__(input_dir)
        if images not in ("first", "all"):
            raise ValueError(f"--images must be first or all, got {images!r}")
        self.images = images
        self.name = source_name or "r2gen"

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--images", default="first", choices=("first", "all"))
        parser.add_argument("--source_name", default="r2gen", help="e.g. iu_xray, mimic_cxr")

    @classmethod
    def from_args(cls, args) -> R2GenConverter:
        return cls(args.input, args.images, args.source_name)

    def check_layout(self) -> None:
        hint = "pass R2Gen's iu_xray/ or mimic_cxr/ folder (annotation.json + images/)"
        bs.require_file(self.input_dir, ANNOTATION, hint)
        bs.require_dir(self.input_dir, IMAGES_DIR, hint)

    def source_files(self) -> list[str]:
        return [bs.join(self.input_dir, ANNOTATION)]

    def _annotation(self) -> dict:
        path = bs.join(self.input_dir, ANNOTATION)
        try:
            data = json.loads(bs.read_text(path))
        except (json.JSONDecodeError, bs.ParseError) as e:
            raise bs.LayoutError(f"{path}: not a JSON annotation file ({e})") from None
        if not isinstance(data, dict) or not any(k in data for k, _ in SPLIT_KEYS):
            raise bs.LayoutError(f"{path}: expected an object with 'train', 'val', 'test' lists")
        return data

    def rows(self):
        data = self._annotation()
        for key, split in SPLIT_KEYS:
            for entry in data.get(key, []) or []:
                paths = entry.get("image_path") if isinstance(entry, dict) else None
                if (
                    not isinstance(paths, list)
                    or not paths
                    or not all(isinstance(p, str) and p for p in paths)
                ):
                    yield bs.Skipped(bs.MALFORMED_ROW, "entry without image_path list")
                    continue
                study = str(entry.get("study_id", "") or entry.get("id", ""))
                subject = str(entry.get("subject_id", "") or study)
                for rel in paths if self.images == "all" else paths[:1]:
                    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
                    if ".." in parts or not parts:
                        yield bs.Skipped(bs.MALFORMED_ROW, "image_path escapes images/")
                        continue
                    yield {
                        "_key": "/".join(parts),
                        "image_path": bs.join(self.input_dir, IMAGES_DIR, *parts),
                        "report": str(entry.get("report", "") or ""),
                        "study_id": study,
                        "subject_id": subject,
                        "split": split,
                    }

    def split_file_key(self, value: str) -> str:
        return str(value).strip()

    def convert(self, row: dict) -> schema.ExampleRecord | bs.Skipped:
        findings = reports.normalize_section(row["report"])
        if not findings:
            return bs.Skipped(bs.EMPTY_REPORT, row["_key"])
        return bs.image_record(
            row["image_path"],
            image_id=row["_key"],
            study_id=row["study_id"],
            subject_id=row["subject_id"],
            split=row["split"],
            source=self.name,
            findings=findings,
        )
