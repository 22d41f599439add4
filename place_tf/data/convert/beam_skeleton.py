"""Shared Apache Beam skeleton for the dataset converters: rows -> examples -> shards + manifest.

Each source module defines a `Converter` subclass with three parts:
  (a) `check_layout()`: runs on the launcher before anything else and raises `LayoutError`
      naming the expected file or folder when the input tree is wrong;
  (b) `rows()`: reads the metadata (CSV / txt) and yields lightweight row dicts (paths,
      ids, labels), or `Skipped(reason)` for rows it cannot parse;
  (c) `convert(row)`: reads and checks the image (and report), returning a
      `schema.ExampleRecord` or `Skipped(reason)`.

The pipeline (`build_pipeline`) is

    Create([None]) -> FlatMap(rows) -> Reshuffle -> ParDo(convert) -+-> per split: WriteToTFRecord
                                                                     +-> counts -> _stats.json

Rows are generated on a worker (not pickled into the job graph), so a 377k-row MIMIC
conversion does not bloat the graph. Skips are counted with Beam Metrics counters
(namespace "place_tf.convert") and, independently of the runner's metrics support, counted
in the pipeline itself; the launcher reads those counts back into `manifest.json`
(examples per split, skipped by reason, sha256 of the source metadata files, of the shards).

Shard names are `manifest.shard_name(split, i, n)`, e.g. `train-00003-of-00016.tfrecord`
(uncompressed TFRecord). Beam writes to a temporary folder and renames on success, so an
interrupted run never leaves a complete-looking split.

Images are stored as shipped (JPEG / PNG bytes unchanged). DICOM is the one exception:
TF cannot decode it, so `dicom_to_png` converts it to an 8- or 16-bit PNG (see there).

Logging: progress and the final summary are counts only. Ids and paths of skipped rows
appear at DEBUG level only; report text is never logged.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from place_tf.data import manifest as manifest_lib
from place_tf.data import schema

log = logging.getLogger(__name__)

METRICS_NAMESPACE = "place_tf.convert"
STATS_PREFIX = "_convert_stats"
VOCAB_TEXTS_PREFIX = "_vocab_texts"  # temporary: train reports, deleted after learning
TRAIN_LABELS_PREFIX = "_train_labels"  # temporary: (id, class, labels) of the train split
VOCAB_NAME = "vocab.txt"
DEFAULT_VOCAB_SIZE = 30522  # DataConfig.vocab_size, BERT's
# Shards follow the data: a split gets ceil(its bytes / TARGET_SHARD_BYTES) shards, its
# bytes estimated from the sizes of a sample of its image files (TF's guidance: shards of
# 100-200+ MB, at least as many as the readers that share them on a big corpus).
TARGET_SHARD_BYTES = 200 << 20
SIZE_SAMPLE = 64

# Skip reasons (counted in the manifest). Units: one per image that would have become an
# example, except `malformed_row` for a CSV row whose key cannot be read at all.
MISSING_IMAGE = "missing_image"
TRUNCATED_IMAGE = "truncated_image"
UNDECODABLE_IMAGE = "undecodable_image"
TOO_LARGE_IMAGE = "too_large_image"
# Pixel bound of a stored image, checked from the header before any decoding: the same
# bound as the training pipeline's (place_tf.data.pipeline.MAX_PIXELS), so nothing is
# stored that training would skip at every epoch. 64 M pixels = an 8000x8000 radiograph;
# above that it is a decompression bomb, and decoding it could exhaust memory.
MAX_IMAGE_PIXELS = 64_000_000
BAD_DICOM = "bad_dicom"
MISSING_REPORT = "missing_report"
NON_UTF8_REPORT = "non_utf8_report"
EMPTY_REPORT = "empty_report"
MALFORMED_ROW = "malformed_row"
BAD_RLE = "bad_rle"
BAD_ANNOTATION = "bad_annotation"
VIEW_NOT_SELECTED = "view_not_selected"
CLASS_NOT_SELECTED = "class_not_selected"
MISSING_SPLIT = "missing_split"
EXCLUDED = "excluded"
DUPLICATE_ROW = "duplicate_row"
NOT_IN_SPLIT_FILE = "not_in_split_file"
CONVERSION_ERROR = "conversion_error"


class LayoutError(FileNotFoundError):
    """The input tree is not the official layout; the message names what is missing."""


class ParseError(ValueError):
    """A metadata field (CSV cell, RLE string, annotation) is malformed."""


class SkipError(ValueError):
    """This row cannot become an example (bad image, report, ...); `reason` is the skip."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A row that produces no example. `detail` may hold ids: logged at DEBUG only."""

    reason: str
    detail: str = ""


# --------------------------------------------------------------------------- files


def _is_remote(path: str) -> bool:
    return "://" in path


def join(*parts: str) -> str:
    if _is_remote(parts[0]):
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.join(*parts)
    return os.path.join(*parts)


def exists(path: str) -> bool:
    if _is_remote(path):
        from apache_beam.io.filesystems import FileSystems

        return FileSystems.exists(path)
    return os.path.exists(path)


def isdir(path: str) -> bool:
    if _is_remote(path):  # object stores have no folders: a prefix with files counts
        from apache_beam.io.filesystems import FileSystems

        return bool(FileSystems.match([path.rstrip("/") + "/*"], limits=[1])[0].metadata_list)
    return os.path.isdir(path)


def find_files(root: str, suffix: str) -> Iterator[str]:
    """Every file under `root` (recursively) whose name ends with `suffix`, sorted."""
    if _is_remote(root):
        from apache_beam.io.filesystems import FileSystems

        match = FileSystems.match([root.rstrip("/") + "/**" + suffix])[0]
        yield from sorted(m.path for m in match.metadata_list)
        return
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        for n in sorted(names):
            if n.endswith(suffix):
                yield os.path.join(dirpath, n)


def read_bytes(path: str) -> bytes:
    """Raw bytes of a local or Beam-filesystem (gs://, s3://, ...) file."""
    if _is_remote(path):
        from apache_beam.io.filesystems import CompressionTypes, FileSystems

        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def match(pattern: str) -> list[str]:
    """Paths matching a glob pattern (local or Beam filesystem), sorted; [] when none."""
    if _is_remote(pattern):
        from apache_beam.io.filesystems import FileSystems

        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception:  # object stores raise when nothing matches
            return []
        return sorted(m.path for m in found)
    return sorted(glob.glob(pattern))


def delete(paths: Sequence[str]) -> None:
    for path in paths:
        if _is_remote(path):
            from apache_beam.io.filesystems import FileSystems

            FileSystems.delete([path])
        else:
            os.remove(path)


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file (local: via a temporary name, then rename)."""
    if _is_remote(path):
        from apache_beam.io.filesystems import CompressionTypes, FileSystems

        with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            f.write(data)
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def sha256_path(path: str, chunk: int = 1 << 20) -> str:
    """'sha256:<hex>' of a local or Beam-filesystem file, streamed."""
    if not _is_remote(path):
        return manifest_lib.sha256_file(path, chunk)
    import hashlib

    from apache_beam.io.filesystems import CompressionTypes, FileSystems

    h = hashlib.sha256()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        while b := f.read(chunk):
            h.update(b)
    return "sha256:" + h.hexdigest()


def read_text(path: str) -> str:
    """UTF-8 text of a metadata file; `.gz` is decompressed. BOM tolerated."""
    data = read_bytes(path)
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ParseError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_csv(path: str, required: Sequence[str] = ()) -> Iterator[dict[str, str] | Skipped]:
    """Rows of a CSV as dicts with stripped header names (SIIM's " EncodedPixels").

    Missing required columns raise LayoutError naming the file and the columns. A row with
    more or fewer cells than the header is yielded as Skipped(malformed_row).
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise LayoutError(f"{path}: empty file, expected a CSV header {list(required)}") from None
    except csv.Error as e:
        raise LayoutError(f"{path}: unreadable CSV header ({e})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise LayoutError(f"{path}: missing column(s) {missing}; header is {header}")
    line = 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            line += 1
            yield Skipped(MALFORMED_ROW, f"{path}:{line}: {e}")
            continue
        line += 1
        if not cells:
            continue  # blank line
        if len(cells) != len(header):
            yield Skipped(
                MALFORMED_ROW, f"{path}:{line}: {len(cells)} cells, expected {len(header)}"
            )
            continue
        yield dict(zip(header, cells, strict=True))


def require_file(root: str, rel: str, hint: str = "") -> str:
    path = join(root, rel)
    if not exists(path) or isdir(path):
        raise LayoutError(
            f"expected file {rel!r} in {root} ({path} not found){': ' + hint if hint else ''}"
        )
    return path


def require_dir(root: str, rel: str, hint: str = "") -> str:
    path = join(root, rel)
    if not isdir(path):
        raise LayoutError(
            f"expected folder {rel + '/'!r} in {root} ({path} not found){': ' + hint if hint else ''}"
        )
    return path


# --------------------------------------------------------------------------- images


def image_format(data: bytes) -> str:
    """'jpeg' / 'png' from magic bytes, '' otherwise (extensions lie)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return ""


def decode_check(data: bytes) -> tuple[str, int, int]:
    """(format, height, width) of JPEG/PNG bytes after a full Pillow decode.

    Raises SkipError(truncated_image | undecodable_image | too_large_image). The size is
    read from the header first: above MAX_IMAGE_PIXELS nothing is decoded (memory stays
    flat). `verify()` checks the PNG chunk CRCs; `load()` decodes every pixel, which is
    what catches a truncated JPEG.
    """
    from PIL import Image

    fmt = image_format(data)
    if not fmt:
        raise SkipError(UNDECODABLE_IMAGE, "not a JPEG or PNG file")
    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the header only
            w, h = im.size
            if w * h > MAX_IMAGE_PIXELS:
                raise SkipError(
                    TOO_LARGE_IMAGE,
                    f"{w}x{h} = {w * h} pixels exceeds MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS}",
                )
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
    except SkipError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own bound, hit in open()
        raise SkipError(TOO_LARGE_IMAGE, f"{e} (MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS})") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
        reason = TRUNCATED_IMAGE if "truncat" in str(e).lower() else UNDECODABLE_IMAGE
        raise SkipError(reason, f"{type(e).__name__}: {e}") from None
    if width <= 0 or height <= 0:
        raise SkipError(UNDECODABLE_IMAGE, "image has no pixels")
    return fmt, height, width


def load_image(path: str) -> tuple[bytes, str, int, int]:
    """Bytes as shipped + (format, height, width); SkipError with the skip reason."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise SkipError(MISSING_IMAGE, "file not found") from None
    except IsADirectoryError:
        raise SkipError(MISSING_IMAGE, "path is a folder") from None
    fmt, h, w = decode_check(data)
    return data, fmt, h, w


def dicom_to_png(data: bytes) -> tuple[bytes, int, int, object]:
    """DICOM bytes -> (PNG bytes, height, width, pydicom Dataset without pixel data).

    - Single-frame grayscale only (MONOCHROME1/2), else SkipError(bad_dicom).
    - With a VOI LUT or window in the file, the modality LUT and VOI LUT are applied
      (pydicom) and the result is quantised over the VOI output range: that is the
      intended display, as the DICOM asks.
    - Without one, stored values are kept exactly: BitsStored <= 8 -> 8-bit PNG of the
      same values; otherwise a 16-bit PNG with the values shifted left by 16 - BitsStored
      (lossless, and fills the 16-bit range so a plain `decode_png` looks right). Signed
      data are offset by 2**(BitsStored-1) first (lossless).
    - MONOCHROME1 is inverted so that bright always means dense (as in JPEG/PNG sources).
    """
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        photometric = str(ds.get("PhotometricInterpretation", "")).upper()
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise SkipError(BAD_DICOM, f"PhotometricInterpretation {photometric!r} unsupported")
        if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise SkipError(BAD_DICOM, "multi-frame or multi-sample DICOM unsupported")
        raw = ds.pixel_array
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
        if not 1 <= bits <= 16:
            raise SkipError(BAD_DICOM, f"BitsStored {bits} unsupported")
        out_bits = 8 if bits <= 8 else 16
        out_max = 2**out_bits - 1
        has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
        if has_voi:
            vals = apply_voi_lut(apply_modality_lut(raw, ds), ds).astype(np.float64)
            lo, hi = float(np.min(vals)), float(np.max(vals))
            if "VOILUTSequence" not in ds:  # windowing: output range is known
                signed = int(ds.get("PixelRepresentation", 0)) == 1
                lo = -(2 ** (bits - 1)) if signed else 0.0
                hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
                slope, icpt = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
                if slope is not None and icpt is not None:
                    lo, hi = lo * float(slope) + float(icpt), hi * float(slope) + float(icpt)
            scale = out_max / (hi - lo) if hi > lo else 0.0
            arr = np.clip(np.rint((vals - lo) * scale), 0, out_max)
        else:
            arr = raw.astype(np.int64)
            if int(ds.get("PixelRepresentation", 0)) == 1:
                arr = arr + 2 ** (bits - 1)
            arr = np.clip(arr, 0, 2**bits - 1)
            if out_bits == 16:
                arr = arr << (16 - bits)
        if photometric == "MONOCHROME1":
            arr = out_max - arr
        arr = arr.astype(np.uint8 if out_bits == 8 else np.uint16)
    except SkipError:
        raise
    except Exception as e:  # pydicom raises many kinds on corrupt files
        raise SkipError(BAD_DICOM, f"{type(e).__name__}: {e}") from None
    if arr.ndim != 2 or arr.size == 0:
        raise SkipError(BAD_DICOM, f"pixel array shape {arr.shape} is not a 2-D image")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    del ds.PixelData
    return buf.getvalue(), int(arr.shape[0]), int(arr.shape[1]), ds


def load_dicom_as_png(path: str) -> tuple[bytes, int, int, object]:
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise SkipError(MISSING_IMAGE, "file not found") from None
    return dicom_to_png(data)


def image_record(path: str, **fields) -> schema.ExampleRecord:
    """An ExampleRecord of the image at `path` (JPEG / PNG bytes as shipped; a `.dcm` file
    converted by `dicom_to_png`) with the other `fields`; SkipError as load_image."""
    if path.lower().endswith(".dcm"):
        data, h, w, _ = load_dicom_as_png(path)
        fmt = "png"
    else:
        data, fmt, h, w = load_image(path)
    return schema.ExampleRecord(image=data, image_format=fmt, height=h, width=w, **fields)


def mask_png(mask) -> bytes:
    """(H, W) bool/0-1/0-255 array -> 8-bit PNG with values 0/255 (schema convention)."""
    import numpy as np
    from PIL import Image

    arr = (np.asarray(mask) > 0).astype(np.uint8) * 255
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def read_report(path: str) -> str:
    """Report file as str; SkipError(missing_report | non_utf8_report)."""
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        raise SkipError(MISSING_REPORT, "report file not found") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipError(NON_UTF8_REPORT, f"not UTF-8 at byte {e.start}") from None


# --------------------------------------------------------------------------- converter


class Converter:
    """Base class of a source converter; subclasses set `name` and implement a/b/c."""

    name: str = ""
    splits: tuple[str, ...] = schema.SPLITS
    default_shards: int = 16

    def __init__(self, input_dir: str):
        if not input_dir:
            raise ValueError(f"{type(self).__name__}: --input is required")
        self.input_dir = input_dir

    # -- CLI glue
    @classmethod
    def add_arguments(cls, parser) -> None:
        """Source-specific argparse options."""

    @classmethod
    def from_args(cls, args) -> Converter:
        return cls(input_dir=args.input)

    def options(self) -> dict:
        """Options recorded in the manifest (no ids, no report text)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    # -- (a) layout
    def check_layout(self) -> None:
        raise NotImplementedError

    def source_files(self) -> list[str]:
        """Metadata files whose sha256 goes into the manifest."""
        return []

    def prepare(self, output_dir: str) -> None:
        """Launcher-side work after the layout check (e.g. writing a split file)."""

    # -- (b) rows
    def rows(self) -> Iterable[dict | Skipped]:
        raise NotImplementedError

    # -- (c) one row -> example
    def convert(self, row: dict) -> schema.ExampleRecord | Skipped:
        raise NotImplementedError

    def convert_row(self, row: dict | Skipped) -> tuple[str, bytes] | Skipped:
        """(split, serialized tf.train.Example) or Skipped, for one row (see
        `convert_row_with_text`)."""
        out = self.convert_row_with_record(row)
        return out if isinstance(out, Skipped) else out[:2]

    def convert_row_with_record(
        self, row: dict | Skipped
    ) -> tuple[str, bytes, schema.ExampleRecord] | Skipped:
        """(split, serialized tf.train.Example, its record) or Skipped, for one row.

        Image/report/parse problems become their skip reasons. Any other exception (a bug,
        or a file no check foresaw) is counted as "conversion_error" and logged with its
        type at WARNING (the message, which may name the row, at DEBUG) instead of
        stopping an hours-long conversion; the manifest shows the count.
        """
        if isinstance(row, Skipped):
            return row
        key = row.get("_key", "")
        try:
            out = self.convert(row)
            if isinstance(out, Skipped):
                return out
            if out.split not in self.splits:
                raise ValueError(f"example split {out.split!r} not in {self.splits}")
            if not out.source:
                out.source = self.name
            return out.split, schema.to_example(out).SerializeToString(), out
        except SkipError as e:
            return Skipped(e.reason, f"{key}: {e}")
        except ParseError as e:
            return Skipped(MALFORMED_ROW, f"{key}: {e}")
        except Exception as e:
            log.warning("%s: conversion error (%s) on a row", self.name, type(e).__name__)
            return Skipped(CONVERSION_ERROR, f"{key}: {type(e).__name__}: {e}")

    # -- peer split files (--splits_from)
    def split_key(self, row: dict) -> str:
        """The id a peer's split file names this row by (default: the row's key)."""
        return str(row.get("_key", ""))

    def split_file_key(self, value: str) -> str:
        """A split file's id cell -> the form `split_key` returns (default: the file name
        of a path, e.g. MGCA's "Path" cells)."""
        return str(value).strip().replace("\\", "/").rsplit("/", 1)[-1]

    def load_split_file(self, spec: str) -> None:
        """Read `--splits_from` (see `read_split_file`); rows are then assigned by it."""
        self._split_map = read_split_file(spec, self.split_file_key)

    def iter_rows(self) -> Iterator[dict | Skipped]:
        """`rows()` with the peer split file applied: its split replaces the converter's,
        and a row the file does not name is skipped as "not_in_split_file"."""
        split_map = getattr(self, "_split_map", None)
        for row in self.rows():
            if split_map is None or isinstance(row, Skipped):
                yield row
                continue
            split = split_map.get(self.split_key(row))
            if split is None:
                yield Skipped(NOT_IN_SPLIT_FILE, str(row.get("_key", "")))
                continue
            yield {**row, "split": split}


SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "valid": "validate",
    "val": "validate",
    "validate": "validate",
    "validation": "validate",
    "dev": "validate",
    "test": "test",
}
# Id columns of the peers' split files, tried in this order (MGCA / GLoRIA CSVs name the
# image by "Path" (CheXpert, MIMIC), "patientId" (RSNA), "ImageId" (SIIM), ...).
SPLIT_ID_COLUMNS = (
    "Path",
    "path",
    "dicom_id",
    "patientId",
    "ImageId",
    "image_name",
    "filename",
    "image_id",
    "id",
)


def read_split_file(spec: str, normalise=lambda v: str(v).strip()) -> dict[str, str]:
    """A peer's split, as {image key: split}, from `spec`:

    - "FILE.csv": a CSV with an id column (the first of SPLIT_ID_COLUMNS it has) and a
      "split"/"Split" column (train / valid / val / validate / dev / test);
    - "train=A.csv,validate=B.csv,test=C.csv": one CSV per split (MGCA writes
      train_split.csv / valid_split.csv), the split given by the name before "=".
    LayoutError naming the file for a missing file, id or split column, an unknown split
    value or an image assigned to two splits.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()] if "=" in spec else [spec]
    out: dict[str, str] = {}
    for part in parts:
        fixed = None
        path = part
        if "=" in part:
            name, path = (x.strip() for x in part.split("=", 1))
            fixed = SPLIT_ALIASES.get(name.lower())
            if fixed is None:
                raise LayoutError(f"--splits_from: {name!r} is not a split name")
        if not exists(path):
            raise LayoutError(f"--splits_from: split file {path} not found")
        rows = [r for r in read_csv(path) if isinstance(r, dict)]
        header = list(rows[0]) if rows else []
        id_col = next((c for c in SPLIT_ID_COLUMNS if c in header), None)
        split_col = next((c for c in ("split", "Split", "SPLIT") if c in header), None)
        if id_col is None or (fixed is None and split_col is None):
            raise LayoutError(
                f"{path}: a split file needs an id column (one of {list(SPLIT_ID_COLUMNS)})"
                f"{'' if fixed else ' and a split column'}; header is {header}"
            )
        for i, r in enumerate(rows, start=2):
            split = fixed or SPLIT_ALIASES.get(str(r[split_col]).strip().lower())
            if split is None:
                raise LayoutError(f"{path}:{i}: split {str(r[split_col])[:20]!r} is unknown")
            key = normalise(r[id_col])
            if out.setdefault(key, split) != split:
                raise LayoutError(f"{path}:{i}: an image is in two splits ({out[key]}, {split})")
    if not out:
        raise LayoutError(f"--splits_from {spec}: no rows")
    return out


def _generate_rows(_, conv: Converter):
    yield from conv.iter_rows()


LOG_EVERY = 1000


class ConvertFn(beam.DoFn):
    """Row -> (split, serialized Example) on the main output, or a skip reason on 'skipped';
    for the train split also (image id, class, CheXpert labels) as JSON on 'train_labels'
    and, with `train_reports`, the report text (one line) on 'reports'."""

    def __init__(self, conv: Converter, train_reports: bool = False):
        self.conv = conv
        self.train_reports = train_reports

    def setup(self):
        self._rows = Metrics.counter(METRICS_NAMESPACE, "rows")
        self._seen = Counter()

    def process(self, row):
        self._rows.inc()
        out = self.conv.convert_row_with_record(row)
        if isinstance(out, Skipped):
            Metrics.counter(METRICS_NAMESPACE, f"skipped_{out.reason}").inc()
            log.debug("%s: skipped (%s) %s", self.conv.name, out.reason, out.detail)
            self._seen["skipped"] += 1
            yield beam.pvalue.TaggedOutput("skipped", out.reason)
        else:
            split, serialized, rec = out
            Metrics.counter(METRICS_NAMESPACE, f"examples_{split}").inc()
            self._seen["examples"] += 1
            yield split, serialized
            if split == "train":
                labels = [rec.image_id, int(rec.class_label), [int(v) for v in rec.chexpert]]
                yield beam.pvalue.TaggedOutput("train_labels", json.dumps(labels))
                text = schema.report_text(rec.findings or "", rec.impression or "")
                if self.train_reports and text:
                    yield beam.pvalue.TaggedOutput("reports", " ".join(text.split()))
        n = self._seen["examples"] + self._seen["skipped"]
        if n % LOG_EVERY == 0:
            log.info(
                "%s: %d rows done by this worker (%d examples, %d skipped)",
                self.conv.name,
                n,
                self._seen["examples"],
                self._seen["skipped"],
            )


def _stats_json(counts: list) -> str:
    return json.dumps(dict(sorted(counts)), sort_keys=True)


def build_pipeline(
    p, conv: Converter, output_dir: str, shards: dict[str, int], train_reports: bool = False
) -> None:
    """Add the conversion to Beam pipeline `p` (see the module docstring); with
    `train_reports` the train reports also go to a temporary `_vocab_texts` file (one per
    line) that the launcher learns the vocabulary from and deletes."""
    missing = [s for s in conv.splits if s not in shards]
    if missing:
        raise ValueError(f"no shard count for split(s) {missing}")
    rows = (
        p
        | "Start" >> beam.Create([None])
        | "ReadMetadata" >> beam.FlatMap(_generate_rows, conv)
        | "Redistribute" >> beam.Reshuffle()
    )
    results = rows | "Convert" >> beam.ParDo(ConvertFn(conv, train_reports)).with_outputs(
        "skipped", "reports", "train_labels", main="examples"
    )
    results.train_labels | "WriteTrainLabels" >> beam.io.WriteToText(
        join(output_dir, TRAIN_LABELS_PREFIX), file_name_suffix=".txt", shard_name_template=""
    )
    examples, skipped = results.examples, results.skipped
    if train_reports:
        results.reports | "WriteReports" >> beam.io.WriteToText(
            join(output_dir, VOCAB_TEXTS_PREFIX), file_name_suffix=".txt", shard_name_template=""
        )
    for split in conv.splits:
        (
            examples
            | f"Select_{split}" >> beam.Filter(lambda kv, s: kv[0] == s, split)
            | f"Bytes_{split}" >> beam.Map(lambda kv: kv[1])
            | f"Write_{split}"
            >> beam.io.WriteToTFRecord(
                join(output_dir, split),
                file_name_suffix=".tfrecord",
                num_shards=shards[split],
                shard_name_template="-SSSSS-of-NNNNN",
            )
        )
    keys = (
        examples | "SplitKeys" >> beam.Map(lambda kv: "split:" + kv[0]),
        skipped | "SkipKeys" >> beam.Map(lambda r: "skipped:" + r),
    ) | "AllKeys" >> beam.Flatten()
    (
        keys
        | "Count" >> beam.combiners.Count.PerElement()
        | "Collect" >> beam.combiners.ToList()
        | "ToJson" >> beam.Map(_stats_json)
        | "WriteStats"
        >> beam.io.WriteToText(
            join(output_dir, STATS_PREFIX), file_name_suffix=".json", shard_name_template=""
        )
    )


def default_beam_args(beam_args: Sequence[str] | None) -> list[str]:
    """Fill in DirectRunner multi-processing defaults unless the caller chose otherwise."""
    args = list(beam_args or [])
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    if "--runner" not in given:
        args.append("--runner=DirectRunner")
    runner = next(
        (a.split("=", 1)[1] for a in args if a.startswith("--runner=")),
        None,
    )
    if runner is None and "--runner" in args:
        runner = args[args.index("--runner") + 1]
    if runner in ("DirectRunner", "direct"):
        if "--direct_running_mode" not in given:
            args.append("--direct_running_mode=multi_processing")
        if "--direct_num_workers" not in given:
            args.append(f"--direct_num_workers={os.cpu_count() or 1}")
    return args


def _clear_output(output_dir: str, overwrite: bool) -> None:
    old = match(join(output_dir, "*.tfrecord")) + match(
        join(output_dir, manifest_lib.MANIFEST_NAME)
    )
    if old and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds a corpus ({len(old)} shard/manifest files); "
            "pass --overwrite to replace it"
        )
    # The vocabulary and split files of a corpus being replaced go with it (a vocab.txt
    # put in an empty folder by hand stays: it is not a converter's).
    derived = match(join(output_dir, VOCAB_NAME)) + match(join(output_dir, "splits", "*.txt"))
    delete(
        old
        + (derived if old else [])
        + match(join(output_dir, STATS_PREFIX + "*"))
        + match(join(output_dir, VOCAB_TEXTS_PREFIX + "*"))
        + match(join(output_dir, TRAIN_LABELS_PREFIX + "*"))
    )


def _write_manifest(man: manifest_lib.Manifest, output_dir: str, checksum_shards: bool) -> None:
    if not _is_remote(output_dir):
        man.write(output_dir, checksum_shards=checksum_shards)
        return
    if checksum_shards:  # Manifest.write reads local files only
        for info in man.splits.values():
            for name in info["shards"]:
                man.shard_checksums[name] = sha256_path(join(output_dir, name))
    text = json.dumps(man.to_json(), indent=2, sort_keys=True)
    write_bytes(join(output_dir, manifest_lib.MANIFEST_NAME), text.encode("utf-8"))


def shard_counts(conv: Converter, shards: int | dict[str, int] | None, eval_shards=None):
    """Per-split shard counts: `shards` for train, `eval_shards` (default shards//8) else."""
    if isinstance(shards, dict):
        return {s: int(shards[s]) for s in conv.splits}
    n = int(shards or conv.default_shards)
    m = int(eval_shards or max(1, n // 8))
    if n < 1 or m < 1:
        raise ValueError(f"shard counts must be >= 1, got shards={n} eval_shards={m}")
    return {s: (n if s == "train" else m) for s in conv.splits}


def file_size(path: str) -> int | None:
    """Bytes of a local or Beam-filesystem file; None when it does not exist."""
    try:
        if _is_remote(path):
            from apache_beam.io.filesystems import FileSystems

            found = FileSystems.match([path])[0].metadata_list
            return int(found[0].size_in_bytes) if found else None
        return os.path.getsize(path)
    except Exception:  # OSError locally; object stores raise their own kinds
        return None


def plan_shards(
    conv: Converter,
    target_shard_bytes: int = TARGET_SHARD_BYTES,
    examples_per_shard: int = 0,
) -> tuple[dict[str, int], dict]:
    """Shards per split from the data: the launcher counts the rows of each split (a row
    without a split yet, e.g. SIIM's patient hash read from the DICOM, counts for every
    split) and estimates the bytes of an example from a sample of image files; a split
    gets ceil(rows / examples_per_shard), or ceil(bytes / target_shard_bytes), shards,
    at least 1 and at most one per row. Returns (counts, the plan for the manifest)."""
    if target_shard_bytes <= 0 and examples_per_shard <= 0:
        raise ValueError("give a positive target_shard_bytes or examples_per_shard")
    rows: Counter = Counter()
    unsplit = 0
    sizes: list[int] = []
    for row in conv.iter_rows():
        if isinstance(row, Skipped):
            continue
        if row.get("split") in conv.splits:
            rows[row["split"]] += 1
        else:
            unsplit += 1
        if len(sizes) < SIZE_SAMPLE and row.get("image_path"):
            size = file_size(row["image_path"])
            if size is not None:
                sizes.append(size)
    example_bytes = int(sum(sizes) / len(sizes)) if sizes else 0
    counts = {}
    for split in conv.splits:
        n = rows[split] + unsplit
        if examples_per_shard > 0:
            want = -(-n // examples_per_shard)
        else:
            want = -(-n * example_bytes // target_shard_bytes)
        counts[split] = max(1, min(want, n))
    plan = {
        "rows": {s: rows[s] + unsplit for s in conv.splits},
        "estimated_example_bytes": example_bytes,
        "target_shard_bytes": int(target_shard_bytes) if examples_per_shard <= 0 else None,
        "examples_per_shard": int(examples_per_shard) or None,
    }
    return counts, plan


def learn_corpus_vocabulary(conv: Converter, output_dir: str, vocab_size: int) -> dict | None:
    """Learn `vocab.txt` from the train reports the pipeline wrote to the temporary
    `_vocab_texts.txt` (then deleted); None when the train split has no report text."""
    from place_tf.data import tokenizer as tokenizer_lib

    paths = match(join(output_dir, VOCAB_TEXTS_PREFIX + "*"))
    try:
        texts = [ln for p in paths for ln in read_text(p).splitlines() if ln.strip()]
    finally:
        delete(paths)
    if not texts:
        log.info("%s: the train split has no report text: no %s written", conv.name, VOCAB_NAME)
        return None
    vocab = tokenizer_lib.learn_vocabulary(texts, vocab_size, None)
    path = join(output_dir, VOCAB_NAME)
    write_bytes(path, "".join(t + "\n" for t in vocab).encode("utf-8"))
    log.info(
        "%s: %s: %d WordPiece tokens from the train reports", conv.name, VOCAB_NAME, len(vocab)
    )
    return {
        "file": VOCAB_NAME,
        "size": len(vocab),
        "requested_size": int(vocab_size),
        "learned_from": "train split reports (FINDINGS + IMPRESSION)",
        "reports": len(texts),
        "sha256": sha256_path(path),
    }


def write_fraction_splits(conv: Converter, output_dir: str, seed: int = 0) -> dict:
    """`<corpus>/splits/train_{1,10,100}pct.txt` (place_tf.data.splits) from the train
    split's (id, class, labels) the pipeline wrote to a temporary file (then deleted)."""
    from place_tf.data import splits as splits_lib

    paths = match(join(output_dir, TRAIN_LABELS_PREFIX + "*"))
    try:
        examples = [
            tuple(json.loads(ln)) for p in paths for ln in read_text(p).splitlines() if ln.strip()
        ]
    finally:
        delete(paths)
    if not examples:
        return {}
    if _is_remote(output_dir):
        log.info("%s: split files are written for local corpora only", conv.name)
        return {}
    written = splits_lib.write_label_fraction_splits(output_dir, seed=seed, examples=examples)
    return {f"{f:g}": os.path.basename(p) for f, p in written.items()}


def run_conversion(
    conv: Converter,
    output_dir: str,
    shards: int | dict[str, int] | None = None,
    eval_shards: int | None = None,
    beam_args: Sequence[str] | None = None,
    overwrite: bool = False,
    checksum_shards: bool = True,
    *,
    target_shard_bytes: int = TARGET_SHARD_BYTES,
    examples_per_shard: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    splits_from: str = "",
) -> dict:
    """Check the layout, run the Beam pipeline, write and return the manifest (as JSON dict).

    `beam_args` are Beam pipeline options (`--runner=DataflowRunner --project=...`);
    without a runner the DirectRunner runs multi-processing on all cores. Input and
    output may be local paths or any Beam filesystem (gs://, s3://, hdfs://): remote
    workers cannot write to the launcher's disk, so give them a shared output.

    Shards: `shards` (train) / `eval_shards` fix the counts; without them the counts follow
    the data (`plan_shards`: `examples_per_shard`, else `target_shard_bytes`).
    Vocabulary: when the train split has report text and `vocab_size` > 0, `vocab.txt` is
    learned from the train reports (the trainer's `<corpus>/vocab.txt`).
    `splits_from`: a peer's split file (see `read_split_file`) replaces the splits.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    conv.check_layout()
    if not _is_remote(output_dir):
        os.makedirs(output_dir, exist_ok=True)
    _clear_output(output_dir, overwrite)
    if splits_from:
        conv.load_split_file(splits_from)
    conv.prepare(output_dir)
    plan = None
    if shards is None and eval_shards is None:
        per_split, plan = plan_shards(conv, target_shard_bytes, examples_per_shard)
    else:
        per_split = shard_counts(conv, shards, eval_shards)
    options = PipelineOptions(default_beam_args(beam_args))
    log.info(
        "%s: converting %s -> %s (shards %s, %s)",
        conv.name,
        conv.input_dir,
        output_dir,
        per_split,
        options.get_all_options().get("runner"),
    )
    train_reports = bool(vocab_size) and "train" in conv.splits
    p = beam.Pipeline(options=options)
    build_pipeline(p, conv, output_dir, per_split, train_reports)
    result = p.run()
    result.wait_until_finish()
    _log_metrics(conv, result)

    stats_files = match(join(output_dir, STATS_PREFIX + "*.json"))
    if len(stats_files) != 1:
        raise RuntimeError(f"{output_dir}: expected one {STATS_PREFIX}.json, got {stats_files}")
    lines = [ln for ln in read_text(stats_files[0]).splitlines() if ln.strip()]
    counts = json.loads(lines[0]) if lines else {}
    delete(stats_files)
    vocabulary = learn_corpus_vocabulary(conv, output_dir, vocab_size) if train_reports else None
    fraction_files = write_fraction_splits(conv, output_dir)

    man = manifest_lib.Manifest(source=conv.name)
    for split, n in per_split.items():
        names = [manifest_lib.shard_name(split, i, n) for i in range(n)]
        for name in names:
            if not exists(join(output_dir, name)):
                raise RuntimeError(f"{conv.name}: shard {name} was not written in {output_dir}")
        man.splits[split] = {"examples": int(counts.get("split:" + split, 0)), "shards": names}
    for key, n in counts.items():
        if key.startswith("skipped:"):
            man.skip(key[len("skipped:") :], int(n))
    for path in conv.source_files():
        rel = path[len(conv.input_dir) :].lstrip("/\\") if path.startswith(conv.input_dir) else path
        man.source_checksums[rel] = sha256_path(path)
    if splits_from:
        for path in [x.split("=", 1)[-1].strip() for x in splits_from.split(",") if x.strip()]:
            man.source_checksums[path] = sha256_path(path)
    man.generator = {
        "tool": "place_tf.data.convert",
        "converter": conv.name,
        "options": _jsonable(conv.options()),
        "apache_beam": beam.__version__,
        "sharding": plan or {"fixed": per_split},
        "splits_from": splits_from or None,
        "vocabulary": vocabulary,
        "label_fraction_splits": fraction_files,
    }
    if vocabulary:  # the keys SynthCXR's manifest uses for its vocabulary
        man.generator.update({"vocab_file": VOCAB_NAME, "vocab_size": vocabulary["size"]})
    _write_manifest(man, output_dir, checksum_shards)
    summary = ", ".join(f"{s}={man.splits[s]['examples']}" for s in per_split)
    skipped = ", ".join(f"{r}={n}" for r, n in sorted(man.skipped.items())) or "none"
    log.info("%s: wrote %s; skipped: %s", conv.name, summary, skipped)
    return man.to_json()


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def _log_metrics(conv: Converter, result) -> None:
    """Counter totals as the runner reports them (counts only)."""
    try:
        from apache_beam.metrics.metric import MetricsFilter

        res = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
        totals = {c.key.metric.name: c.committed for c in res["counters"]}
        if totals:
            log.info("%s: counters %s", conv.name, dict(sorted(totals.items())))
    except Exception as e:  # some portable runners do not report metrics
        log.info("%s: runner metrics unavailable (%s)", conv.name, type(e).__name__)
