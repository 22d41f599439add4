"""tf.data readers and encoder plumbing for the dense downstream tasks.

Segmentation, detection and report generation need fields the pre-training pipeline does
not carry (masks, boxes, the report as a generation target), so they read the schema
(place_tf/data/schema.py) here. One geometry rules all of them: the image is decoded to
one channel, resized with padding to S×S (aspect kept, centred) and normalised as
(x/255 - 0.5)/0.5 (contract (a)) exactly as place_tf.data.pipeline does for pre-training
(same decode, same rounding, same antialiased bilinear resize). Masks go through the
*same* resize-with-pad, so mask pixel (i, j) lies under image pixel (i, j); boxes are
mapped into the padded image's normalised coordinates with `pad_geometry`, the one
function that fixes the resized size and the padding offsets.

`TaskFeatures` is how every task reads the encoder: the patch tokens of
`model.encode_image` as a [B, g, g, W] grid (plus the ResNet's stride-4/8 stages for a
U-Net), frozen (stop-gradient, inference mode) or fine-tuned; fine-tuning snapshots the
encoder weights and `restore()` puts them back, so an evaluation leaves the model as it
found it.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from place_tf.data import manifest, schema
from place_tf.data.pipeline import decode_gray, pad_geometry, resize_with_pad

log = logging.getLogger(__name__)

# Dataset functions use explicit tf.cond / tf.map_fn: autograph would only cost trace time.
_nc = tf.autograph.experimental.do_not_convert

_KEYS = (
    schema.IMAGE,
    schema.IMAGE_ID,
    schema.FINDINGS,
    schema.IMPRESSION,
    schema.BOXES,
    schema.BOX_LABELS,
    schema.MASKS,
    schema.MASK_LABELS,
)


# ------------------------------------------------------------------ geometry
def boxes_to_padded(boxes, height, width, image_size: int):
    """Normalised [xmin, ymin, xmax, ymax] boxes of an H×W image -> same boxes, normalised,
    in the S×S image that resize_with_pad makes of it. boxes [M, 4] -> [M, 4] float32."""
    boxes = tf.cast(tf.reshape(boxes, [-1, 4]), tf.float32)
    nh, nw, top, left = (tf.cast(v, tf.float32) for v in pad_geometry(height, width, image_size))
    s = float(image_size)
    x = (left + boxes[:, 0::2] * nw) / s  # xmin, xmax
    y = (top + boxes[:, 1::2] * nh) / s  # ymin, ymax
    return tf.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=-1)


def preprocess_image(encoded, image_size: int):
    """PNG/JPEG bytes -> (image [S, S, 1] float32 in [-1, 1], height, width of the stored image)."""
    gray = decode_gray(encoded)
    shape = tf.shape(gray)
    out = tf.clip_by_value(resize_with_pad(gray, image_size), 0.0, 255.0)
    out = (out / 255.0 - 0.5) / 0.5
    out = tf.reshape(out, [image_size, image_size, 1])
    return out, shape[0], shape[1]


def resize_mask_with_pad(mask, image_size: int):
    """Binary mask [H, W, C] (any numeric type, nonzero = foreground) -> float32 {0, 1}
    [S, S, C] with the image's resize-with-pad geometry (bilinear, then >= 0.5)."""
    m = tf.cast(tf.cast(mask, tf.float32) > 0, tf.float32)
    m = resize_with_pad(m, image_size)
    return tf.cast(m >= 0.5, tf.float32)


# ------------------------------------------------------------------ reading
def _parse(serialized):
    spec = schema.feature_spec()
    ex = tf.io.parse_single_example(serialized, {k: spec[k] for k in _KEYS})
    for k in (schema.BOXES, schema.BOX_LABELS, schema.MASKS, schema.MASK_LABELS):
        ex[k] = tf.sparse.to_dense(ex[k])
    return ex


def read_examples(data_dir: str, split: str, ids: Sequence[str] | None = None) -> tf.data.Dataset:
    """Parsed examples of one split in shard order (dicts keyed by schema names);
    `ids`: keep only these image ids (None: all)."""
    files = manifest.split_files(data_dir, split)
    if not files:
        raise ValueError(f"{data_dir}: split {split!r} has no shards")
    ds = tf.data.TFRecordDataset(files).map(_nc(_parse), num_parallel_calls=tf.data.AUTOTUNE)
    if ids is not None:
        ids = sorted(set(ids))
        if not ids:
            raise ValueError(f"{data_dir}: empty id subset for split {split!r}")
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(ids), tf.ones([len(ids)], tf.int32), tf.string, tf.int32
            ),
            default_value=0,
        )
        ds = ds.filter(_nc(lambda ex: table.lookup(ex[schema.IMAGE_ID]) > 0))
    return ds


def _label_vector(labels: Sequence[int] | None):
    """[14] int32 map CheXpert index -> position in `labels` (-1 when not selected)."""
    table = np.full([schema.NUM_CHEXPERT], -1, np.int32)
    for pos, lab in enumerate(labels if labels is not None else range(schema.NUM_CHEXPERT)):
        table[int(lab)] = pos if labels is not None else 0
    return tf.constant(table)


def _check_counts(ex, values_key, labels_key, per_label: int):
    """Assert op: len(values) == per_label * len(labels); the error names fields and image id."""
    ok = tf.equal(tf.size(ex[values_key]), tf.size(ex[labels_key]) * per_label)
    return tf.debugging.Assert(
        ok,
        [
            f"schema error: {values_key} has a count that does not match {labels_key} "
            f"({per_label} per label) in the example with image id",
            ex[schema.IMAGE_ID],
        ],
    )


def decode_masks(ex, image_size: int, labels: Sequence[int] | None = None, union: bool = True):
    """Masks of one parsed example -> float32 {0,1} [S, S, C] aligned with its image.

    union=True: C = 1, the union of the masks whose label is in `labels` (None: any label);
    union=False: C = len(labels), channel c the union of the masks of labels[c].
    """
    if not union and labels is None:
        raise ValueError("decode_masks: per-label masks (union=False) need `labels`")
    channels = 1 if union else len(labels)
    image, height, width = preprocess_image(ex[schema.IMAGE], image_size)
    with tf.control_dependencies([_check_counts(ex, schema.MASKS, schema.MASK_LABELS, 1)]):
        lab_pos = tf.gather(_label_vector(labels), tf.cast(ex[schema.MASK_LABELS], tf.int32))
    keep = lab_pos >= 0
    encoded = tf.boolean_mask(ex[schema.MASKS], keep)
    channel = tf.boolean_mask(lab_pos, keep)
    if union:
        channel = tf.zeros_like(channel)

    def one(args):
        png, c = args
        m = tf.io.decode_image(png, channels=1, dtype=tf.uint8, expand_animations=False)
        m.set_shape([None, None, 1])
        # A mask stored at another size than its image is stretched onto the image.
        m = tf.image.resize(tf.cast(m > 0, tf.float32), [height, width], method="nearest")
        return m * tf.reshape(tf.one_hot(c, channels), [1, 1, channels])

    def decoded():
        ms = tf.map_fn(
            one,
            (encoded, channel),
            fn_output_signature=tf.TensorSpec([None, None, channels], tf.float32),
        )
        return tf.reduce_max(ms, axis=0)

    full = tf.cond(
        tf.size(encoded) > 0, decoded, lambda: tf.zeros([height, width, channels], tf.float32)
    )
    mask = resize_mask_with_pad(full, image_size)
    mask.set_shape([image_size, image_size, channels])
    return image, mask


def decode_boxes(ex, image_size: int, labels: Sequence[int]):
    """Boxes of one parsed example -> (image [S,S,1], boxes [M,4] in padded normalised
    coords, classes [M] int32 = position of the box label in `labels`; other labels dropped)."""
    image, height, width = preprocess_image(ex[schema.IMAGE], image_size)
    with tf.control_dependencies([_check_counts(ex, schema.BOXES, schema.BOX_LABELS, 4)]):
        boxes = tf.reshape(ex[schema.BOXES], [-1, 4])
    pos = tf.gather(_label_vector(labels), tf.cast(ex[schema.BOX_LABELS], tf.int32))
    keep = pos >= 0
    boxes = boxes_to_padded(tf.boolean_mask(boxes, keep), height, width, image_size)
    return image, boxes, tf.boolean_mask(pos, keep)


def segmentation_dataset(
    data_dir: str,
    split: str,
    image_size: int,
    labels: Sequence[int] | None = None,
    union: bool = True,
    ids: Sequence[str] | None = None,
) -> tf.data.Dataset:
    """(image [S,S,1], mask [S,S,C]) per example; see decode_masks for labels/union."""
    return read_examples(data_dir, split, ids).map(
        _nc(lambda ex: decode_masks(ex, image_size, labels, union)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def detection_dataset(
    data_dir: str,
    split: str,
    image_size: int,
    labels: Sequence[int],
    ids: Sequence[str] | None = None,
) -> tf.data.Dataset:
    """dict(image [S,S,1], boxes [M,4] padded normalised xyxy, classes [M] int32) per example."""
    if not labels:
        raise ValueError("detection_dataset: no box labels selected")

    def fn(ex):
        image, boxes, classes = decode_boxes(ex, image_size, labels)
        return {"image": image, "boxes": boxes, "classes": classes}

    return read_examples(data_dir, split, ids).map(_nc(fn), num_parallel_calls=tf.data.AUTOTUNE)


def report_dataset(
    data_dir: str,
    split: str,
    image_size: int,
    tokenizer,
    ids: Sequence[str] | None = None,
) -> tf.data.Dataset:
    """dict(image, token_ids, padding_mask) for examples with a non-empty report
    (FINDINGS + IMPRESSION, contract (b) tokenizer); unbatched."""

    def fn(ex):
        image, _, _ = preprocess_image(ex[schema.IMAGE], image_size)
        text = schema.report_text(ex[schema.FINDINGS], ex[schema.IMPRESSION])
        return {"image": image, "report": text}

    def tok(batch):
        ids_, mask = tokenizer(batch["report"])
        return {"image": batch["image"], "token_ids": ids_, "padding_mask": mask}

    ds = read_examples(data_dir, split, ids).filter(_nc(_has_report))
    ds = ds.map(_nc(fn), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(64).map(_nc(tok)).unbatch()


# ------------------------------------------------------------------ corpus facts
def annotation_counts(data_dir: str, split: str, kind: str) -> Counter:
    """{CheXpert index: number of images with >= 1 annotation of it}; kind "mask" or "box"."""
    if kind not in ("mask", "box"):
        raise ValueError(f"annotation kind must be 'mask' or 'box', got {kind!r}")
    key = schema.MASK_LABELS if kind == "mask" else schema.BOX_LABELS
    spec = {key: schema.feature_spec()[key]}
    counts: Counter = Counter()
    ds = tf.data.TFRecordDataset(manifest.split_files(data_dir, split))
    for s in ds.batch(256).map(_nc(lambda b: tf.io.parse_example(b, spec)[key])):
        dense = tf.sparse.to_dense(s, default_value=-1).numpy()
        for row in dense:
            counts.update({int(v) for v in row if v >= 0})
    return counts


def resolve_labels(spec, data_dir: str, kind: str, split: str = "train") -> list[int]:
    """CheXpert indices from a label spec: "auto" (every label annotated in `split`, most
    images first), a name, a comma-separated string of names, or a list of names/indices."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("auto", "", "all")):
        counts = annotation_counts(data_dir, split, kind)
        if not counts:
            raise ValueError(f"{data_dir}: split {split!r} has no {kind} annotations")
        return [lab for lab, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for it in items:
        if isinstance(it, int | np.integer):
            if not 0 <= int(it) < schema.NUM_CHEXPERT:
                raise ValueError(f"label index {it} is not a CheXpert index")
            out.append(int(it))
        else:
            out.append(schema.label_index(str(it).strip()))
    if len(set(out)) != len(out):
        raise ValueError(f"label spec {spec!r} names a label twice")
    return out


def fraction_ids(data_dir: str, fraction: float, seed: int = 0, split: str = "train"):
    """Training image ids for a label fraction (None for 1.0 = everything).

    Uses the corpus' split file (<corpus>/splits/train_<pct>pct.txt) when present, so
    every task and framework trains on the same images; otherwise the same seeded
    selection as place_tf.data.splits, computed on the fly.
    """
    from place_tf.data import splits

    fraction = 1.0 if fraction is None else float(fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction} must be in (0, 1]")
    if fraction >= 1.0:
        return None
    path = os.path.join(data_dir, splits.SPLITS_DIR, splits.split_file_name(fraction, split))
    if os.path.exists(path):
        ids = splits.load_split_ids(path)
        log.info("label fraction %s: %d ids from %s", fraction, len(ids), os.path.basename(path))
        return ids
    examples = splits.read_split_examples(data_dir, split)
    if not examples:
        raise ValueError(f"{data_dir}: split {split!r} has no examples to subsample")
    ids = splits.label_fraction_subsets(examples, [fraction], seed=seed)[fraction]
    log.info("label fraction %s (seed %d): %d of %d ids", fraction, seed, len(ids), len(examples))
    return ids


def _has_report(ex):
    text = schema.report_text(ex[schema.FINDINGS], ex[schema.IMPRESSION])
    return tf.strings.length(text) > 0


class NoReportTextError(ValueError):
    """A task that needs report text was given a corpus (split) that has none."""


def has_report_text(data_dir: str, split: str) -> bool:
    """True if any example of `split` has FINDINGS or IMPRESSION text (stops at the first;
    reads only the text features)."""
    spec = {k: schema.feature_spec()[k] for k in (schema.FINDINGS, schema.IMPRESSION)}
    ds = tf.data.TFRecordDataset(manifest.split_files(data_dir, split))
    ds = ds.map(_nc(lambda s: tf.io.parse_single_example(s, spec))).filter(_nc(_has_report))
    return any(True for _ in ds.take(1))


def require_report_text(data_dir: str, split: str, task: str) -> None:
    """NoReportTextError naming the corpus, its source and `task` when `split` has no
    report text (label-only corpora: CheXpert, RSNA, COVIDx, SIIM, Object-CXR)."""
    if has_report_text(data_dir, split):
        return
    source = manifest.read_manifest(data_dir).get("source", "?")
    raise NoReportTextError(
        f"{data_dir} (source {source!r}): split {split!r} has no report text, and {task} "
        "needs reports (FINDINGS/IMPRESSION). It is a label-only corpus: use it for linear, "
        "finetune, zero_shot, segmentation or detection; for report tasks convert a corpus "
        "with reports (mimic, generic with a report column, r2gen)"
    )


def count_examples(data_dir: str, split: str, ids=None, require_report: bool = False) -> int:
    """Examples of a split (optionally an id subset / only those with a report), counted
    without decoding images."""
    ds = read_examples(data_dir, split, ids)
    if require_report:
        ds = ds.filter(_nc(_has_report))
    return int(ds.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))


CACHE_LIMIT_BYTES = 1 << 30


def maybe_cache(ds, num_examples: int, bytes_per_example: int, limit: int = CACHE_LIMIT_BYTES):
    """ds.cache() in memory when it fits in `limit` bytes, else ds (decoded every epoch)."""
    if num_examples * bytes_per_example <= limit:
        return ds.cache()
    log.info("not caching %d decoded examples (> %d MiB)", num_examples, limit >> 20)
    return ds


def shuffle_buffer(num_examples: int) -> int:
    return max(1, min(num_examples, 1024))


def has_split(data_dir: str, split: str) -> bool:
    """True if the manifest lists `split` with at least one example."""
    info = manifest.read_manifest(data_dir)["splits"].get(split)
    return bool(info and info.get("examples", 0) > 0)


# ------------------------------------------------------------------ encoder plumbing
class TaskFeatures:
    """The encoder as a downstream task reads it (see module docstring).

    call(images, training) -> (grid [B, g, g, W], skips) where skips is a list of
    higher-resolution feature maps, coarse to fine (ResNet: stride 8 then stride 4;
    empty for a ViT). `with_skips=False` never builds them.
    """

    def __init__(self, model, finetune: bool = False, with_skips: bool = False):
        self.model = model
        self.finetune = bool(finetune)
        mc = getattr(model, "model_config", None)
        self.kind = getattr(mc, "image_encoder", "vit")
        self.image_size = int(getattr(mc, "image_size", 0))
        self.encoder = getattr(model, "image_encoder", None)
        self._pyramid = None
        if with_skips and self.kind == "resnet50" and hasattr(self.encoder, "features"):
            self._pyramid = self._resnet_pyramid(self.encoder)
        self._snapshot = None
        if self.finetune:
            self._snapshot = [np.array(v.numpy()) for v in self.encoder_weights()]

    @staticmethod
    def _resnet_pyramid(encoder):
        """keras.Model images -> [P3 (stride 8), P2 (stride 4), P4 (stride 16)], sharing
        the encoder's layers (keras_hub ResNet names its block outputs stackS_blockB_out)."""
        import keras

        feats = encoder.features
        names = [ly.name for ly in feats.layers]

        def last_of(stack):
            cands = [n for n in names if n.startswith(f"stack{stack}_block") and n.endswith("_out")]
            if not cands:
                raise ValueError(f"ResNet encoder has no stack{stack} block outputs")
            return max(cands, key=lambda n: int(n.split("_block")[1].split("_")[0]))

        outs = [feats.get_layer(last_of(1)).output, feats.get_layer(last_of(0)).output]
        return keras.Model(feats.inputs, outs + [feats.outputs[0]], name="resnet_pyramid")

    def encoder_weights(self):
        src = self.encoder if self.encoder is not None else self.model
        return list(src.weights)

    def trainable_variables(self):
        """Encoder variables to fine-tune ([] when frozen)."""
        if not self.finetune:
            return []
        src = self.encoder if self.encoder is not None else self.model
        return list(src.trainable_variables)

    def restore(self):
        """Put back the encoder weights saved at construction (fine-tuning only)."""
        if self._snapshot is not None:
            for v, value in zip(self.encoder_weights(), self._snapshot, strict=True):
                v.assign(value)

    def shapes(self):
        """((1, g, g, W), [skip shapes]) without running the encoder (static shapes)."""
        enc = self.encoder
        if enc is not None and hasattr(enc, "grid_size") and hasattr(enc, "token_dim"):
            g, w = int(enc.grid_size), int(enc.token_dim)
            skips = []
            if self._pyramid is not None:
                skips = [(1, *tuple(o.shape[1:])) for o in self._pyramid.outputs[:2]]
            return (1, g, g, w), skips
        grid, skips = self(tf.zeros([1, self.image_size, self.image_size, 1]))
        return tuple(grid.shape), [tuple(s.shape) for s in skips]

    def image_spec(self, image_size: int):
        return tf.TensorSpec([None, image_size, image_size, 1], tf.float32)

    def tokens(self, images, training=False):
        """Patch tokens [B, N, W] (stop-gradient unless fine-tuning)."""
        train = bool(training) and self.finetune
        out = self.model.encode_image(images, training=train)["patch_tokens"]
        return out if self.finetune else tf.stop_gradient(out)

    def __call__(self, images, training=False):
        train = bool(training) and self.finetune
        skips = []
        if self._pyramid is not None:
            p3, p2, p4 = self._pyramid(images, training=train)
            g = p4.shape[1]
            tokens = self.encoder.token_projection(tf.reshape(p4, [-1, g * g, p4.shape[-1]]))
            skips = [p3, p2]
        else:
            tokens = self.model.encode_image(images, training=train)["patch_tokens"]
        n, w = tokens.shape[1], tokens.shape[2]
        g = math.isqrt(int(n))
        if g * g != n:
            raise ValueError(f"patch_tokens has {n} tokens: not a square grid")
        grid = tf.reshape(tokens, [-1, g, g, w])
        if not self.finetune:
            grid = tf.stop_gradient(grid)
            skips = [tf.stop_gradient(s) for s in skips]
        return grid, skips


def check_image_size(model, image_size) -> int:
    """The evaluation image size: the model's own (a ViT cannot take another)."""
    mc = getattr(model, "model_config", None)
    own = int(getattr(mc, "image_size", 0) or 0)
    if image_size in (None, 0):
        if not own:
            raise ValueError("image_size not given and the model has no model_config.image_size")
        return own
    if own and int(image_size) != own:
        raise ValueError(f"image_size {image_size} differs from the model's image_size {own}")
    return int(image_size)
