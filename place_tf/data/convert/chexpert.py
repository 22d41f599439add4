"""CheXpert v1.0 / CheXpert-v1.0-small -> TFRecords, and the CheXpert 5x200 subset.

Layout (Stanford download, either size; the folder may be renamed):
  <input>/train.csv  <input>/valid.csv      Path,Sex,Age,Frontal/Lateral,AP/PA,<14 labels>
  <input>/train/patient00001/study1/view1_frontal.jpg
  <input>/valid/...
  <input>/test.csv + <input>/test/          optional (the later-released test labels)
`Path` starts with the download's folder name ("CheXpert-v1.0-small/train/..."); that first
component is dropped, so both sizes give the same image ids ("train/patient00001/...").

Splits (MGCA's protocol, which the PLACE tables follow; HKU-MedAI/MGCA
mgca/preprocess/chexpert.py and mgca/constants.py):
- without test.csv (CheXpert-v1.0-small, and v1.0 before the test labels were released):
  valid.csv -> "test" (the 234 expert-labelled images), and --validate_holdout (default
  CHEXPERT_VALID_NUM = 5000) train.csv rows -> "validate", drawn as MGCA does:
  numpy RandomState(--seed, default 0).choice(rows, n, replace=False) over the train.csv
  rows in file order after --exclude (MGCA removes its 5x200 images first); the hold-out
  is drawn before the view filter, as in MGCA, so fewer frontal images end up there.
  (MGCA then does `df.drop(valid_ids)` with positions as index labels, which lets some
  rows sit in both splits; we keep the two disjoint.)
- with test.csv: the official split, train.csv -> "train", valid.csv -> "validate",
  test.csv -> "test".
--splits_from replaces either with a peer's split file.
Labels: 1.0 / 0.0 / -1.0 / blank -> 1 / 0 / uncertain / LABEL_MISSING, with
--uncertain_policy: keep (store -1, the schema's "uncertain"; default, so no information
is lost at conversion), ones (U-Ones), zeros (U-Zeros), ignore (-> LABEL_MISSING).
Views: frontal images whose AP/PA is in --views (default PA,AP); "all" keeps laterals too
(view "LATERAL").

CheXpert 5x200 (zero-shot classification / retrieval, as in GLoRIA and MGCA): 200 frontal
training images per competition label (Atelectasis, Cardiomegaly, Consolidation, Edema,
Pleural Effusion) that are positive (1.0) for that label and 0.0 or blank for every other
label except "No Finding" (MGCA's rule in mgca/preprocess/chexpert.py: blanks filled with
0, the 13 other columns compared with a one-hot; uncertain excludes), sampled with a
fixed seed. `build_chexpert_5x200` writes
`chexpert_5x200.csv` (Path, label, the five raw label cells) and a corpus whose only split
is "test"; `labels/class` is the index of the label in schema.COMPETITION_LABELS. Pass that
CSV to the plain converter as --exclude to keep those images out of a fine-tuning train set.

Commands:
  python -m place_tf.data.convert chexpert --input CheXpert-v1.0-small --output corpora/chexpert
  python -m place_tf.data.convert chexpert_5x200 --input CheXpert-v1.0-small \\
      --output corpora/chexpert_5x200 --seed 0
  # any Beam runner, e.g. Dataflow (input and output on storage the workers share):
  python -m place_tf.data.convert chexpert --input gs://bucket/CheXpert-v1.0 \\
      --output gs://bucket/corpora/chexpert --runner DataflowRunner --project P --region R \\
      --temp_location gs://bucket/tmp --sdk_container_image IMAGE
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Mapping, Sequence

import numpy as np

from place_tf.data import schema
from place_tf.data.convert import beam_skeleton as bs

UNCERTAIN_POLICIES = ("keep", "ones", "zeros", "ignore")
DEFAULT_VIEWS = ("PA", "AP")
CSV_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + schema.CHEXPERT_LABELS
SPLIT_CSVS = (("train.csv", "train"), ("valid.csv", "validate"), ("test.csv", "test"))
# Without test.csv (MGCA): valid.csv is the test set, the hold-out of train.csv validates.
HELD_OUT_CSVS = (("train.csv", "train"), ("valid.csv", "test"))
VALIDATE_HOLDOUT = 5000  # MGCA's CHEXPERT_VALID_NUM
FIVE_X_200_CSV = "chexpert_5x200.csv"

_VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1, "": schema.LABEL_MISSING}


def parse_label_value(value: str, column: str = "") -> int:
    """One CheXpert-labeler cell -> 1 / 0 / -1 / LABEL_MISSING; ParseError otherwise."""
    if not isinstance(value, str):
        raise bs.ParseError(f"column {column!r}: expected text, got {type(value).__name__}")
    v = _VALUES.get(value.strip())
    if v is None:
        raise bs.ParseError(f"column {column!r}: label value {value[:20]!r} is not 1/0/-1/blank")
    return v


def apply_uncertain_policy(labels: Sequence[int], policy: str) -> list[int]:
    """Map uncertain (-1) labels: keep -> -1, ones -> 1, zeros -> 0, ignore -> LABEL_MISSING."""
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain_policy must be one of {UNCERTAIN_POLICIES}, got {policy!r}")
    repl = {"keep": -1, "ones": 1, "zeros": 0, "ignore": schema.LABEL_MISSING}[policy]
    return [repl if v == -1 else int(v) for v in labels]


def parse_labels(row: Mapping[str, str], policy: str = "keep") -> list[int]:
    """The 14 label cells of a CSV row (any column order) in CHEXPERT_LABELS order."""
    vals = []
    for name in schema.CHEXPERT_LABELS:
        if name not in row:
            raise bs.ParseError(f"missing label column {name!r}")
        vals.append(parse_label_value(row[name], name))
    return apply_uncertain_policy(vals, policy)


def relative_image_path(path: str) -> str:
    """'CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg' -> 'train/patient1/...'.

    ParseError for paths that do not end in <split>/patient*/study*/<file> or that escape
    the dataset folder.
    """
    if not isinstance(path, str):
        raise bs.ParseError(f"Path: expected text, got {type(path).__name__}")
    parts = [p for p in path.strip().replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts or path.strip().startswith("/"):
        raise bs.ParseError("Path: absolute or '..' paths are not allowed")
    if len(parts) < 4 or not parts[-3].startswith("patient") or not parts[-2].startswith("study"):
        raise bs.ParseError("Path: expected <split>/patient*/study*/<image>")
    if len(parts) > 5:
        raise bs.ParseError("Path: too many folders")
    return "/".join(parts[-4:])


def parse_chexpert_row(row: Mapping[str, str], policy: str = "keep") -> dict:
    """A train/valid.csv row -> {rel_path, subject_id, study_id, frontal, view, chexpert}.

    Raises ParseError (naming the field) for anything malformed; never anything else for
    a mapping of str to str.
    """
    rel = relative_image_path(row.get("Path", ""))
    fl = str(row.get("Frontal/Lateral", "")).strip()
    if fl not in ("Frontal", "Lateral"):
        raise bs.ParseError(f"Frontal/Lateral: {fl[:20]!r} is not Frontal or Lateral")
    frontal = fl == "Frontal"
    appa = str(row.get("AP/PA", "")).strip().upper()
    _, patient, study, _ = rel.split("/")
    return {
        "rel_path": rel,
        "subject_id": patient,
        "study_id": f"{patient}/{study}",
        "frontal": frontal,
        "view": appa if frontal else "LATERAL",
        "chexpert": parse_labels(row, policy),
    }


def _rel_or_none(path: str) -> str | None:
    try:
        return relative_image_path(path)
    except bs.ParseError:
        return None


def parse_views(views) -> tuple[str, ...]:
    if isinstance(views, str):
        views = [v for v in views.split(",") if v.strip()]
    views = tuple(v.strip().upper() for v in views)
    return () if views in ((), ("ALL",)) else views


class ChexpertConverter(bs.Converter):
    name = "chexpert"
    splits = ("train", "validate", "test")
    default_shards = 64

    def __init__(
        self,
        input_dir: str,
        uncertain_policy: str = "keep",
        views: Sequence[str] | str = DEFAULT_VIEWS,
        exclude: str = "",
        validate_holdout: int = VALIDATE_HOLDOUT,
        seed: int = 0,
    ):
        super().__init__(input_dir)
        if uncertain_policy not in UNCERTAIN_POLICIES:
            raise ValueError(
                f"--uncertain_policy must be one of {UNCERTAIN_POLICIES}, got {uncertain_policy!r}"
            )
        if validate_holdout < 0:
            raise ValueError(f"--validate_holdout must be >= 0, got {validate_holdout}")
        self.uncertain_policy = uncertain_policy
        self.views = parse_views(views)
        self.exclude = exclude
        self.validate_holdout = int(validate_holdout)
        self.seed = int(seed)
        self._excluded: frozenset[str] = frozenset()

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--uncertain_policy", default="keep", choices=UNCERTAIN_POLICIES)
        parser.add_argument(
            "--views", default=",".join(DEFAULT_VIEWS), help="AP/PA values kept, or 'all'"
        )
        parser.add_argument(
            "--exclude", default="", help="CSV with a Path column (e.g. chexpert_5x200.csv)"
        )
        parser.add_argument(
            "--validate_holdout",
            type=int,
            default=VALIDATE_HOLDOUT,
            help="without test.csv: train.csv rows held out as 'validate' (valid.csv -> test)",
        )
        parser.add_argument("--seed", type=int, default=0, help="seed of the hold-out")

    @classmethod
    def from_args(cls, args) -> ChexpertConverter:
        return cls(
            args.input,
            args.uncertain_policy,
            args.views,
            args.exclude,
            args.validate_holdout,
            args.seed,
        )

    def split_file_key(self, value: str) -> str:
        """A peer's "Path" cell ('CheXpert-v1.0-small/train/...') -> 'train/patient.../...'."""
        try:
            return relative_image_path(value)
        except bs.ParseError:
            return str(value).strip()

    @property
    def protocol(self) -> str:
        """'official' (test.csv present) or 'mgca' (valid.csv -> test, train hold-out)."""
        return "official" if bs.exists(bs.join(self.input_dir, "test.csv")) else "mgca"

    def options(self) -> dict:
        return {**super().options(), "protocol": self.protocol}

    def check_layout(self) -> None:
        hint = "pass the unzipped CheXpert-v1.0(-small) folder as --input"
        for name, _ in SPLIT_CSVS[:2]:
            bs.require_file(self.input_dir, name, hint)
        bs.require_dir(self.input_dir, "train", hint)
        bs.require_dir(self.input_dir, "valid", hint)
        if bs.exists(bs.join(self.input_dir, "test.csv")):
            bs.require_dir(self.input_dir, "test", "test.csv is present")
        if self.exclude and not bs.exists(self.exclude):
            raise bs.LayoutError(f"--exclude file {self.exclude} not found")

    def _csvs(self) -> list[tuple[str, str]]:
        table = SPLIT_CSVS if self.protocol == "official" else HELD_OUT_CSVS
        return [
            (bs.join(self.input_dir, name), split)
            for name, split in table
            if bs.exists(bs.join(self.input_dir, name))
        ]

    def _held_out(self, rows: list) -> set[int]:
        """Positions in `rows` (train.csv) held out as "validate" (module docstring)."""
        if self.protocol == "official" or not self.validate_holdout:
            return set()
        cands = [
            i
            for i, r in enumerate(rows)
            if isinstance(r, dict) and _rel_or_none(r.get("Path", "")) not in self._excluded
        ]
        if self.validate_holdout > len(cands):
            raise bs.LayoutError(
                f"{bs.join(self.input_dir, 'train.csv')}: --validate_holdout "
                f"{self.validate_holdout} exceeds its {len(cands)} usable rows"
            )
        rng = np.random.RandomState(self.seed)
        return {cands[int(j)] for j in rng.choice(len(cands), self.validate_holdout, replace=False)}

    def source_files(self) -> list[str]:
        return [p for p, _ in self._csvs()]

    def prepare(self, output_dir: str) -> None:
        if self.exclude:
            rows = bs.read_csv(self.exclude, required=("Path",))
            self._excluded = frozenset(
                relative_image_path(r["Path"]) for r in rows if not isinstance(r, bs.Skipped)
            )

    def row_from_csv(self, row: Mapping[str, str], split: str) -> dict | bs.Skipped:
        try:
            parsed = parse_chexpert_row(row, self.uncertain_policy)
        except bs.ParseError as e:
            return bs.Skipped(bs.MALFORMED_ROW, str(e))
        if self.views and (not parsed["frontal"] or parsed["view"] not in self.views):
            return bs.Skipped(bs.VIEW_NOT_SELECTED)
        if parsed["rel_path"] in self._excluded:
            return bs.Skipped(bs.EXCLUDED)
        parsed["split"] = split
        parsed["_key"] = parsed["rel_path"]
        parsed["image_path"] = bs.join(self.input_dir, *parsed["rel_path"].split("/"))
        return parsed

    def rows(self):
        for path, split in self._csvs():
            rows = list(bs.read_csv(path, required=CSV_COLUMNS))
            held = self._held_out(rows) if split == "train" else set()
            for i, row in enumerate(rows):
                if isinstance(row, bs.Skipped):
                    yield row
                else:
                    yield self.row_from_csv(row, "validate" if i in held else split)

    def convert(self, row: dict) -> schema.ExampleRecord:
        return bs.image_record(
            row["image_path"],
            image_id=row["rel_path"],
            study_id=row["study_id"],
            subject_id=row["subject_id"],
            view=row["view"],
            split=row["split"],
            source=self.name,
            chexpert=row["chexpert"],
            class_label=row.get("class_label", -1),
        )


def select_5x200(
    rows: Sequence[Mapping[str, str]],
    per_class: int = 200,
    seed: int = 0,
    views: Sequence[str] = DEFAULT_VIEWS,
) -> list[tuple[Mapping[str, str], str]]:
    """(row, label) pairs: `per_class` rows per competition label, positive for only it.

    Candidates are sorted by path before the seeded sample, so the result depends only on
    the CSV content and the seed. Raises ValueError naming a label with too few candidates.
    """
    views = parse_views(views)
    cands: dict[str, list[Mapping[str, str]]] = {c: [] for c in schema.COMPETITION_LABELS}
    for row in rows:
        try:
            parsed = parse_chexpert_row(row, "keep")
        except bs.ParseError:
            continue
        if not parsed["frontal"] or (views and parsed["view"] not in views):
            continue
        comp = [parsed["chexpert"][schema.label_index(c)] for c in schema.COMPETITION_LABELS]
        rest = [
            v
            for name, v in zip(schema.CHEXPERT_LABELS, parsed["chexpert"], strict=True)
            if name not in schema.COMPETITION_LABELS and name != "No Finding"
        ]
        if sum(v == 1 for v in comp) != 1 or any(v == -1 for v in comp):
            continue
        if any(v not in (0, schema.LABEL_MISSING) for v in rest):  # MGCA: the rest 0/blank
            continue
        cands[schema.COMPETITION_LABELS[comp.index(1)]].append(row)
    rng = random.Random(seed)
    out = []
    for label in schema.COMPETITION_LABELS:
        pool = sorted(cands[label], key=lambda r: relative_image_path(r["Path"]))
        if len(pool) < per_class:
            raise ValueError(
                f"CheXpert 5x{per_class}: only {len(pool)} images are positive for "
                f"{label!r} alone (need {per_class})"
            )
        out.extend((r, label) for r in rng.sample(pool, per_class))
    return out


class Chexpert5x200Converter(ChexpertConverter):
    """The 5x200 subset as its own corpus (split "test") plus the CSV split file."""

    name = "chexpert-5x200"
    splits = ("test",)
    default_shards = 1

    def __init__(
        self,
        input_dir: str,
        per_class: int = 200,
        seed: int = 0,
        source_csv: str = "train.csv",
        uncertain_policy: str = "keep",
        views: Sequence[str] | str = DEFAULT_VIEWS,
    ):
        super().__init__(input_dir, uncertain_policy, views, validate_holdout=0)
        self.per_class = int(per_class)
        self.seed = int(seed)
        self.source_csv = source_csv
        self._selected: list[tuple[dict, str]] = []

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--uncertain_policy", default="keep", choices=UNCERTAIN_POLICIES)
        parser.add_argument("--views", default=",".join(DEFAULT_VIEWS))
        parser.add_argument("--per_class", type=int, default=200)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--source_csv", default="train.csv")

    @classmethod
    def from_args(cls, args) -> Chexpert5x200Converter:
        return cls(
            args.input,
            args.per_class,
            args.seed,
            args.source_csv,
            args.uncertain_policy,
            args.views,
        )

    def check_layout(self) -> None:
        bs.require_file(self.input_dir, self.source_csv, "the 5x200 subset is drawn from it")
        split_dir = {"train.csv": "train", "valid.csv": "valid"}.get(self.source_csv, "")
        if split_dir:
            bs.require_dir(self.input_dir, split_dir)

    def source_files(self) -> list[str]:
        return [bs.join(self.input_dir, self.source_csv)]

    def prepare(self, output_dir: str) -> None:
        path = bs.join(self.input_dir, self.source_csv)
        rows = [r for r in bs.read_csv(path, required=CSV_COLUMNS) if isinstance(r, dict)]
        chosen = select_5x200(rows, self.per_class, self.seed, self.views)
        cols = ["Path", "label", *schema.COMPETITION_LABELS]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        for r, label in chosen:
            w.writerow([r["Path"], label, *(r[c] for c in schema.COMPETITION_LABELS)])
        bs.write_bytes(bs.join(output_dir, FIVE_X_200_CSV), buf.getvalue().encode("utf-8"))
        self._selected = [(dict(r), label) for r, label in chosen]

    def rows(self):
        for r, label in self._selected:
            row = self.row_from_csv(r, "test")
            if isinstance(row, dict):
                row["class_label"] = schema.COMPETITION_LABELS.index(label)
            yield row


def build_chexpert_5x200(
    input_dir: str,
    output_dir: str,
    per_class: int = 200,
    seed: int = 0,
    source_csv: str = "train.csv",
    uncertain_policy: str = "keep",
    views: Sequence[str] | str = DEFAULT_VIEWS,
    shards: int = 1,
    beam_args: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write `<output_dir>/chexpert_5x200.csv` and the 5x200 TFRecords; returns the manifest."""
    conv = Chexpert5x200Converter(input_dir, per_class, seed, source_csv, uncertain_policy, views)
    return bs.run_conversion(
        conv, output_dir, shards={"test": shards}, beam_args=beam_args, overwrite=overwrite
    )
