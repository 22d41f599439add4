"""ReportTokenizer, vocabulary files and sentence splitting, against hand-checked ids."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from place_tf.data import tokenizer as tk

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "no",
    "pleural",
    "effusion",
    ".",
    "the",
    "lung",
    "##s",
    "are",
    "clear",
    "small",
    "right",
    ",",
    "pneumo",
    "##thorax",
    "3",
    "cm",
]
VOCAB = SPECIALS + WORDS  # "no" = 5, "pleural" = 6, ..., "cm" = 20


def ids_of(tok, texts):
    ids, mask = tok(texts)
    return ids.numpy(), mask.numpy()


@pytest.fixture(scope="module")
def tok():
    return tk.ReportTokenizer(VOCAB, max_length=12)


def test_hand_checked_ids_and_masks(tok):
    ids, mask = ids_of(
        tok,
        [
            "No pleural effusion.",
            "The LUNGS are clear, right?",  # lowercased; "?" is not in the vocabulary
            "pneumothorax 3.5 cm",  # WordPiece pieces; punctuation splits "3.5"
            "lungss xyzzy",  # greedy longest match; an unknown word is one [UNK]
        ],
    )
    expected = [
        [2, 5, 6, 7, 8, 3],
        [2, 9, 10, 11, 12, 13, 16, 15, 1, 3],
        [2, 17, 18, 19, 8, 1, 20, 3],
        [2, 10, 11, 11, 1, 3],
    ]
    for row, want in zip(ids, expected, strict=True):
        assert row.tolist() == want + [0] * (12 - len(want))
    assert mask.tolist() == [[True] * len(w) + [False] * (12 - len(w)) for w in expected]
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert tok.detokenize(ids[0]) == ["[CLS]", "no", "pleural", "effusion", ".", "[SEP]"]


def test_properties_and_vocabulary(tok):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.vocabulary_size == len(VOCAB) and tok.get_vocabulary() == VOCAB
    assert tok.token_to_id("##thorax") == 18 and tok.id_to_token(7) == "effusion"


def test_truncation_keeps_sep():
    short = tk.ReportTokenizer(VOCAB, max_length=5)
    ids, mask = ids_of(short, ["No pleural effusion. The lungs are clear."])
    assert ids.tolist() == [[2, 5, 6, 7, 3]] and mask.all()
    minimal = tk.ReportTokenizer(VOCAB, max_length=2)
    assert ids_of(minimal, ["No pleural effusion."])[0].tolist() == [[2, 3]]


def test_empty_and_blank_strings(tok):
    ids, mask = ids_of(tok, ["", "   \n "])
    assert ids.tolist() == [[2, 3] + [0] * 10] * 2
    assert mask.sum(axis=1).tolist() == [2, 2]


def test_scalar_input_gives_one_row(tok):
    ids, mask = tok("no effusion")
    assert ids.shape == (12,) and ids.numpy()[:4].tolist() == [2, 5, 7, 3]
    assert mask.numpy().sum() == 4


def test_rank2_input_is_rejected(tok):
    with pytest.raises(ValueError, match="string scalar or vector"):
        tok(tf.constant([["a", "b"]]))


def test_special_ids_are_looked_up_by_name_in_bert_layout():
    """BERT/BioClinicalBERT: [PAD] = 0, [unusedN] ..., [UNK] = 100, [CLS] = 101, ..."""
    bert = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    bert += ["no", "effusion", "."]
    t = tk.ReportTokenizer(bert, max_length=6)
    assert (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) == (0, 100, 101, 102, 103)
    assert ids_of(t, ["No effusion!"])[0].tolist() == [[101, 104, 105, 100, 102, 0]]


def test_same_ids_in_tf_data_batched_and_unbatched(tok):
    texts = ["No pleural effusion.", "The lungs are clear.", "", "small right effusion"]
    eager = ids_of(tok, texts)
    batched = next(iter(tf.data.Dataset.from_tensor_slices(texts).batch(4).map(tok)))
    np.testing.assert_array_equal(batched[0].numpy(), eager[0])
    np.testing.assert_array_equal(batched[1].numpy(), eager[1])
    rows = [r[0].numpy() for r in tf.data.Dataset.from_tensor_slices(texts).map(tok)]
    np.testing.assert_array_equal(np.stack(rows), eager[0])


def test_config_round_trip_needs_no_file(tok):
    cfg = tok.get_config()
    assert cfg["vocabulary"] == VOCAB and cfg["max_length"] == 12 and cfg["lowercase"] is True
    clone = tk.ReportTokenizer.from_config(cfg)
    text = ["The lungs are clear, right?"]
    np.testing.assert_array_equal(ids_of(clone, text)[0], ids_of(tok, text)[0])
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(tok))
    assert isinstance(again, tk.ReportTokenizer)
    np.testing.assert_array_equal(ids_of(again, text)[0], ids_of(tok, text)[0])


def test_savedmodel_round_trip(tok, tmp_path):
    import tensorflow_text  # noqa: F401  (registers the WordPiece ops for loading)

    module = tf.Module()
    module.tok = tok
    module.tokenize = tf.function(
        lambda s: tok(s), input_signature=[tf.TensorSpec([None], tf.string)]
    )
    tf.saved_model.save(module, str(tmp_path / "sm"))
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    texts = tf.constant(["pneumothorax 3.5 cm", ""])
    got = loaded.tokenize(texts)
    np.testing.assert_array_equal(got[0].numpy(), ids_of(tok, texts)[0])
    np.testing.assert_array_equal(got[1].numpy(), ids_of(tok, texts)[1])


def test_uppercase_kept_when_lowercase_false():
    t = tk.ReportTokenizer(VOCAB + ["No"], max_length=6, lowercase=False)
    assert ids_of(t, ["No no"])[0].tolist() == [[2, 21, 5, 3, 0, 0]]


# -- vocabulary files -------------------------------------------------------------------


def test_vocabulary_file_loads_and_feeds_the_layer(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n\n", encoding="utf-8")
    assert tk.load_vocabulary(path) == VOCAB
    t = tk.ReportTokenizer(str(path), max_length=8)
    assert ids_of(t, ["No effusion."])[0].tolist() == [[2, 5, 7, 8, 3, 0, 0, 0]]


@pytest.mark.parametrize(
    "lines,message",
    [
        ([], "is empty"),
        (
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "no"],
            r"lacks the special token\(s\) \['\[MASK\]'\]",
        ),
        (["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"], r"\[PAD\] must be the first token"),
        (SPECIALS + ["no", "no"], "'no' appears twice"),
        (SPECIALS + ["", "x"], "empty or have surrounding whitespace"),
    ],
)
def test_bad_vocabulary_files_name_the_file(tmp_path, lines, message):
    path = tmp_path / "bad_vocab.txt"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as e:
        tk.load_vocabulary(path)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match=message):
        tk.ReportTokenizer(str(path))


def test_missing_vocabulary_file(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match="vocabulary file not found: .*nope/vocab.txt"):
        tk.load_vocabulary(missing)


def test_bad_max_length():
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        tk.ReportTokenizer(VOCAB, max_length=1)


def test_learn_vocabulary_writes_specials_first(tmp_path):
    texts = [
        "No pleural effusion. The lungs are clear.",
        "Small right pleural effusion.",
        "Large left pneumothorax. Heart size is normal.",
        "",
    ] * 20
    out = tmp_path / "sub" / "vocab.txt"
    vocab = tk.learn_vocabulary(texts, 200, str(out))
    assert vocab[:5] == SPECIALS and len(vocab) <= 200
    assert tk.load_vocabulary(out) == vocab
    t = tk.ReportTokenizer(vocab, max_length=32)
    ids, mask = ids_of(t, texts[:3])
    assert tk.UNK not in [t.id_to_token(i) for i in ids[mask]]  # every word is covered
    assert {"pleural", "effusion", "pneumothorax"} <= set(vocab)


def test_learn_vocabulary_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        tk.learn_vocabulary(["", "  "], 100, None)
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        tk.learn_vocabulary(["a b"], 5, None)


# -- sentences ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", []),
        ("No effusion. Lungs are clear!", ["No effusion.", "Lungs are clear!"]),
        ("Nodule measures 3.5 cm. No effusion.", ["Nodule measures 3.5 cm.", "No effusion."]),
        (
            "Discussed with Dr. Smith at 10 a.m. vs. prior e.g. Tuesday. Stable.",
            ["Discussed with Dr. Smith at 10 a.m. vs. prior e.g. Tuesday.", "Stable."],
        ),
        ("1. No effusion. 2. Clear lungs.", ["No effusion.", "Clear lungs."]),
        (
            "1. No effusion 2. Clear lungs 3. Normal heart",
            ["No effusion", "Clear lungs", "Normal heart"],
        ),
        (
            "IMPRESSION:\n1. Effusion.\n2. Tube in\nstandard position.",
            ["IMPRESSION:", "Effusion.", "Tube in standard position."],
        ),
        (
            "- bullet one\n- bullet two\n\nNew paragraph",
            ["bullet one", "bullet two", "New paragraph"],
        ),
        ("Seen on image 2. No change.", ["Seen on image 2.", "No change."]),
    ],
)
def test_split_sentences(text, expected):
    assert tk.split_sentences(text) == expected


def test_split_sentences_rejects_non_str():
    with pytest.raises(TypeError, match="expects str"):
        tk.split_sentences(b"bytes")
