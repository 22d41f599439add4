"""tf.data input pipeline: schema TFRecords -> model batches (contract (a)).

    files --interleave--> records (+ one end marker per file, byte-accounted)
      -> [per-record shard] -> parse (try) -> drop empty reports / non-frontal views
      -> shuffle -> decode + grayscale + resize-with-pad (try) -> validity filter
      -> repeat -> batch -> augment -> normalise -> tokenize -> prefetch

Bad input is SKIPPED AND COUNTED, never silently dropped (`SkipCounter`, reasons below):
- corrupt_record: TFRecord framing/CRC damage (each uncompressed file's records are read
  with `ignore_errors` and their bytes accounted against the file size, so trailing
  garbage or a damaged record is detected even though the reader stops there), or a
  record that is not a schema `tf.train.Example`.
- bad_image: bytes that are not PNG/JPEG (magic checked before decoding), or that fail to
  decode (the decode runs in a `map` + `ignore_errors`; failures are counted from gaps in
  an `enumerate` index, which end markers make exact at the end of the stream too).
- wrong_shape: decoded (or PNG header) size differs from the stored height/width, or a
  side is below MIN_SIDE.
- empty_report: FINDINGS and IMPRESSION both empty (only where the consumer needs the
  text: pre-training and the text tasks; image-only evaluation reads label-only corpora
  such as CheXpert, RSNA or COVIDx with `require_report=False`).
- not_frontal: only with `frontal_only=True`: a lateral view (a selection, not an error).
Counts accumulate per pass over the data (a bad record is counted again each epoch).
Compressed (GZIP) shards cannot be byte-accounted: their read errors are counted from the
same index gaps instead.

Augmentation (training): one projective transform per image (random resized crop of
0.8-1.0 of the area, rotation within +-5 degrees, translation within +-3 %) and random
contrast/brightness, all stateless and seeded by (seed, pipeline, batch index), so
`deterministic=True` gives identical batches on every run. No horizontal flips: laterality
is in the reports.
"""

from __future__ import annotations

import logging
import math
import os

import tensorflow as tf

from place_tf.config import DataConfig
from place_tf.data import manifest as manifest_lib
from place_tf.data import reports, schema

log = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
SKIP_REASONS: tuple[str, ...] = (
    "corrupt_record",
    "bad_image",
    "wrong_shape",
    "empty_report",
    "not_frontal",
)
_CODE = {r: i + 1 for i, r in enumerate(SKIP_REASONS)}  # 0 = valid
MIN_SIDE = 8
MAX_PIXELS = 64_000_000  # a decompression bomb, not a radiograph
FRONTAL_VIEWS = ("PA", "AP", "")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_RECORD_OVERHEAD = 16  # uint64 length + uint32 length CRC + uint32 data CRC


class SkipCounter:
    """Per-reason counts of skipped records, as host (CPU) tf.Variables.

    The pipeline increments them inside tf.data; the trainer reads `as_dict()` and logs
    `log_counts()` (counts only, never content).
    """

    def __init__(self, name: str = "data_skips"):
        with tf.device("/CPU:0"):
            self._vars = {
                r: tf.Variable(0, dtype=tf.int64, trainable=False, name=f"{name}_{r}")
                for r in SKIP_REASONS
            }

    def add(self, reason: str, n) -> None:
        """Add `n` (tensor or int) to a reason; callable inside tf.data functions."""
        if reason not in self._vars:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self._vars[reason].assign_add(tf.cast(n, tf.int64))

    def add_code(self, code) -> None:
        """Count one element by its validity code (0 = valid: nothing counted)."""
        for reason, c in _CODE.items():
            self._vars[reason].assign_add(tf.cast(tf.equal(code, c), tf.int64))

    def as_dict(self) -> dict[str, int]:
        return {r: int(v.numpy()) for r, v in self._vars.items()}

    def checkpointable(self) -> tf.train.Checkpoint:
        """The counters as a trackable, so a resumed run keeps its skip totals."""
        return tf.train.Checkpoint(**self._vars)

    def total(self) -> int:
        return sum(self.as_dict().values())

    def reset(self) -> None:
        for v in self._vars.values():
            v.assign(0)

    def log_counts(self, logger: logging.Logger = log, where: str = "input pipeline") -> dict:
        """Log a warning with the non-zero counts (if any); return all counts."""
        counts = self.as_dict()
        nonzero = {k: v for k, v in counts.items() if v}
        if nonzero:
            logger.warning("%s skipped records: %s", where, nonzero)
        return counts


# --------------------------------------------------------------------------- files


def resolve_files(source, split: str | None = None) -> list[str]:
    """Shard paths of `source`: a corpus dir (manifest + split), a glob, a file or a list.

    Every file is checked to exist at open time (FileNotFoundError naming it).
    """
    if isinstance(source, (str, os.PathLike)):
        src = os.fspath(source)
        if tf.io.gfile.isdir(src):
            if not split:
                raise ValueError(f"{src} is a corpus directory: give the split to read")
            files = manifest_lib.split_files(src, split)
        elif any(ch in src for ch in "*?["):
            files = sorted(tf.io.gfile.glob(src))
            if not files:
                raise FileNotFoundError(f"no TFRecord shard matches {src}")
        else:
            files = [src]
    else:
        files = [os.fspath(f) for f in source]
    if not files:
        raise ValueError(f"no TFRecord files to read (source {source!r}, split {split!r})")
    for f in files:
        if not tf.io.gfile.exists(f):
            raise FileNotFoundError(f"TFRecord shard not found: {f}")
    return files


def _compression_of(files: list[str], compression_type: str) -> str:
    if compression_type != "auto":
        return compression_type
    gz = [f.endswith((".gz", ".gzip")) for f in files]
    if any(gz) and not all(gz):
        raise ValueError(
            "mixed compressed (.gz) and uncompressed shards; pass compression_type explicitly"
        )
    return "GZIP" if all(gz) else ""


def _file_reader(compression: str):
    """One shard -> (record, is_marker, corrupt) elements, ending with a marker."""

    def read(path, size):
        # A shard deleted mid-run would make ignore_errors() retry its open forever (a
        # hang at 100 % CPU): read no file then, and the byte accounting below counts the
        # shard's records as corrupt, which the trainer turns into an error naming it.
        exists = tf.size(tf.io.matching_files(path)) > 0
        paths = tf.boolean_mask(tf.reshape(path, [1]), tf.reshape(exists, [1]))
        if compression:
            recs = tf.data.TFRecordDataset(paths, compression_type=compression)
        else:
            # A damaged record ends this file's stream (the reader moves to the next file);
            # the byte accounting below notices the records that were never read.
            recs = tf.data.TFRecordDataset(paths).ignore_errors()
        recs = recs.map(lambda r: (r, tf.constant(False), tf.constant(0, tf.int64)))
        end = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True), size))

        def account(consumed, x):
            r, is_end, sz = x
            nxt = consumed + tf.cast(tf.strings.length(r), tf.int64) + _RECORD_OVERHEAD
            corrupt = tf.logical_and(is_end, tf.logical_and(sz >= 0, tf.not_equal(consumed, sz)))
            return tf.where(is_end, consumed, nxt), (r, is_end, corrupt)

        return recs.concatenate(end).scan(tf.constant(0, tf.int64), account)

    return read


def _parse_spec() -> dict:
    full = schema.feature_spec()
    keys = (
        schema.IMAGE,
        schema.IMAGE_HEIGHT,
        schema.IMAGE_WIDTH,
        schema.VIEW,
        schema.FINDINGS,
        schema.IMPRESSION,
        schema.CHEXPERT,
        schema.CLASS_LABEL,
    )
    spec = {k: full[k] for k in keys}
    # A record without an image is a counted bad_image, not a parse failure.
    spec[schema.IMAGE] = tf.io.FixedLenFeature([], tf.string, default_value="")
    return spec


def _counted_try_map(ds, fn, counter: SkipCounter, reason: str, extra_count=None):
    """`ds.map(fn)` where elements whose `fn` raises are dropped and counted as `reason`.

    The map keeps order; a failure shows up as a gap in the enumerate index, which the
    scan counts (markers at the end of every stream make trailing failures visible).
    `extra_count(x)` adds per-element counts to the same reason.
    """
    ds = ds.enumerate()
    ds = ds.map(lambda i, x: (i, fn(x)), num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.ignore_errors()

    def step(last, elem):
        i, x = elem
        n = i - last - 1
        if extra_count is not None:
            n += extra_count(x)
        counter.add(reason, n)
        return i, x  # new state, output element

    return ds.scan(tf.constant(-1, tf.int64), step)


# --------------------------------------------------------------------------- images


def _be_uint32(b):
    b = tf.cast(b, tf.int64)
    return b[0] * 16777216 + b[1] * 65536 + b[2] * 256 + b[3]


def decode_gray(image_bytes):
    """PNG/JPEG bytes -> float32 [H, W, 1] in 0..255 (8- or 16-bit, gray or RGB(A)).

    The one decoding of an X-ray used everywhere (training, evaluation, serving).
    """
    img = tf.io.decode_image(image_bytes, channels=0, dtype=tf.uint16, expand_animations=False)
    img = tf.cast(img, tf.float32) / 257.0  # 8-bit sources were scaled by 257 too
    c = tf.shape(img)[-1]
    gray = tf.cond(
        c >= 3,
        lambda: img[..., 0:1] * 0.2989 + img[..., 1:2] * 0.5870 + img[..., 2:3] * 0.1140,
        lambda: img[..., 0:1],
    )
    gray.set_shape([None, None, 1])
    return gray


def decode_and_resize(image_bytes, height, width, image_size: int):
    """Bytes -> (float32 [S, S, 1] in 0..255, validity code), checked before decoding.

    height/width <= 0 means "unknown" (serving); otherwise the decoded size must match.
    """
    head = tf.strings.substr(image_bytes, 0, 8)
    is_png = tf.equal(head, _PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, 3), _JPEG_MAGIC)
    # PNG IHDR (bytes 16..24) gives the size before any decoding.
    hdr = tf.io.decode_raw(
        tf.strings.substr(tf.strings.join([image_bytes, b"\0" * 33]), 0, 33), tf.uint8
    )
    png_w, png_h = _be_uint32(hdr[16:20]), _be_uint32(hdr[20:24])
    unknown_dims = tf.logical_or(height <= 0, width <= 0)
    png_shape_bad = tf.logical_and(
        is_png,
        tf.logical_or(
            tf.logical_and(tf.logical_not(unknown_dims), (png_h != height) | (png_w != width)),
            (png_h < MIN_SIDE) | (png_w < MIN_SIDE) | (png_h * png_w > MAX_PIXELS),
        ),
    )
    code = tf.where(
        tf.logical_not(is_png | is_jpeg),
        _CODE["bad_image"],
        tf.where(png_shape_bad, _CODE["wrong_shape"], 0),
    )
    blank = tf.zeros([image_size, image_size, 1], tf.float32)

    def decode():
        gray = decode_gray(image_bytes)
        h, w = tf.shape(gray)[0], tf.shape(gray)[1]
        bad = (h < MIN_SIDE) | (w < MIN_SIDE)
        bad |= tf.logical_not(unknown_dims) & (
            (tf.cast(h, tf.int64) != height) | (tf.cast(w, tf.int64) != width)
        )
        out = tf.cond(bad, lambda: blank, lambda: resize_with_pad(gray, image_size))
        return out, tf.where(bad, _CODE["wrong_shape"], 0)

    image, code2 = tf.cond(tf.equal(code, 0), decode, lambda: (blank, code))
    image = tf.ensure_shape(image, [image_size, image_size, 1])
    return image, tf.cast(code2, tf.int32)


def pad_geometry(height, width, image_size: int):
    """(new_h, new_w, top, left) of resize_with_pad for an H×W image (int32 tensors)."""
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    scale = image_size / tf.maximum(h, w)
    nh = tf.clip_by_value(tf.cast(tf.round(h * scale), tf.int32), 1, image_size)
    nw = tf.clip_by_value(tf.cast(tf.round(w * scale), tf.int32), 1, image_size)
    return nh, nw, (image_size - nh) // 2, (image_size - nw) // 2


def resize_with_pad(image, image_size: int):
    """[H, W, C] -> [S, S, C]: longer side to S keeping the aspect ratio (antialiased
    bilinear), then centred zero padding. Masks and boxes use the same geometry."""
    nh, nw, top, left = pad_geometry(tf.shape(image)[0], tf.shape(image)[1], image_size)
    resized = tf.image.resize(image, tf.stack([nh, nw]), method="bilinear", antialias=True)
    return tf.image.pad_to_bounding_box(resized, top, left, image_size, image_size)


def _augment(images, seed, image_size: int):
    """Batch [B, S, S, 1] in 0..255 -> augmented, stateless in `seed` ([2] int64)."""
    b = tf.shape(images)[0]
    s = float(image_size)
    r = tf.random.stateless_uniform([b, 7], seed=seed, dtype=tf.float32)
    area = 0.8 + 0.2 * r[:, 0]
    ratio = tf.exp(math.log(0.9) + (math.log(1.1) - math.log(0.9)) * r[:, 1])
    sx = tf.minimum(tf.sqrt(area * ratio), 1.0)  # crop width / S
    sy = tf.minimum(tf.sqrt(area / ratio), 1.0)
    theta = (r[:, 2] * 2.0 - 1.0) * (5.0 * math.pi / 180.0)
    c = (s - 1.0) / 2.0
    # Crop centre anywhere the crop fits, plus a small translation.
    cx = c + (r[:, 3] - 0.5) * (1.0 - sx) * s + (r[:, 5] - 0.5) * 0.06 * s
    cy = c + (r[:, 4] - 0.5) * (1.0 - sy) * s + (r[:, 6] - 0.5) * 0.06 * s
    cos, sin = tf.cos(theta), tf.sin(theta)
    a0, a1 = sx * cos, -sx * sin
    b0, b1 = sy * sin, sy * cos
    transforms = tf.stack(
        [
            a0,
            a1,
            cx - a0 * c - a1 * c,
            b0,
            b1,
            cy - b0 * c - b1 * c,
            tf.zeros_like(a0),
            tf.zeros_like(a0),
        ],
        axis=1,
    )
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.constant([image_size, image_size], tf.int32),
        fill_value=tf.constant(0.0),
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    r2 = tf.random.stateless_uniform(
        [b, 2], seed=seed + tf.constant([0, 1], tf.int64), dtype=tf.float32
    )
    contrast = (0.8 + 0.4 * r2[:, 0])[:, None, None, None]
    brightness = ((r2[:, 1] - 0.5) * 0.1 * 255.0)[:, None, None, None]
    mean = tf.reduce_mean(out, axis=[1, 2, 3], keepdims=True)
    out = (out - mean) * contrast + mean + brightness
    return tf.clip_by_value(out, 0.0, 255.0)


def normalize(images):
    """0..255 -> (x/255 - 0.5)/0.5, i.e. [-1, 1] (contract (a))."""
    return (tf.cast(images, tf.float32) / 255.0 - 0.5) / 0.5


# --------------------------------------------------------------------------- datasets


def _examples(
    files: list[str],
    image_size: int,
    *,
    training: bool,
    deterministic: bool,
    seed: int,
    input_context,
    counter: SkipCounter,
    shuffle_buffer: int,
    compression_type: str,
    frontal_only: bool,
    require_report: bool = True,
    report_order: str = "findings_impression",
):
    """Validated single examples: dict(image [S,S,1] 0..255, labels, class_label, report);
    the report's sections joined in `report_order` (reports.REPORT_ORDERS)."""
    compression = _compression_of(files, compression_type)
    record_shard = None
    if input_context is not None and input_context.num_input_pipelines > 1:
        n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(files) >= n:
            files = files[i::n]
        else:
            record_shard = (n, i)  # fewer files than pipelines: shard records instead
    if compression:
        sizes = [-1] * len(files)
    else:
        sizes = [int(tf.io.gfile.stat(f).length) for f in files]
    fds = tf.data.Dataset.from_tensor_slices((tf.constant(files), tf.constant(sizes, tf.int64)))
    if training and len(files) > 1:
        fds = fds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ordered = deterministic or record_shard is not None
    ds = fds.interleave(
        _file_reader(compression),
        cycle_length=min(len(files), 8),
        block_length=1,
        num_parallel_calls=AUTOTUNE,
        deterministic=ordered,
    )
    if record_shard is not None:
        ds = ds.shard(*record_shard)
        # Sharding may drop this pipeline's last file marker: end the stream with one.
        ds = ds.concatenate(
            tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(True), tf.constant(False)))
        )
    spec = _parse_spec()

    def parse(x):
        r, is_end, corrupt = x
        # Check the proto framing first: a parse_example failure would make TF's kernel
        # log the record bytes (report text); decode_proto errors carry no content.
        top = tf.io.decode_proto(
            tf.reshape(r, [1]), "tensorflow.Example", ["features"], [tf.string]
        )
        feats = tf.strings.reduce_join(top.values[0])
        inner = tf.io.decode_proto(
            tf.reshape(feats, [1]), "tensorflow.Features", ["feature"], [tf.string]
        )
        # A data dependency (a control dependency did not stop parse_single_example, whose
        # kernel logs the whole malformed record, report text included, at WARNING).
        r = tf.strings.join([r, tf.strings.substr(tf.as_string(tf.reduce_sum(inner.sizes)), 0, 0)])
        ex = tf.io.parse_single_example(r, spec)  # end markers carry b"" = an empty Example
        ex["marker"] = is_end
        ex["corrupt"] = corrupt
        return ex

    ds = _counted_try_map(
        ds,
        parse,
        counter,
        "corrupt_record",
        extra_count=lambda ex: tf.cast(ex["corrupt"], tf.int64),
    )
    ds = ds.filter(lambda ex: tf.logical_not(ex["marker"]))

    def pre_check(ex):
        report = reports.join_sections(ex[schema.FINDINGS], ex[schema.IMPRESSION], report_order)
        code = tf.constant(0)
        if require_report:
            code = tf.where(tf.equal(tf.strings.length(report), 0), _CODE["empty_report"], 0)
        if frontal_only:
            frontal = tf.reduce_any(tf.equal(tf.strings.upper(ex[schema.VIEW]), FRONTAL_VIEWS))
            code = tf.where(
                tf.logical_and(tf.equal(code, 0), tf.logical_not(frontal)),
                _CODE["not_frontal"],
                code,
            )
        counter.add_code(code)
        return {
            "image_bytes": ex[schema.IMAGE],
            "height": ex[schema.IMAGE_HEIGHT],
            "width": ex[schema.IMAGE_WIDTH],
            "labels": tf.cast(ex[schema.CHEXPERT], tf.float32),
            "class_label": ex[schema.CLASS_LABEL],
            "report": report,
            "marker": tf.constant(False),
            "code": tf.cast(code, tf.int32),
        }

    ds = ds.map(pre_check, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.filter(lambda x: tf.equal(x["code"], 0))
    if training and shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    end = {
        "image_bytes": tf.constant(b""),
        "height": tf.constant(0, tf.int64),
        "width": tf.constant(0, tf.int64),
        "labels": tf.zeros([schema.NUM_CHEXPERT], tf.float32),
        "class_label": tf.constant(-1, tf.int64),
        "report": tf.constant(""),
        "marker": tf.constant(True),
        "code": tf.constant(0, tf.int32),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(end))

    def decode(x):
        image, code = decode_and_resize(x["image_bytes"], x["height"], x["width"], image_size)
        out = {k: v for k, v in x.items() if k not in ("image_bytes", "height", "width")}
        out["image"] = image
        out["code"] = tf.where(x["marker"], 0, code)
        return out

    ds = _counted_try_map(ds, decode, counter, "bad_image")

    def keep(x):
        counter.add_code(x["code"])
        return tf.logical_and(tf.logical_not(x["marker"]), tf.equal(x["code"], 0))

    ds = ds.filter(keep)
    return ds.map(
        lambda x: {k: x[k] for k in ("image", "labels", "class_label", "report")},
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )


def _options(deterministic: bool, sharded_by_us: bool) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = deterministic
    if sharded_by_us:
        opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return opts


def make_dataset(
    source,
    split: str,
    tokenizer,
    batch_size: int,
    image_size: int = 224,
    training: bool = True,
    augment: bool = True,
    deterministic: bool = False,
    seed: int = 0,
    input_context: tf.distribute.InputContext | None = None,
    repeat: bool | None = None,
    skip_counter: SkipCounter | None = None,
    *,
    shuffle_buffer: int = 2048,
    compression_type: str = "auto",
    frontal_only: bool | None = None,
    report_order: str = "findings_impression",
) -> tf.data.Dataset:
    """Batches of contract (a): image, token_ids, padding_mask, labels.

    `source`: a corpus directory (its manifest names the shards of `split`), a glob, a
    TFRecord path or a list of paths. `batch_size` is GLOBAL when `input_context` is given
    (each pipeline yields `input_context.get_per_replica_batch_size(batch_size)`).
    `tokenizer`: a ReportTokenizer (strings [B] -> ids, mask). Skips are counted in
    `skip_counter` (a fresh one, also set as `dataset.skip_counter`, when None).
    `frontal_only`: None = DataConfig's default (evaluation datasets keep every view).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if frontal_only is None:  # training's one default (a lateral view is not trained on)
        frontal_only = DataConfig.frontal_only
    files = resolve_files(source, split)
    counter = skip_counter if skip_counter is not None else SkipCounter()
    repeat = training if repeat is None else repeat
    per_batch = batch_size
    pipeline_id = 0
    if input_context is not None:
        per_batch = input_context.get_per_replica_batch_size(batch_size)
        pipeline_id = input_context.input_pipeline_id
    ds = _examples(
        files,
        image_size,
        training=training,
        deterministic=deterministic,
        seed=seed,
        input_context=input_context,
        counter=counter,
        shuffle_buffer=shuffle_buffer,
        compression_type=compression_type,
        frontal_only=frontal_only,
        report_order=report_order,
    )
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(
        per_batch, drop_remainder=training, num_parallel_calls=AUTOTUNE, deterministic=True
    )
    do_augment = training and augment
    base = tf.constant([int(seed), int(pipeline_id) * 1_000_003], tf.int64)

    def finish(index, x):
        images = x["image"]
        if do_augment:
            images = _augment(
                images, base + tf.stack([tf.constant(0, tf.int64), index]), image_size
            )
        token_ids, padding_mask = tokenizer(x["report"])
        return {
            "image": normalize(images),
            "token_ids": tf.cast(token_ids, tf.int32),
            "padding_mask": tf.cast(padding_mask, tf.bool),
            "labels": x["labels"],
        }

    ds = ds.enumerate().map(finish, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.prefetch(AUTOTUNE).with_options(_options(deterministic, input_context is not None))
    try:
        ds.skip_counter = counter
    except AttributeError:  # pragma: no cover - dataset classes that refuse attributes
        pass
    return ds


def make_eval_dataset(
    source,
    split: str,
    tokenizer,
    batch_size: int,
    image_size: int = 224,
    with_text: bool = False,
    skip_counter: SkipCounter | None = None,
    *,
    compression_type: str = "auto",
    frontal_only: bool = False,
    require_report: bool = True,
) -> tf.data.Dataset:
    """Unaugmented, ordered, finite batches for evaluation (the last batch may be short).

    Yields dict(image, labels, class_label, token_ids, padding_mask) and, with
    `with_text`, the raw report strings under "report" (for retrieval / generation
    metrics; keep them in memory, never log them). With `tokenizer=None` there are no
    token_ids / padding_mask (image-only consumers, e.g. the raw-pixel baseline).
    `require_report=False` keeps examples without report text (image-only tasks on
    label-only corpora: CheXpert, RSNA, COVIDx, SIIM, Object-CXR); their "report" is "".
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if frontal_only is None:  # training's one default (a lateral view is not trained on)
        frontal_only = DataConfig.frontal_only
    files = resolve_files(source, split)
    counter = skip_counter if skip_counter is not None else SkipCounter()
    ds = _examples(
        files,
        image_size,
        training=False,
        deterministic=True,
        seed=0,
        input_context=None,
        counter=counter,
        shuffle_buffer=0,
        compression_type=compression_type,
        frontal_only=frontal_only,
        require_report=require_report,
    )
    ds = ds.batch(batch_size, drop_remainder=False)

    def finish(x):
        out = {
            "image": normalize(x["image"]),
            "labels": x["labels"],
            "class_label": x["class_label"],
        }
        if tokenizer is not None:
            token_ids, padding_mask = tokenizer(x["report"])
            out["token_ids"] = tf.cast(token_ids, tf.int32)
            out["padding_mask"] = tf.cast(padding_mask, tf.bool)
        if with_text:
            out["report"] = x["report"]
        return out

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)
    ds = ds.with_options(_options(True, False))
    try:
        ds.skip_counter = counter
    except AttributeError:  # pragma: no cover
        pass
    return ds
