"""Export a trained PLACEModel for TF Serving (SavedModel) and for fine-tuning (.keras).

`export_saved_model` writes `<base>/<version>/` in the layout TF Serving watches. The
SavedModel carries its own preprocessing and tokenization, so a client sends encoded image
bytes and raw report text. Signatures (input → outputs, all float32):

  serving_default  images   string [B]  → image_embedding [B,E] (L2-normalised),
                                          observations [B,K,E], attention_maps [B,K,h,w]
  embed_text       reports  string [B]  → text_embedding [B,E], text_observations [B,K,E]
  zero_shot        images   string [B],
                   prompts  string [P]  → logits [B,P] (= logit_scale · cosine, the training
                                          temperature), probabilities [B,P] (softmax over P)
  from_examples    examples string [B]  → as serving_default; serialized tf.Example of
                                          place_tf.data.schema (only image/encoded is read)

Images: PNG (8- or 16-bit) or JPEG, grayscale or RGB, any size. In-graph preprocessing is
the eval input pipeline's own (`preprocess_image_bytes` calls place_tf.data.pipeline):
decode → one grayscale channel → resize the longer side to `image_size` (bilinear,
antialiased, aspect kept) and zero-pad centred → (x/255 - 0.5)/0.5 (16-bit PNG: x/65535).
Bad input never yields a silent zero vector: an undecodable image, a non-PNG/JPEG, an
image with a side under the pipeline's minimum, or one whose header declares more than
`max_image_pixels` pixels (read from the PNG IHDR / JPEG SOF header, so it is never
decoded) raises InvalidArgumentError naming the batch index and the problem. An empty
batch gives empty outputs with the right trailing shapes. Reports longer than the
tokenizer's max_length are truncated (by the tokenizer), never rejected.

Numerics: each signature equals the in-memory Keras model (`encode_image` on
`preprocess_image_bytes` output, `encode_text` on the tokenizer output) within 1e-5
absolute (tests/test_export.py).

The SavedModel's `assets/` holds only `vocab.txt` (the WordPiece vocabulary the model was
trained with: the corpus' or, with a pre-trained text encoder, the checkpoint's; the
tokenizer's casing is part of the graph); report text, ids and configs with paths are not
exported. Images need no checkpoint-specific preprocessing: a pre-trained RGB checkpoint's
normalisation is folded into the patch embedding (place_tf/models/image_encoders.py). Loading it in Python needs
`import tensorflow_text` first (the tokenizer's ops); stock TF Serving links them.

CLI: python -m place_tf.export --model=run/model.keras --vocab=vocab.txt \
       --output=serving/1 [--image_size=224] [--max_image_pixels=50000000]
     (a model trained from a text checkpoint: --text_init=<the run's --text_init>
      [--lowercase_reports] instead of --vocab: the checkpoint's vocabulary and casing)
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid

import tensorflow as tf

from place_tf.data import pipeline, schema

VOCAB_ASSET = "vocab.txt"
SIGNATURES = ("serving_default", "embed_text", "zero_shot", "from_examples")
IMAGE_OUTPUTS = ("image_embedding", "observations", "attention_maps")
TEXT_OUTPUTS = ("text_embedding", "text_observations")
ZERO_SHOT_OUTPUTS = ("logits", "probabilities")
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
_HEADER_BYTES = 26  # PNG: 8 signature + 4 length + "IHDR" + 4 width + 4 height + depth + type

# Per-image status codes of the in-graph validation (rows of the reasons table in
# preprocess_image_batch).
_OK, _BAD_FORMAT, _TOO_LARGE, _UNDECODABLE, _EMPTY, _NO_BYTES, _PIPELINE_REJECTED = range(7)
_PIPELINE_REJECTED_MESSAGE = (
    f"image rejected by the input pipeline's checks (a side under {pipeline.MIN_SIDE} px, "
    f"or a PNG over {pipeline.MAX_PIXELS} pixels)"
)


# ------------------------------------------------------------------ preprocessing


def _header_bytes(image_bytes):
    """First _HEADER_BYTES bytes of a scalar string as uint8 [26] (zero-padded if short)."""
    padded = tf.strings.join([image_bytes, tf.constant(b"\0" * _HEADER_BYTES)])
    return tf.io.decode_raw(tf.strings.substr(padded, 0, _HEADER_BYTES), tf.uint8)


def _is_png(image_bytes):
    return tf.equal(tf.strings.substr(image_bytes, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE)


def _is_jpeg(image_bytes):
    return tf.equal(tf.strings.substr(image_bytes, 0, len(JPEG_SIGNATURE)), JPEG_SIGNATURE)


def _be32(b, start):
    """Big-endian uint32 at b[start:start+4] as int64."""
    v = tf.cast(b[start : start + 4], tf.int64)
    return ((v[0] * 256 + v[1]) * 256 + v[2]) * 256 + v[3]


def _decode_with_code(image_bytes, image_size: int):
    """The training/eval pipeline's own decode (place_tf.data.pipeline) → (float32
    [S, S, 1] in [-1, 1], pipeline validity code; 0 = valid). Stored dims are unknown here
    (0), so the pipeline checks only its minimum side and PNG pixel limit."""
    unknown = tf.constant(0, tf.int64)
    image, code = pipeline.decode_and_resize(image_bytes, unknown, unknown, image_size)
    return pipeline.normalize(image), code


def preprocess_image_bytes(image_bytes, image_size: int):
    """Encoded image (scalar tf.string) → float32 [S, S, 1], exactly as served and as the
    eval input pipeline feeds the model: decode (PNG 8/16-bit or JPEG) → grayscale →
    longer side resized to S (bilinear, antialiased, aspect kept) → centred zero pad →
    (x/255 - 0.5)/0.5 (16-bit: x/65535). Raises InvalidArgumentError for an image the
    pipeline would skip (see `preprocess_image_batch` for the validated batch version).
    """
    image, code = _decode_with_code(image_bytes, image_size)
    check = tf.debugging.Assert(
        tf.equal(code, 0), [tf.constant(_PIPELINE_REJECTED_MESSAGE)], name="check_image"
    )
    with tf.control_dependencies([check]):
        return tf.identity(image)


def _image_header_info(image_bytes):
    """(is PNG or JPEG, height, width) from the header only, without decoding.

    PNG: IHDR width/height at fixed offsets. JPEG: `extract_jpeg_shape` reads the SOF
    marker (a corrupt JPEG header fails there and is reported as undecodable).
    """
    header = _header_bytes(image_bytes)
    is_png = _is_png(image_bytes)
    is_jpeg = _is_jpeg(image_bytes)

    def png_dims():
        return _be32(header, 20), _be32(header, 16)

    def jpeg_dims():
        shape = tf.image.extract_jpeg_shape(image_bytes, output_type=tf.int32)
        return tf.cast(shape[0], tf.int64), tf.cast(shape[1], tf.int64)

    def no_dims():
        return tf.constant(0, tf.int64), tf.constant(0, tf.int64)

    height, width = tf.cond(is_png, png_dims, lambda: tf.cond(is_jpeg, jpeg_dims, no_dims))
    known = tf.logical_or(is_png, is_jpeg)
    return known, height, width


def preprocess_image_batch(
    images, image_size: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, what="images"
):
    """Encoded images tf.string [B] → float32 [B, S, S, 1], validated.

    Each image's header is checked first (PNG or JPEG, non-empty, at most
    `max_image_pixels` pixels — a too-large image is never decoded). Decoding runs in a
    tf.data pipeline with `ignore_errors`, so an image the decoder rejects is identified by
    its batch index instead of failing with the decoder's anonymous message. Any bad image
    raises InvalidArgumentError "`what`[i]: <problem> (n of B images in this batch are bad)".
    """
    images = tf.convert_to_tensor(images, tf.string)
    n = tf.shape(images)[0]
    max_pixels = tf.constant(int(max_image_pixels), tf.int64)

    def one(i, data):
        known, height, width = _image_header_info(data)
        status = tf.where(
            tf.equal(tf.strings.length(data), 0),
            _NO_BYTES,
            tf.where(
                tf.logical_not(known),
                _BAD_FORMAT,
                tf.where(
                    tf.logical_or(height <= 0, width <= 0),
                    _EMPTY,
                    tf.where(height * width > max_pixels, _TOO_LARGE, _OK),
                ),
            ),
        )
        pixels, code = tf.cond(
            tf.equal(status, _OK),
            lambda: _decode_with_code(data, image_size),
            lambda: (tf.zeros([image_size, image_size, 1], tf.float32), tf.constant(0)),
        )
        status = tf.where(tf.not_equal(code, 0), _PIPELINE_REJECTED, status)
        return i, tf.cast(status, tf.int32), height, width, pixels

    ds = tf.data.Dataset.from_tensor_slices((tf.range(n), images))
    ds = ds.map(one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    # A sentinel row makes the dataset exactly one batch even when it is empty or every
    # image was dropped; get_single_element is ~50x cheaper per call than Dataset.reduce.
    sentinel = (
        tf.constant(-1),
        tf.constant(_OK),
        tf.constant(0, tf.int64),
        tf.constant(0, tf.int64),
        tf.zeros([image_size, image_size, 1], tf.float32),
    )
    ds = ds.concatenate(tf.data.Dataset.from_tensors(sentinel)).batch(tf.cast(n + 1, tf.int64))
    idx, status, height, width, pixels = (t[:-1] for t in ds.get_single_element())

    # Images dropped by ignore_errors are the ones the decoder rejected.
    where = idx[:, None]
    status = tf.tensor_scatter_nd_update(tf.fill([n], _UNDECODABLE), where, status)
    height = tf.tensor_scatter_nd_update(tf.zeros([n], tf.int64), where, height)
    width = tf.tensor_scatter_nd_update(tf.zeros([n], tf.int64), where, width)
    bad = tf.cast(tf.where(tf.not_equal(status, _OK))[:, 0], tf.int32)
    num_bad = tf.size(bad)
    first = tf.concat([bad, [0]], 0)[0]  # safe when nothing is bad (message unused then)
    first_status = tf.concat([status, [_OK]], 0)[first]
    h = tf.concat([height, [0]], 0)[first]
    w = tf.concat([width, [0]], 0)[first]
    reasons = tf.stack(
        [
            tf.constant(""),
            tf.constant(
                "not a PNG or JPEG image (unrecognised file signature); send the encoded "
                "PNG/JPEG file bytes"
            ),
            tf.strings.format(
                "image too large: its header declares {}x{} = {} pixels, more than "
                "max_image_pixels={}; it was not decoded",
                (h, w, h * w, max_pixels),
            ),
            tf.constant("corrupt or truncated image data: the PNG/JPEG decoder rejected it"),
            tf.constant("image header declares an empty image (0 width or height)"),
            tf.constant("empty input (0 bytes)"),
            tf.constant(_PIPELINE_REJECTED_MESSAGE),
        ]
    )
    message = tf.strings.join(
        [
            tf.strings.format(what.replace("{", "(").replace("}", ")") + "[{}]: ", first),
            tf.gather(reasons, first_status),
            tf.strings.format(" ({} of {} images in this batch are bad)", (num_bad, n)),
        ]
    )
    check = tf.debugging.Assert(tf.equal(num_bad, 0), [message], name="check_images")
    with tf.control_dependencies([check]):
        return tf.identity(pixels)


# ------------------------------------------------------------------ serving module


def _nonempty(x, filler):
    """`x` if it has rows, else `filler` (one dummy row): the model never sees an empty
    batch; callers slice the outputs back to the true batch size."""
    return tf.cond(tf.shape(x)[0] > 0, lambda: x, lambda: filler)


class PlaceServingModule(tf.Module):
    """The SavedModel root: signature functions, the variables they read, the vocabulary.

    The Keras model and tokenizer are deliberately NOT tracked as children: a Keras 3
    layer under a tf.Module is exported with a second, differently named copy of every
    variable, and the TF1/C++ loader (TF Serving, saved_model_cli) then restores the copy
    while the signatures read the never-initialised originals ("Could not find variable").
    As keras.export.ExportArchive does, the root tracks exactly the tf.Variables (and any
    lookup-table resources) that the traced signatures capture (`track_captures`).
    """

    def __init__(self, model, tokenizer, vocab_file, image_size, max_image_pixels):
        super().__init__(name="place_serving")
        object.__setattr__(self, "_model", model)  # untracked, see the class docstring
        object.__setattr__(self, "_tokenizer", tokenizer)
        self.vocabulary = tf.saved_model.Asset(vocab_file)
        self._image_size = int(image_size)
        self._max_image_pixels = int(max_image_pixels)

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    def track_captures(self, concrete_functions) -> None:
        """Track every variable and resource the traced signatures capture."""
        variables, resources, seen = [], [], set()
        for fn in concrete_functions:
            for v in fn.variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    variables.append(v)
        try:
            descendants = tf.train.TrackableView(self._tokenizer).descendants()
        except TypeError:  # Python 3.13 + wrapt proxies (as in keras.export); tables then
            descendants = []  # missing fail loudly in tf.saved_model.save
        for obj in descendants:
            if isinstance(obj, tf.saved_model.experimental.TrackableResource):
                resources.append(obj)
        self.captured_variables = variables
        self.captured_resources = resources

    # The helpers below are traced inside the signature functions.

    def _embed_pixels(self, pixels):
        n = tf.shape(pixels)[0]
        s = self._image_size
        x = _nonempty(pixels, tf.zeros([1, s, s, 1], pixels.dtype))
        out = self.model.encode_image(x, training=False)
        return {k: tf.cast(out[k], tf.float32)[:n] for k in IMAGE_OUTPUTS}

    def _embed_images(self, images, what="images"):
        pixels = preprocess_image_batch(images, self._image_size, self._max_image_pixels, what)
        return self._embed_pixels(pixels)

    def _embed_reports(self, reports):
        n = tf.shape(reports)[0]
        token_ids, padding_mask = self.tokenizer(_nonempty(reports, tf.constant([""])))
        out = self.model.encode_text(token_ids, padding_mask, training=False)
        return {k: tf.cast(out[k], tf.float32)[:n] for k in TEXT_OUTPUTS}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="images")])
    def serve_images(self, images):
        return self._embed_images(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="reports")])
    def embed_text(self, reports):
        return self._embed_reports(reports)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name="images"),
            tf.TensorSpec([None], tf.string, name="prompts"),
        ]
    )
    def zero_shot(self, images, prompts):
        img = self._embed_images(images)["image_embedding"]
        txt = self._embed_reports(prompts)["text_embedding"]
        scale = tf.cast(self.model.logit_scale, tf.float32)
        logits = scale * tf.matmul(img, txt, transpose_b=True)
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def from_examples(self, examples):
        spec = {
            schema.IMAGE: tf.io.FixedLenFeature([], tf.string, default_value=""),
            schema.VERSION: tf.io.FixedLenFeature(
                [], tf.int64, default_value=schema.SCHEMA_VERSION
            ),
        }
        parsed = tf.io.parse_example(examples, spec)
        versions = parsed[schema.VERSION]
        check = tf.debugging.Assert(
            tf.reduce_all(tf.equal(versions, schema.SCHEMA_VERSION)),
            [
                tf.strings.format(
                    f"examples: {schema.VERSION} must be {schema.SCHEMA_VERSION}, got {{}}",
                    versions,
                )
            ],
            name="check_schema_version",
        )
        with tf.control_dependencies([check]):
            images = tf.identity(parsed[schema.IMAGE])
        return self._embed_images(images, what=f"examples ({schema.IMAGE})")

    def signatures(self) -> dict:
        return {
            "serving_default": self.serve_images.get_concrete_function(),
            "embed_text": self.embed_text.get_concrete_function(),
            "zero_shot": self.zero_shot.get_concrete_function(),
            "from_examples": self.from_examples.get_concrete_function(),
        }


# ------------------------------------------------------------------ export


def _check_compatible(model, tokenizer, image_size: int) -> None:
    """Refuse exports that would serve garbage: wrong image size, token ids beyond the
    embedding table (silently zero on GPU), or more tokens than position embeddings."""
    cfg = getattr(model, "model_config", None)
    if cfg is None:
        return
    if int(cfg.image_size) != int(image_size):
        raise ValueError(
            f"image_size={image_size} but the model was built for "
            f"{cfg.image_size}x{cfg.image_size} images; export with the model's image size"
        )
    if tokenizer.vocabulary_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer's vocabulary has {tokenizer.vocabulary_size} tokens but the model "
            f"embeds only {cfg.vocab_size}; export with the vocabulary used in training"
        )
    if tokenizer.max_length > cfg.max_length:
        raise ValueError(
            f"tokenizer max_length={tokenizer.max_length} exceeds the model's "
            f"max_length={cfg.max_length}"
        )


def _split_version_dir(export_dir: str, require_version: bool = True) -> tuple[str, str]:
    export_dir = export_dir.rstrip("/")
    base, version = os.path.split(export_dir)
    if require_version and not version.isdigit():
        raise ValueError(
            f"export_dir must end in an integer version directory (<base>/<version>, as TF "
            f"Serving expects), got {export_dir!r}"
        )
    return base or ".", version


def next_version_dir(base: str) -> str:
    """`<base>/<1 + the largest integer version in base>` (`<base>/1` if none): where a
    re-run (e.g. a resumed training) exports without touching served versions."""
    versions = [int(d.rstrip("/")) for d in _listdir(base) if d.rstrip("/").isdigit()]
    return os.path.join(base, str(max(versions, default=0) + 1))


def _listdir(path: str) -> list:
    return tf.io.gfile.listdir(path) if tf.io.gfile.isdir(path) else []


def export_saved_model(
    model,
    tokenizer,
    export_dir: str,
    image_size: int = 224,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    require_version: bool = True,
) -> str:
    """Write the TF Serving SavedModel to `export_dir` (= `<base>/<integer version>`).

    `require_version=False` accepts any new directory name (TFX's `Format-Serving`, which
    Pusher later copies into a versioned serving directory).

    Written to a hidden temporary directory beside it and renamed into place, so TF Serving
    (which polls `<base>`) never sees a half-written version. An existing version is never
    overwritten (FileExistsError): versions are immutable once served. Returns export_dir.
    """
    base, version = _split_version_dir(export_dir, require_version)
    export_dir = os.path.join(base, version)
    if not require_version and tf.io.gfile.isdir(export_dir) and not _listdir(export_dir):
        tf.io.gfile.rmtree(export_dir)  # an empty directory prepared by the orchestrator
    if tf.io.gfile.exists(export_dir):
        raise FileExistsError(
            f"SavedModel version directory {export_dir!r} already exists; refusing to "
            "overwrite a (possibly served) version. Export to a new version number."
        )
    _check_compatible(model, tokenizer, image_size)
    if max_image_pixels <= 0:
        raise ValueError(f"max_image_pixels must be positive, got {max_image_pixels}")
    tf.io.gfile.makedirs(base)
    tmp_dir = os.path.join(base, f".tmp-{version}-{uuid.uuid4().hex}")  # not an integer
    try:
        with tempfile.TemporaryDirectory() as vocab_dir:
            vocab_file = os.path.join(vocab_dir, VOCAB_ASSET)
            with open(vocab_file, "w", encoding="utf-8") as f:
                f.write("\n".join(tokenizer.get_vocabulary()) + "\n")
            module = PlaceServingModule(model, tokenizer, vocab_file, image_size, max_image_pixels)
            signatures = module.signatures()
            module.track_captures(signatures.values())
            tf.saved_model.save(module, tmp_dir, signatures=signatures)
        assets = sorted(tf.io.gfile.listdir(os.path.join(tmp_dir, "assets")))
        if assets != [VOCAB_ASSET]:
            raise RuntimeError(
                f"unexpected SavedModel assets {assets}; only {VOCAB_ASSET!r} may be "
                "exported (check what the model/tokenizer track)"
            )
        tf.io.gfile.rename(tmp_dir, export_dir, overwrite=False)
    except BaseException:
        if tf.io.gfile.exists(tmp_dir):
            tf.io.gfile.rmtree(tmp_dir)
        raise
    return export_dir


def export_keras(model, path: str) -> str:
    """Save the full model (config + weights) as a `.keras` archive for fine-tuning;
    written beside `path` and renamed over it atomically. Returns path."""
    if not path.endswith(".keras"):
        raise ValueError(f"a Keras archive path must end in .keras, got {path!r}")
    parent = os.path.dirname(path) or "."
    tf.io.gfile.makedirs(parent)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}.keras")
    try:
        model.save(tmp)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except BaseException:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise
    return path


# ------------------------------------------------------------------ CLI


def _define_flags():
    from absl import flags

    flags.DEFINE_string("model", None, "path to the trained model (.keras)")
    flags.DEFINE_string("vocab", None, "WordPiece vocabulary (vocab.txt) used in training")
    flags.DEFINE_string(
        "text_init",
        None,
        "the run's --text_init: its tokenizer (vocabulary, casing) instead of --vocab",
    )
    flags.DEFINE_bool(
        "lowercase_reports", False, "the run's --lowercase_reports (with --text_init)"
    )
    flags.DEFINE_string("output", None, "SavedModel directory <base>/<integer version>")
    flags.DEFINE_integer("image_size", 0, "input size; 0 = the model's configured size")
    flags.DEFINE_integer(
        "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, "reject images with more pixels"
    )
    flags.DEFINE_integer("max_length", 0, "report tokens; 0 = the model's max_length")
    for name in ("model", "output"):
        flags.mark_flag_as_required(name)
    flags.mark_flags_as_mutual_exclusive(["vocab", "text_init"], required=True)


def main(argv) -> int:
    import keras
    from absl import app, flags, logging

    import place_tf.models.place_model  # noqa: F401  (registers the serializable classes)
    from place_tf.config import DataConfig
    from place_tf.data.tokenizer import ReportTokenizer, report_tokenizer

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not tf.io.gfile.exists(f.model):
        raise app.UsageError(f"--model: no such file {f.model!r}")
    model = keras.saving.load_model(f.model, safe_mode=True)
    cfg = model.model_config
    try:
        max_length = f.max_length or cfg.max_length
        if f.text_init:
            data = DataConfig(max_length=max_length, lowercase_reports=f.lowercase_reports)
            tokenizer = report_tokenizer(data, f.text_init)
        else:
            tokenizer = ReportTokenizer(f.vocab, max_length=max_length)
        out = export_saved_model(
            model,
            tokenizer,
            f.output,
            image_size=f.image_size or cfg.image_size,
            max_image_pixels=f.max_image_pixels,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"place_tf.export: error: {e}", file=sys.stderr)
        return 1
    logging.info("wrote SavedModel %s", out)
    print(out)
    return 0


if __name__ == "__main__":
    from absl import app

    _define_flags()
    sys.exit(app.run(main))
