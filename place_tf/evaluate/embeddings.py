"""Shared plumbing of the evaluation tasks: load a model, its tokenizer, a random-init twin,
and frozen embeddings of a corpus split as NumPy arrays.

A model is given as
- a `.keras` file (PLACEModel saved by the trainer or by export), or
- a training run directory (`model_dir` with `run_info.json` and `checkpoints/`): the
  PLACEModel is rebuilt from the recorded configs and the latest readable checkpoint is
  restored (a run that was stopped before writing model.keras can still be evaluated);
  a run directory without checkpoints but with `model.keras` loads that file.

Embeddings are computed once per split in inference mode (training=False) and kept as
NumPy; every task then works on arrays, so a sweep over label fractions or prompts costs
no further encoder passes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import weakref

import numpy as np

log = logging.getLogger(__name__)

IMAGE_OUTPUTS = ("image_embedding", "image_features", "observations", "attention_maps")
TEXT_OUTPUTS = ("text_embedding", "text_observations", "text_features")


# ------------------------------------------------------------------ loading
def read_run_info(path: str) -> dict | None:
    """run_info.json of a run directory, or of the directory holding a .keras file; else None."""
    from place_tf.training import run_dir

    return run_dir.read_run_info(path)


def load_model(path: str):
    """PLACEModel from a .keras file or a run directory (see module docstring)."""
    from place_tf.models import factory

    return factory.load_model(path)


def load_tokenizer(model, model_path: str = "", data_dir: str = "", vocab_file: str = ""):
    """ReportTokenizer matching `model`: vocabulary from `vocab_file`, else the run's recorded
    vocab_file, else `<data_dir>/vocab.txt`; max_length from the model config."""
    from place_tf.data import tokenizer as tok

    candidates = [vocab_file]
    info = read_run_info(model_path) if model_path else None
    text_init = (info or {}).get("configs", {}).get("model", {}).get("text_init", "")
    if text_init and not vocab_file:
        # Trained from a text checkpoint: its vocabulary and casing, as in training.
        from place_tf.config import DataConfig, from_dict

        data_cfg = from_dict(DataConfig, info["configs"].get("data", {}))
        data_cfg = dataclasses.replace(data_cfg, max_length=model.model_config.max_length)
        return tok.report_tokenizer(data_cfg, text_init)
    if info:
        candidates.append(info.get("configs", {}).get("data", {}).get("vocab_file", ""))
        run_corpus = info.get("configs", {}).get("data", {}).get("corpus_dir", "")
        if run_corpus:
            candidates.append(os.path.join(run_corpus, "vocab.txt"))
    if data_dir:
        candidates.append(os.path.join(data_dir, "vocab.txt"))
    path = next((c for c in candidates if c and os.path.exists(c)), None)
    if path is None:
        raise FileNotFoundError(
            f"no vocabulary found (tried {[c for c in candidates if c]}); pass vocab_file"
        )
    vocab = tok.load_vocabulary(path)
    mc = model.model_config
    if len(vocab) > mc.vocab_size:
        raise ValueError(
            f"vocabulary {path} has {len(vocab)} tokens but the model's embedding table has "
            f"{mc.vocab_size}: it is not the vocabulary the model was trained with"
        )
    if len(vocab) != mc.vocab_size:
        log.warning(
            "vocabulary %s has %d tokens, model vocab_size is %d", path, len(vocab), mc.vocab_size
        )
    return tok.ReportTokenizer(vocab, max_length=mc.max_length)


def image_size_of(model) -> int:
    return int(model.model_config.image_size)


# ------------------------------------------------------------------ extraction
_ENCODER_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encoder_fns(model, image_keys=("image_embedding",), text_keys=()):
    """(image fn, text fn): tf.functions returning the requested encoder outputs (inference).

    Cached per model and key set, so successive splits reuse one trace. The functions
    hold the model weakly (the cache must not keep a model alive).
    """
    import tensorflow as tf

    key = (tuple(image_keys), tuple(text_keys))
    per_model = _ENCODER_CACHE.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    ref = weakref.ref(model)
    # Fixed signatures (any batch size, the model's image size): one trace per function,
    # whatever the batch, split or caller (tf.data tensors or NumPy arrays).
    mc = model.model_config
    image_spec = tf.TensorSpec([None, mc.image_size, mc.image_size, 1], tf.float32)
    text_spec = tf.TensorSpec([None, None], tf.int32)
    mask_spec = tf.TensorSpec([None, None], tf.bool)

    @tf.function(input_signature=[image_spec], autograph=False)
    def image_fn(images):
        out = ref().encode_image(images, training=False)
        return {k: out[k] for k in key[0]}

    @tf.function(input_signature=[text_spec, mask_spec], autograph=False)
    def text_fn(token_ids, padding_mask):
        out = ref().encode_text(token_ids, padding_mask, training=False)
        return {k: out[k] for k in key[1]}

    def enc_image(images):
        return image_fn(tf.cast(images, tf.float32))

    def enc_text(token_ids, padding_mask):
        return text_fn(tf.cast(token_ids, tf.int32), tf.cast(padding_mask, tf.bool))

    enc_image.tf_function, enc_text.tf_function = image_fn, text_fn
    per_model[key] = (enc_image, enc_text)
    return enc_image, enc_text


def extract(
    model,
    data_dir: str,
    split: str,
    tokenizer,
    image_size: int | None = None,
    batch_size: int = 64,
    image_outputs: tuple[str, ...] = ("image_embedding", "image_features"),
    text_outputs: tuple[str, ...] = (),
    with_reports: bool = False,
    with_images: bool = False,
    max_examples: int = 0,
) -> dict:
    """Frozen encoder outputs of every example of `split`, in the corpus order, as NumPy.

    Returns {"labels" [N, 14] float32, "class_label" [N] int64, each requested output
    (e.g. "image_embedding" [N, E], "attention_maps" [N, K, h, w], "text_embedding" [N, E]),
    optionally "report" (list[str], never logged) and "image" [N, S, S, 1],
    "image_id" (list[str], or None when ids cannot be aligned)}.

    Examples without report text are kept unless text is asked for (`text_outputs` or
    `with_reports`), so image-only tasks run on label-only corpora (CheXpert, RSNA, ...).
    """
    from place_tf.data import pipeline

    image_size = image_size or image_size_of(model)
    unknown = set(image_outputs) - set(IMAGE_OUTPUTS) | set(text_outputs) - set(TEXT_OUTPUTS)
    if unknown:
        raise ValueError(f"unknown encoder outputs {sorted(unknown)}")
    needs_text = bool(text_outputs) or with_reports
    if needs_text:
        from place_tf.evaluate import task_data

        task_data.require_report_text(data_dir, split, "text embeddings")
    ds = pipeline.make_eval_dataset(
        data_dir,
        split,
        tokenizer,
        batch_size=batch_size,
        image_size=image_size,
        with_text=with_reports,
        require_report=needs_text,
    )
    enc_image, enc_text = encoder_fns(model, tuple(image_outputs), tuple(text_outputs))
    parts: dict[str, list] = {}
    n = 0
    for batch in ds:
        if image_outputs:
            for k, v in enc_image(batch["image"]).items():
                parts.setdefault(k, []).append(v.numpy())
        if text_outputs:
            for k, v in enc_text(batch["token_ids"], batch["padding_mask"]).items():
                parts.setdefault(k, []).append(v.numpy())
        parts.setdefault("labels", []).append(batch["labels"].numpy().astype(np.float32))
        if "class_label" in batch:
            parts.setdefault("class_label", []).append(
                batch["class_label"].numpy().astype(np.int64)
            )
        if with_images:
            parts.setdefault("image", []).append(batch["image"].numpy())
        if with_reports:
            parts.setdefault("report", []).append(
                [
                    r.decode("utf-8") if isinstance(r, bytes) else str(r)
                    for r in batch["report"].numpy()
                ]
            )
        if "image_id" in batch:
            parts.setdefault("image_id", []).append(
                [i.decode("utf-8") for i in batch["image_id"].numpy()]
            )
        n += int(batch["labels"].shape[0])
        if max_examples and n >= max_examples:
            break
    if not parts:
        raise ValueError(f"{data_dir}: split {split!r} has no examples")
    out: dict = {}
    for k, v in parts.items():
        out[k] = sum(v, []) if k in ("report", "image_id") else np.concatenate(v, axis=0)
    if max_examples:
        out = {k: v[:max_examples] for k, v in out.items()}
    if "class_label" not in out:
        out["class_label"] = np.full(len(out["labels"]), -1, np.int64)
    if "image_id" not in out:
        out["image_id"] = _aligned_image_ids(
            data_dir, split, out["labels"], out["class_label"], needs_text
        )
    return out


def encode_images(
    model, images: np.ndarray, outputs=("image_embedding",), batch_size: int = 64
) -> dict:
    """encode_image outputs for an in-memory image array [N, S, S, 1] (already normalised)."""
    enc_image, _ = encoder_fns(model, tuple(outputs), ())
    parts: dict[str, list] = {k: [] for k in outputs}
    for i in range(0, len(images), batch_size):
        for k, v in enc_image(images[i : i + batch_size]).items():
            parts[k].append(v.numpy())
    return {k: np.concatenate(v, axis=0) if v else np.zeros((0,)) for k, v in parts.items()}


def read_rows_in_eval_order(
    data_dir: str, split: str, require_report: bool = True
) -> list[tuple[str, int, list[int]]]:
    """(image_id, class_label, chexpert) per record, in the order make_eval_dataset yields.

    Mirrors the eval pipeline's reading: shards interleaved one record at a time
    (cycle_length = min(#shards, 8)), records with an empty report left out when
    `require_report` (as make_eval_dataset's flag of the same name). Callers must
    still check the result against the pipeline's labels (a skipped bad record shifts it).
    """
    import tensorflow as tf

    from place_tf.data import manifest, schema

    files = manifest.split_files(data_dir, split)
    full = schema.feature_spec()
    keys = (
        schema.IMAGE_ID,
        schema.CLASS_LABEL,
        schema.CHEXPERT,
        schema.FINDINGS,
        schema.IMPRESSION,
    )
    spec = {k: full[k] for k in keys}
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), 8), block_length=1
    )
    rows = []
    parse = tf.autograph.experimental.do_not_convert(lambda s: tf.io.parse_example(s, spec))
    for batch in ds.batch(256).map(parse).as_numpy_iterator():
        for i, c, v, f, imp in zip(
            batch[schema.IMAGE_ID],
            batch[schema.CLASS_LABEL],
            batch[schema.CHEXPERT],
            batch[schema.FINDINGS],
            batch[schema.IMPRESSION],
            strict=True,
        ):
            if require_report and not schema.report_text(f.decode("utf-8"), imp.decode("utf-8")):
                continue
            rows.append((i.decode("utf-8"), int(c), [int(x) for x in v]))
    return rows


def _aligned_image_ids(
    data_dir, split, labels, class_label, require_report: bool = True
) -> list[str] | None:
    """Image ids in the pipeline's row order, if they provably line up with `labels`.

    The eval pipeline yields no ids. They are read in the same order
    (read_rows_in_eval_order) and accepted only when every row's CheXpert and class labels
    agree with the pipeline's; otherwise None (callers fall back, with a warning).
    """
    n = len(labels)
    rows = read_rows_in_eval_order(data_dir, split, require_report)[
        :n
    ]  # a prefix when extraction stopped early
    chex = np.asarray([r[2] for r in rows], dtype=np.float32).reshape(-1, labels.shape[1])
    cls = np.asarray([r[1] for r in rows], dtype=np.int64)
    if len(rows) != n or not np.array_equal(chex, labels) or not np.array_equal(cls, class_label):
        log.warning(
            "split %s: the pipeline's rows (%d) do not line up with the shard records (%d) "
            "(skipped or reordered records); image ids unavailable",
            split,
            n,
            len(rows),
        )
        return None
    return [r[0] for r in rows]


# ------------------------------------------------------------------ output
def write_result(result: dict, output: str, table: str | None = None) -> str:
    """Write `result` as strict JSON (NaN -> null) to `output` and `table` beside it (.md)."""
    from place_tf.evaluate.metrics import nan_to_none

    if not output:
        return ""
    d = os.path.dirname(os.path.abspath(output))
    os.makedirs(d, exist_ok=True)
    from place_tf import fileio

    fileio.write_json(output, nan_to_none(result), allow_nan=False)
    if table is not None:
        md = os.path.splitext(output)[0] + ".md"
        with open(md, "w") as f:
            f.write(table.rstrip() + "\n")
    return output


def fmt(x, digits: int = 3) -> str:
    """A metric value for a table: fixed digits, '-' for None/NaN."""
    if x is None:
        return "-"
    try:
        xf = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "-" if xf != xf else f"{xf:.{digits}f}"
