"""Report generation probe: a small transformer decoder over the image's patch tokens.

Model: the encoder's patch tokens (frozen by default; `finetune=True` trains the encoder
too and restores it afterwards) are projected to the decoder width, layer-normalised and
given learned position embeddings: that is the cross-attention memory. The decoder is
token + position embeddings, 1–3 `keras_hub.layers.TransformerDecoder` layers
(pre-norm, causal self-attention, cross-attention to the memory) and a vocabulary
projection. Training is teacher forcing on the corpus tokenizer's ids (`[CLS] report
[SEP]`): inputs ids[:-1], targets ids[1:], padding masked. The epoch with the lowest
validation loss is kept when a validate split exists.

Decoding: `keras_hub.samplers.GreedySampler` and `BeamSampler` with a next-token function
that re-runs the decoder on the prompt (no KV cache; fine for ≤ 112 tokens). The image
memory rides in the sampler's cache, so beam search repeats and reorders it per beam.
Once a sequence has produced [SEP] it is forced to emit [PAD] with probability 1, so a
finished beam keeps its score; [PAD]/[CLS]/[MASK] are never generated otherwise.

Metrics on the test split, over the text re-joined from the wordpieces of both the
generated and the reference ids (`ids_to_text`: same lowercasing, truncation and
wordpiece joins on both sides):
BLEU-1..4 = corpus BLEU with max_order 1..4 (`keras_hub.metrics.Bleu`, SacreBLEU 13a
tokenization, no smoothing), ROUGE-L = mean per-report F-measure
(`keras_hub.metrics.RougeL`, which uses the `rouge-score` package).
"""

from __future__ import annotations

import logging
import math
import time

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from keras import layers

from place_tf.evaluate import head_training as ht
from place_tf.evaluate import task_data as td

log = logging.getLogger(__name__)

NEG_INF = -1e9


@keras.saving.register_keras_serializable(package="place_tf")
class ReportDecoder(keras.layers.Layer):
    """(token_ids [B,L], memory [B,N,width]) -> next-token logits [B,L,V].

    `encode_memory(patch_tokens [B,N,token_dim])` -> memory [B,N,width]; L <= max_length.
    """

    def __init__(
        self,
        vocabulary_size,
        max_length,
        num_image_tokens,
        token_dim,
        width=64,
        num_layers=1,
        num_heads=2,
        intermediate_dim=128,
        dropout=0.1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocabulary_size = int(vocabulary_size)
        self.max_length = int(max_length)
        self.num_image_tokens = int(num_image_tokens)
        self.token_dim = int(token_dim)
        self.width = int(width)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.intermediate_dim = int(intermediate_dim)
        self.dropout = float(dropout)
        if not 1 <= self.num_layers <= 6:
            raise ValueError(f"ReportDecoder num_layers must be in [1, 6], got {num_layers}")
        self.image_projection = layers.Dense(self.width, name="image_projection")
        self.image_norm = layers.LayerNormalization(epsilon=1e-6, name="image_norm")
        self.image_position = keras_hub.layers.PositionEmbedding(
            self.num_image_tokens, name="image_position"
        )
        self.embedding = keras_hub.layers.TokenAndPositionEmbedding(
            self.vocabulary_size, self.max_length, self.width, name="token_embedding"
        )
        self.decoder_layers = [
            keras_hub.layers.TransformerDecoder(
                self.intermediate_dim,
                self.num_heads,
                dropout=self.dropout,
                normalize_first=True,
                name=f"decoder_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.final_norm = layers.LayerNormalization(epsilon=1e-6, name="final_norm")
        self.lm_head = layers.Dense(self.vocabulary_size, name="lm_head")

    def build(self, token_shape=None, memory_shape=None):
        w = self.width
        self.image_projection.build((None, self.num_image_tokens, self.token_dim))
        self.image_norm.build((None, self.num_image_tokens, w))
        self.image_position.build((None, self.num_image_tokens, w))
        self.embedding.build((None, self.max_length))
        for dec in self.decoder_layers:
            dec.build((None, self.max_length, w), (None, self.num_image_tokens, w))
        self.final_norm.build((None, self.max_length, w))
        self.lm_head.build((None, self.max_length, w))
        self.built = True

    def encode_memory(self, patch_tokens, training=None):
        x = self.image_norm(self.image_projection(patch_tokens))
        return x + self.image_position(x)

    def call(self, token_ids, memory, padding_mask=None, training=None):
        x = self.embedding(token_ids)
        for dec in self.decoder_layers:
            x = dec(x, memory, decoder_padding_mask=padding_mask, training=training)
        return self.lm_head(self.final_norm(x))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "max_length": self.max_length,
                "num_image_tokens": self.num_image_tokens,
                "token_dim": self.token_dim,
                "width": self.width,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "dropout": self.dropout,
            }
        )
        return config


def teacher_forcing_loss(decoder, token_ids, padding_mask, memory, training=False):
    """Mean next-token cross-entropy over real target tokens (after [CLS], up to [SEP])."""
    inputs = token_ids[:, :-1]
    targets = token_ids[:, 1:]
    weights = tf.cast(padding_mask[:, 1:], tf.float32)
    logits = decoder(inputs, memory, padding_mask=padding_mask[:, :-1], training=training)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=targets, logits=tf.cast(logits, tf.float32)
    )
    return tf.reduce_sum(ce * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


def make_next_fn(decoder, pad_id: int, cls_id: int, sep_id: int, banned=()):
    """The sampler's next(prompt, cache=memory, index) -> (logits [B,V], None, cache)."""
    vocab = decoder.vocabulary_size
    banned_ids = sorted({int(pad_id), int(cls_id), *(int(b) for b in banned)})
    ban = tf.reduce_sum(tf.one_hot(banned_ids, vocab), axis=0) > 0  # [V]
    only_pad = tf.where(tf.one_hot(pad_id, vocab) > 0, 0.0, NEG_INF)  # [V]

    def next_fn(prompt, cache, index):
        # The whole prompt is fed: under the causal mask, position index-1 never sees the
        # unfilled positions after it.
        logits = decoder(prompt[:, :-1], cache, training=False)
        logits = tf.cast(tf.gather(logits, index - 1, axis=1), tf.float32)
        logits = tf.where(ban[None, :], NEG_INF, logits)
        last = tf.gather(prompt, index - 1, axis=1)
        finished = tf.logical_or(tf.equal(last, sep_id), tf.equal(last, pad_id))
        logits = tf.where(finished[:, None], only_pad[None, :], logits)
        return logits, None, cache

    return next_fn


def generate(decoder, memory, *, max_length: int, pad_id, cls_id, sep_id, num_beams=1, banned=()):
    """Token ids [B, max_length] starting with [CLS]: greedy (num_beams <= 1) or beam search."""
    batch = tf.shape(memory)[0]
    prompt = tf.concat(
        [
            tf.fill([batch, 1], tf.constant(cls_id, tf.int32)),
            tf.fill([batch, max_length - 1], tf.constant(pad_id, tf.int32)),
        ],
        axis=1,
    )
    mask = tf.concat([tf.ones([batch, 1], tf.bool), tf.zeros([batch, max_length - 1], tf.bool)], 1)
    if num_beams and num_beams > 1:
        sampler = keras_hub.samplers.BeamSampler(num_beams=int(num_beams))
    else:
        sampler = keras_hub.samplers.GreedySampler()
    next_fn = make_next_fn(decoder, pad_id, cls_id, sep_id, banned)
    return sampler(next_fn, prompt, cache=memory, index=1, mask=mask, stop_token_ids=[sep_id])


def text_metrics(references, candidates) -> dict:
    """BLEU-1..4 (corpus, keras_hub.metrics.Bleu) and ROUGE-L F (mean, keras_hub.metrics.RougeL)
    of candidate strings against one reference string each."""
    refs = [str(r) for r in references]
    cands = [str(c) for c in candidates]
    if len(refs) != len(cands):
        raise ValueError(f"text_metrics: {len(refs)} references but {len(cands)} candidates")
    if not refs:
        raise ValueError("text_metrics: no reports to score")
    out = {}
    # keras_hub's Bleu divides by the total lengths: all-empty sides have BLEU 0.
    nonempty = any(c.strip() for c in cands) and any(r.strip() for r in refs)
    for n in (1, 2, 3, 4):
        if not nonempty:
            out[f"bleu_{n}"] = 0.0
            continue
        m = keras_hub.metrics.Bleu(max_order=n)
        m.update_state(tf.constant(refs)[:, None], tf.constant(cands))
        out[f"bleu_{n}"] = float(m.result())
    rouge = keras_hub.metrics.RougeL()
    rouge.update_state(tf.constant(refs), tf.constant(cands))
    out["rouge_l"] = float(rouge.result()["f1_score"])
    return out


def ids_to_text(ids, vocabulary, stop_ids=(), skip_ids=()) -> list[str]:
    """Token ids [B, L] -> text: wordpieces joined ("##" pieces glued to the previous one),
    `skip_ids` dropped, each row cut at its first `stop_ids` token after position 0."""
    stop, skip = {int(i) for i in stop_ids}, {int(i) for i in skip_ids}
    out = []
    for row in np.asarray(ids):
        words: list[str] = []
        for pos, i in enumerate(int(v) for v in row):
            if pos > 0 and i in stop:
                break
            if i in skip or i in stop:
                continue
            piece = vocabulary[i]
            if piece.startswith("##") and words:
                words[-1] += piece[2:]
            else:
                words.append(piece)
        out.append(" ".join(words))
    return out


def _truncate_at_sep(ids: np.ndarray, sep_id: int, pad_id: int) -> np.ndarray:
    """Everything after the first [SEP] (excluding [CLS] at 0) becomes [PAD]."""
    ids = np.array(ids)
    for row in ids:
        hits = np.flatnonzero(row[1:] == sep_id)
        if hits.size:
            row[hits[0] + 2 :] = pad_id
    return ids


def evaluate(
    model,
    data_dir: str,
    *,
    image_size: int | None = None,
    seed: int = 0,
    fraction: float = 1.0,
    tokenizer=None,
    vocab_file: str = "",
    split: str = "test",
    finetune: bool = False,
    epochs: int = 20,
    batch_size: int = 16,
    learning_rate: float = 5e-4,
    encoder_learning_rate: float = 1e-5,
    weight_decay: float = 1e-4,
    width: int = 64,
    num_layers: int = 1,
    num_heads: int = 2,
    intermediate_dim: int = 128,
    dropout: float = 0.1,
    num_beams: int = 3,
    max_decode_length: int | None = None,
    max_test_examples: int = 0,
    select_on_validation: bool = True,
    **unused,
) -> dict:
    """Train a report decoder on the train split and score generated reports on `split`.

    Returns BLEU-1..4 and ROUGE-L of the chosen decoding (beam search when num_beams > 1,
    else greedy) at the top level and both decodings under "by_decoding".
    """
    if unused:
        log.info("report_generation: ignoring options %s", sorted(unused))
    t0 = time.time()
    fraction = 1.0 if fraction is None else float(fraction)
    image_size = td.check_image_size(model, image_size)
    if tokenizer is None:
        from place_tf.evaluate.embeddings import load_tokenizer

        tokenizer = load_tokenizer(model, data_dir=data_dir, vocab_file=vocab_file)
    pad_id, cls_id, sep_id = tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id
    vocab = tokenizer.get_vocabulary()
    specials = (pad_id, cls_id, sep_id, tokenizer.mask_id)
    max_length = int(tokenizer.max_length)
    decode_length = int(max_decode_length or max_length)
    if not 2 <= decode_length <= max_length:
        raise ValueError(f"max_decode_length {decode_length} must be in [2, {max_length}]")
    feats = td.TaskFeatures(model, finetune=finetune)
    keras.utils.set_random_seed(seed)
    ids = td.fraction_ids(data_dir, fraction, seed)

    def data(which, ids_=None):
        return td.report_dataset(data_dir, which, image_size, tokenizer, ids_)

    for which in ("train", split):
        td.require_report_text(data_dir, which, "report_generation")
    n_train = td.count_examples(data_dir, "train", ids, require_report=True)
    if n_train == 0:
        raise ValueError(f"{data_dir}: no training reports in the label-fraction subset")
    train = td.maybe_cache(data("train", ids), n_train, 4 * image_size**2 + 5 * max_length)
    train = train.shuffle(td.shuffle_buffer(n_train), seed=seed).batch(batch_size).prefetch(2)
    val = (
        data("validate").batch(batch_size).cache()
        if (select_on_validation and td.has_split(data_dir, "validate"))
        else None
    )
    test = data(split)
    if max_test_examples:
        test = test.take(int(max_test_examples))
    test = test.batch(batch_size)

    (_, g, _, token_dim), _ = feats.shapes()
    decoder = ReportDecoder(
        tokenizer.vocabulary_size,
        max_length - 1,
        g * g,
        token_dim,
        width=width,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_dim=intermediate_dim,
        dropout=dropout,
        name="report_decoder",
    )
    decoder.build()
    opt = ht.HeadOptimizer.for_task(
        decoder, feats, learning_rate, encoder_learning_rate, weight_decay
    )

    spec = feats.image_spec(image_size)
    ids_spec = tf.TensorSpec([None, max_length], tf.int32)
    mask_spec = tf.TensorSpec([None, max_length], tf.bool)

    @tf.function(input_signature=[spec, ids_spec, mask_spec], autograph=False)
    def train_step(images, token_ids, padding_mask):
        with tf.GradientTape() as tape:
            memory = decoder.encode_memory(feats.tokens(images, training=True), training=True)
            loss = teacher_forcing_loss(decoder, token_ids, padding_mask, memory, training=True)
        opt.apply(tape.gradient(loss, opt.variables))
        return loss

    @tf.function(input_signature=[spec, ids_spec, mask_spec], autograph=False)
    def val_step(images, token_ids, padding_mask):
        memory = decoder.encode_memory(feats.tokens(images))
        return teacher_forcing_loss(decoder, token_ids, padding_mask, memory)

    def make_generate(beams):
        @tf.function(input_signature=[spec], autograph=False)
        def gen(images):
            memory = decoder.encode_memory(feats.tokens(images))
            return generate(
                decoder,
                memory,
                max_length=decode_length,
                pad_id=pad_id,
                cls_id=cls_id,
                sep_id=sep_id,
                num_beams=beams,
                banned=(tokenizer.mask_id,),
            )

        return gen

    def train_epoch():
        losses = [float(train_step(b["image"], b["token_ids"], b["padding_mask"])) for b in train]
        return {"loss": float(np.mean(losses))}

    def validate():
        v = [float(val_step(b["image"], b["token_ids"], b["padding_mask"])) for b in val]
        return float(np.mean(v)) if v else math.nan

    try:
        history, best_val = ht.fit_selecting_on_validation(
            "report generation",
            epochs,
            train_epoch,
            validate if val is not None else None,
            opt.tracked,
            "val_loss",
            higher_is_better=False,
        )
        decodings = {"greedy": 1}
        if num_beams and num_beams > 1:
            decodings[f"beam_{int(num_beams)}"] = int(num_beams)
        gens = {name: make_generate(b) for name, b in decodings.items()}
        refs, cands = [], {name: [] for name in decodings}
        lengths = {name: [] for name in decodings}
        for batch in test:
            ref_ids = batch["token_ids"].numpy()[:, :decode_length]
            refs += ids_to_text(ref_ids, vocab, stop_ids=(sep_id,), skip_ids=specials)
            for name, gen in gens.items():
                out = _truncate_at_sep(gen(batch["image"]).numpy(), sep_id, pad_id)
                lengths[name] += list(((out != pad_id) & (out != cls_id) & (out != sep_id)).sum(1))
                cands[name] += ids_to_text(out, vocab, stop_ids=(sep_id,), skip_ids=specials)
    finally:
        feats.restore()
    if not refs:
        raise ValueError(f"{data_dir}: split {split!r} has no reports to generate")
    by_decoding = {}
    for name in decodings:
        m = text_metrics(refs, cands[name])
        m["mean_generated_tokens"] = float(np.mean(lengths[name]))
        by_decoding[name] = m
    chosen = f"beam_{int(num_beams)}" if num_beams and num_beams > 1 else "greedy"
    result = dict(by_decoding[chosen])
    result.update(
        {
            "task": "report_generation",
            "decoding": chosen,
            "by_decoding": by_decoding,
            "split": split,
            "test_examples": len(refs),
            "train_examples": int(n_train),
            "finetune": bool(finetune),
            "fraction": float(fraction),
            "seed": int(seed),
            "image_size": int(image_size),
            "epochs": int(epochs),
            "decoder_layers": int(num_layers),
            "final_loss": history[-1]["loss"] if history else float("nan"),
            "best_val_loss": best_val,
            "history": history,
            "seconds": round(time.time() - t0, 1),
        }
    )
    return result


def format_table(result: dict) -> str:
    """Markdown table: BLEU-1..4 and ROUGE-L per decoding."""
    from place_tf.evaluate.embeddings import fmt

    lines = [
        "| decoding | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | ROUGE-L | mean tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in (result.get("by_decoding") or {"-": result}).items():
        lines.append(
            f"| {name} | {fmt(m.get('bleu_1'))} | {fmt(m.get('bleu_2'))} | "
            f"{fmt(m.get('bleu_3'))} | {fmt(m.get('bleu_4'))} | {fmt(m.get('rouge_l'))} | "
            f"{fmt(m.get('mean_generated_tokens'), 1)} |"
        )
    return "\n".join(lines)
