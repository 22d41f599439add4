"""WordPiece vocabulary and in-graph report tokenization.

Why in-graph: the same layer runs inside `tf.data` (training input), inside the exported
SavedModel (TF Serving takes raw report strings) and eagerly in tests, and must give the
same ids everywhere. It wraps keras-hub's `WordPieceTokenizer` (tensorflow-text's
FastWordpiece op, so a process that loads the SavedModel must `import tensorflow_text`)
and packs `[CLS] tokens [SEP] [PAD]...` to a fixed length with plain TF ops.

Vocabulary files are BERT-style `vocab.txt` (one token per line). Special tokens are
looked up by name, so both our learned vocabularies ([PAD], [UNK], [CLS], [SEP], [MASK]
first) and BERT/BioClinicalBERT files ([PAD] = 0, the others further down) work;
[PAD] must be index 0 because padding masks and embeddings assume it.

With a pre-trained text encoder (`--text_init`) the tokenizer is the checkpoint's:
vocabulary, casing and special tokens come from it (`report_tokenizer`), not from
`--vocab_file`; `--lowercase_reports` additionally lower-cases report text (MGCA does).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

import keras

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
DEFAULT_MAX_LENGTH = 112


# --------------------------------------------------------------------------------------
# Vocabulary files
# --------------------------------------------------------------------------------------


def check_vocabulary(vocab: Sequence[str], where: str = "vocabulary") -> list[str]:
    """Validate a token list: non-empty, specials present, [PAD] first, no duplicates."""
    vocab = list(vocab)
    if not vocab:
        raise ValueError(f"{where} is empty")
    bad = [i for i, t in enumerate(vocab) if not isinstance(t, str) or not t or t != t.strip()]
    if bad:
        raise ValueError(
            f"{where}: token(s) at line(s) {[i + 1 for i in bad[:5]]} are empty or have "
            "surrounding whitespace"
        )
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"{where} lacks the special token(s) {missing} (needs {SPECIAL_TOKENS})")
    if vocab[0] != PAD:
        raise ValueError(f"{where}: {PAD} must be the first token (index 0), found {vocab[0]!r}")
    seen: dict[str, int] = {}
    for i, t in enumerate(vocab):
        if t in seen:
            raise ValueError(
                f"{where}: token {t!r} appears twice (lines {seen[t] + 1} and {i + 1})"
            )
        seen[t] = i
    return vocab


def load_vocabulary(path: str | os.PathLike) -> list[str]:
    """Read a vocab.txt; a clear error names the file if it is missing, empty or invalid."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vocabulary file not found: {path}")
    with open(path, encoding="utf-8") as f:
        tokens = [line.rstrip("\r\n") for line in f]
    while tokens and tokens[-1] == "":  # trailing blank lines
        tokens.pop()
    return check_vocabulary(tokens, where=f"vocabulary file {path}")


def learn_vocabulary(texts: Iterable[str], vocab_size: int, output_file: str | None) -> list[str]:
    """Learn a lowercase WordPiece vocabulary (special tokens first) and write it.

    Uses keras_hub.tokenizers.compute_word_piece_vocabulary with the same pre-tokenization
    (lowercase, split on whitespace and punctuation) that ReportTokenizer applies.
    """
    import keras_hub
    import tensorflow as tf

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("learn_vocabulary got no non-empty texts")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    vocab = keras_hub.tokenizers.compute_word_piece_vocabulary(
        # Batched: word counting iterates in Python, once per element.
        tf.data.Dataset.from_tensor_slices(texts).batch(1024),
        vocab_size,
        lowercase=True,
        strip_accents=False,
        reserved_tokens=list(SPECIAL_TOKENS),
    )
    vocab = check_vocabulary(vocab, where="learned vocabulary")
    if output_file:
        d = os.path.dirname(os.path.abspath(output_file))
        os.makedirs(d, exist_ok=True)
        tmp = output_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in vocab))
        os.replace(tmp, output_file)
    return vocab


# --------------------------------------------------------------------------------------
# Sentence splitting (TensorFlow-free)
# --------------------------------------------------------------------------------------

# Words whose trailing period does not end a sentence.
_ABBREVIATIONS = frozenset(
    {"dr", "mr", "mrs", "ms", "prof", "vs", "approx", "e.g", "i.e", "cf", "fig", "resp", "incl"}
)
_LIST_MARKER = re.compile(r"^\s*(?:\(?\d{1,2}[.)]|[-*\u2022])\s+")
_CANDIDATE_END = re.compile(r"([.!?])(\s+)(?=[\"'(\[]?[A-Z0-9_])")
_INLINE_NUMBER = re.compile(r"(?:(?<=\s)|^)(\d{1,2})[.)]\s+(?=\S)")


def _is_abbreviation(before: str, after: str) -> bool:
    word = re.split(r"\s", before.rstrip())[-1].lower().rstrip(".") if before.strip() else ""
    word = word.lstrip("(\"'[")
    if word in _ABBREVIATIONS:
        return True
    if len(word) == 1 and word.isalpha():  # an initial: "J. Smith"
        return True
    if word == "no" and after[:1].isdigit():  # "No. 2"
        return True
    return False


def _split_numbered(text: str) -> list[str]:
    """Split '1. foo 2. bar' into items when the numbers run 1, 2, 3, ... ."""
    starts = []
    expected = 1
    for m in _INLINE_NUMBER.finditer(text):
        if int(m.group(1)) == expected:
            starts.append(m.start())
            expected += 1
    if len(starts) < 2 and not (starts and starts[0] == 0):
        return [text]
    if starts[0] != 0:
        starts.insert(0, 0)
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences, without list numbering.

    Handles: '.', '!' or '?' followed by a capital, digit or opening bracket; decimals
    ("3.5 cm") and abbreviations ("Dr.", "e.g.", "vs.", initials) do not split; numbered
    lists ("1. No effusion. 2. Clear lungs." or one item per line, with or without
    periods) become one sentence per item with the numbers removed; blank lines and
    bullet lines split. Never raises on a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_sentences expects str, got {type(text).__name__}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    # Lines: a new paragraph, a numbered or bulleted line starts a new chunk; other
    # newlines are wrapped text.
    chunks: list[str] = []
    for line in text.split("\n"):
        if not line.strip():
            chunks.append("")
            continue
        if _LIST_MARKER.match(line) or not chunks or not chunks[-1]:
            chunks.append(line.strip())
        else:
            chunks[-1] = chunks[-1] + " " + line.strip()
    out: list[str] = []
    for chunk in chunks:
        for item in _split_numbered(" ".join(chunk.split())):
            item = _LIST_MARKER.sub("", item, count=1).strip()
            start = 0
            for m in _CANDIDATE_END.finditer(item):
                end = m.end(1)
                if m.group(1) == "." and _is_abbreviation(item[start : end - 1], item[m.end() :]):
                    continue
                sentence = item[start:end].strip()
                if sentence:
                    out.append(sentence)
                start = m.end()
            rest = item[start:].strip()
            if rest:
                out.append(rest)
    return [_LIST_MARKER.sub("", s, count=1).strip() for s in out if s.strip()]


# --------------------------------------------------------------------------------------
# The tokenizer layer
# --------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="place_tf")
class ReportTokenizer(keras.layers.Layer):
    """Report strings -> (token_ids int32 [B, L], padding_mask bool [B, L]).

    Lowercases, splits on whitespace and punctuation, applies WordPiece (unknown words
    -> [UNK]), keeps at most L - 2 pieces, and packs `[CLS] pieces [SEP]` padded with
    [PAD] (= 0). Over-long reports therefore always end in [SEP]. An empty string gives
    `[CLS] [SEP]`. The vocabulary is part of the config, so from_config needs no file.
    """

    def __init__(
        self,
        vocabulary: Sequence[str] | str | os.PathLike,
        max_length: int = DEFAULT_MAX_LENGTH,
        lowercase: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        import keras_hub

        if isinstance(vocabulary, (str, os.PathLike)):
            vocab = load_vocabulary(vocabulary)
        else:
            vocab = check_vocabulary(vocabulary)
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}")
        self.max_length = int(max_length)
        self.lowercase = bool(lowercase)
        self._vocab = vocab
        self._ids = {t: i for i, t in enumerate(vocab)}
        # Always the TF path (eager calls too), so eager, tf.data and SavedModel agree.
        self._wordpiece = keras_hub.tokenizers.WordPieceTokenizer(
            vocabulary=vocab,
            lowercase=self.lowercase,
            strip_accents=False,
            oov_token=UNK,
            dtype="int32",
            _allow_python_workflow=False,
        )
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self._eager_fn = None
        self.built = True

    # -- vocabulary ------------------------------------------------------------------
    @property
    def vocabulary_size(self) -> int:
        return len(self._vocab)

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def unk_id(self) -> int:
        return self._ids[UNK]

    @property
    def cls_id(self) -> int:
        return self._ids[CLS]

    @property
    def sep_id(self) -> int:
        return self._ids[SEP]

    @property
    def mask_id(self) -> int:
        return self._ids[MASK]

    def get_vocabulary(self) -> list[str]:
        return list(self._vocab)

    def token_to_id(self, token: str) -> int:
        if token not in self._ids:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return self._ids[token]

    def id_to_token(self, token_id: int) -> str:
        return self._vocab[int(token_id)]

    def detokenize(self, token_ids) -> list[str]:
        """Ids -> WordPiece token strings, without [PAD] (debugging and tests; Python)."""
        return [self._vocab[int(i)] for i in list(token_ids) if int(i) != self.pad_id]

    # -- tokenization ------------------------------------------------------------------
    def _pack(self, strings):
        import tensorflow as tf

        pieces = self._wordpiece(strings)  # ragged int32 [B, None]
        if not isinstance(pieces, tf.RaggedTensor):  # pragma: no cover - defensive
            pieces = tf.RaggedTensor.from_tensor(pieces)
        pieces = pieces[:, : self.max_length - 2]
        batch = tf.shape(strings)[0]
        cls = tf.fill([batch, 1], tf.constant(self.cls_id, tf.int32))
        sep = tf.fill([batch, 1], tf.constant(self.sep_id, tf.int32))
        ids = tf.concat(
            [
                tf.RaggedTensor.from_tensor(cls),
                tf.cast(pieces, tf.int32),
                tf.RaggedTensor.from_tensor(sep),
            ],
            axis=1,
        )
        token_ids = ids.to_tensor(default_value=self.pad_id, shape=[None, self.max_length])
        padding_mask = tf.sequence_mask(ids.row_lengths(), self.max_length)
        token_ids = tf.ensure_shape(token_ids, [None, self.max_length])
        padding_mask = tf.ensure_shape(padding_mask, [None, self.max_length])
        return token_ids, padding_mask

    def call(self, inputs):
        import tensorflow as tf

        strings = tf.convert_to_tensor(inputs, dtype=tf.string)
        scalar = strings.shape.rank == 0
        if scalar:
            strings = tf.reshape(strings, [1])
        elif strings.shape.rank != 1:
            raise ValueError(
                f"ReportTokenizer expects a string scalar or vector, got shape {strings.shape}"
            )
        if tf.executing_eagerly():
            # keras-hub converts eager ragged outputs to Python lists; stay in a graph.
            if self._eager_fn is None:
                self._eager_fn = tf.function(
                    self._pack,
                    input_signature=[tf.TensorSpec([None], tf.string)],
                    autograph=False,
                )
            token_ids, padding_mask = self._eager_fn(strings)
        else:
            token_ids, padding_mask = self._pack(strings)
        if scalar:
            return token_ids[0], padding_mask[0]
        return token_ids, padding_mask

    def compute_output_spec(self, inputs):
        shape = tuple(inputs.shape) + (self.max_length,)
        return (
            keras.KerasTensor(shape, dtype="int32"),
            keras.KerasTensor(shape, dtype="bool"),
        )

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "vocabulary": list(self._vocab),
                "max_length": self.max_length,
                "lowercase": self.lowercase,
            }
        )
        return config


# --------------------------------------------------------------------------------------
# The training tokenizer: the corpus vocabulary or the text checkpoint's
# --------------------------------------------------------------------------------------


def report_tokenizer(data_config, text_init: str = "") -> ReportTokenizer:
    """The ReportTokenizer a run trains (and exports) with.

    Without `text_init`: the WordPiece vocabulary `data_config.vocab_file`, else the
    corpus' `vocab.txt` (learned lower-case). With `text_init` (a BERT checkpoint handle,
    place_tf.pretrained): the checkpoint's vocabulary and casing; an explicit
    `vocab_file` must then hold the same vocabulary. `data_config.lowercase_reports`
    lower-cases report text even for a cased checkpoint.
    """
    d = data_config
    lowercase_reports = bool(getattr(d, "lowercase_reports", False))
    if not text_init:
        vocab = d.vocab_file or os.path.join(d.corpus_dir, "vocab.txt")
        return ReportTokenizer(load_vocabulary(vocab), max_length=d.max_length)
    from place_tf import pretrained

    vocab, lowercase = pretrained.wordpiece(text_init)
    vocab = check_vocabulary(vocab, where=f"vocabulary of checkpoint {text_init}")
    if d.vocab_file and load_vocabulary(d.vocab_file) != vocab:
        raise ValueError(
            f"--vocab_file={d.vocab_file} is not the vocabulary of --text_init={text_init}; "
            "a pre-trained text encoder needs its own vocabulary: drop --vocab_file"
        )
    return ReportTokenizer(vocab, max_length=d.max_length, lowercase=lowercase or lowercase_reports)
