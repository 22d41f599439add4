"""Pre-trained initialisation (--image_init / --text_init) from tiny checkpoints written
here: Hugging Face BERT / ViT directories (safetensors, the hub's weight names) and
keras-hub presets. No network: hub handles are tested offline."""

import dataclasses
import os
import time

import checkpoint_files as C
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from place_tf import config as config_lib
from place_tf import pretrained
from place_tf.data import tokenizer as tok
from place_tf.models.image_encoders import ViTImageEncoder, fold_grayscale_patch_embedding
from place_tf.models.text_encoder import TextEncoder

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf") / "bert")
    return d, C.write_hf_bert(d, seed=1)


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("hf") / "vit")
    return d, C.write_hf_vit(d, seed=2)


def _weight(layer, path):
    return next(w for w in layer.weights if w.path == path).numpy()


# ------------------------------------------------------------------ text


def test_hf_bert_first_layers_and_truncated_positions(hf_bert):
    d, t = hf_bert
    enc = TextEncoder(len(C.CASED_VOCAB), 2, 2, 32, 64, max_sequence_length=16, init_from=d)
    b = enc.backbone
    np.testing.assert_array_equal(
        _weight(b, "token_embedding/embeddings"), t["bert.embeddings.word_embeddings.weight"]
    )
    np.testing.assert_array_equal(
        _weight(b, "position_embedding/embeddings"),
        t["bert.embeddings.position_embeddings.weight"][:16],
    )
    # Layer 1's query kernel [hidden, heads, head_dim] = HF [out, in] transposed.
    np.testing.assert_allclose(
        _weight(b, "transformer_layer_1/self_attention_layer/query/kernel"),
        t["bert.encoder.layer.1.attention.self.query.weight"].T.reshape(32, 2, 16),
        rtol=0,
        atol=0,
    )
    # Only 2 of the checkpoint's 4 layers are kept.
    assert not [
        w for w in b.weights if w.path.startswith(("transformer_layer_2", "transformer_layer_3"))
    ]


def test_architecture_mismatch_names_checkpoint_weight_and_shapes(hf_bert):
    d, _ = hf_bert
    with pytest.raises(pretrained.CheckpointError) as err:
        TextEncoder(len(C.CASED_VOCAB), 1, 2, 64, 64, max_sequence_length=16, init_from=d)
    msg = str(err.value)
    assert d in msg and "token_embedding/embeddings" in msg
    assert "(36, 32)" in msg and "(36, 64)" in msg


def test_resolve_model_config_takes_architecture_from_checkpoints(hf_bert, hf_vit):
    mc = config_lib.tiny_model_config(
        vocab_size=10, text_init=hf_bert[0], image_init=hf_vit[0], vit_width=8, text_width=8
    )
    out = pretrained.resolve_model_config(dataclasses.replace(mc, text_layers=3))
    assert (out.patch_size, out.vit_layers, out.vit_heads, out.vit_width, out.vit_mlp) == (
        8,
        2,
        2,
        32,
        64,
    )
    assert (out.text_layers, out.text_width, out.text_heads, out.text_mlp) == (3, 32, 2, 64)
    assert out.vocab_size == len(C.CASED_VOCAB) and out.image_size == 32
    with pytest.raises(
        pretrained.CheckpointError, match="text_layers=5 but checkpoint .* 4 layers"
    ):
        pretrained.resolve_model_config(dataclasses.replace(mc, text_layers=5))
    with pytest.raises(pretrained.CheckpointError, match="max_length=65 .* 64 position"):
        pretrained.resolve_model_config(dataclasses.replace(mc, max_length=65))


# ------------------------------------------------------------------ tokenizer


def _pieces(t, text):
    ids, _ = t(tf.constant([text]))
    return t.detokenize(ids.numpy()[0])


def test_checkpoint_tokenizer_is_cased_and_lowercasing_is_a_recipe_option(hf_bert):
    d, _ = hf_bert
    data = config_lib.DataConfig(max_length=16)
    cased = tok.report_tokenizer(data, d)
    assert cased.get_vocabulary() == list(C.CASED_VOCAB) and not cased.lowercase
    # Hand-checked against the vocabulary: upper-case pieces exist and are used.
    assert _pieces(cased, "Left Lung is clear.") == [
        "[CLS]", "Left", "Lung", "is", "clear", ".", "[SEP]",
    ]  # fmt: skip
    assert _pieces(cased, "No pneumothorax, mild edema") == [
        "[CLS]", "No", "pneumo", "##thorax", ",", "mild", "edema", "[SEP]",
    ]  # fmt: skip
    assert _pieces(cased, "LEFT") == ["[CLS]", "[UNK]", "[SEP]"]  # cased: no such piece
    lower = tok.report_tokenizer(dataclasses.replace(data, lowercase_reports=True), d)
    assert _pieces(lower, "Left Lung is clear.") == [
        "[CLS]", "left", "lung", "is", "clear", ".", "[SEP]",
    ]  # fmt: skip
    # Special token ids are the checkpoint's, not our learned vocabularies' layout.
    assert (cased.pad_id, cased.unk_id, cased.cls_id, cased.sep_id) == (0, 2, 3, 4)


def test_casing_without_tokenizer_config_follows_the_vocabulary(tmp_path):
    cased_dir, uncased_dir = str(tmp_path / "cased"), str(tmp_path / "uncased")
    C.write_hf_bert(cased_dir, do_lower_case=None)
    lower_vocab = [t for t in C.CASED_VOCAB if t == t.lower() or t.startswith("[")]
    C.write_hf_bert(uncased_dir, do_lower_case=None, vocab=lower_vocab)
    assert pretrained.wordpiece(cased_dir)[1] is False
    assert pretrained.wordpiece(uncased_dir)[1] is True
    # tokenizer_config.json wins when present.
    C.write_hf_bert(str(tmp_path / "forced"), do_lower_case=True)
    assert pretrained.wordpiece(str(tmp_path / "forced"))[1] is True


def test_keras_hub_preset_tokenizer_and_weights(tmp_path):
    d = str(tmp_path / "kh_bert")
    src = C.write_keras_hub_bert(d, lowercase=False)
    t = tok.report_tokenizer(config_lib.DataConfig(max_length=16), d)
    assert t.get_vocabulary() == list(C.CASED_VOCAB) and not t.lowercase
    enc = TextEncoder(len(C.CASED_VOCAB), 4, 2, 32, 64, max_sequence_length=16, init_from=d)
    for path in (
        "token_embedding/embeddings",
        "transformer_layer_3/self_attention_layer/key/kernel",
    ):
        np.testing.assert_array_equal(_weight(enc.backbone, path), _weight(src, path))


def test_vocab_file_must_match_the_checkpoint(hf_bert, tmp_path):
    other = tmp_path / "vocab.txt"
    other.write_text("".join(t + "\n" for t in tok.SPECIAL_TOKENS + ("lung",)))
    data = config_lib.DataConfig(max_length=16, vocab_file=str(other))
    with pytest.raises(ValueError, match="is not the vocabulary of --text_init"):
        tok.report_tokenizer(data, hf_bert[0])


# ------------------------------------------------------------------ image


def test_vit_grayscale_equals_rgb_checkpoint_on_its_own_normalisation(hf_vit):
    """Our 1-channel input x = 2p - 1 gives the same tokens as keras-hub's converted RGB
    backbone on the checkpoint's ImageNet-normalised 3-channel image."""
    d, t = hf_vit
    enc = ViTImageEncoder(32, 8, 2, 2, 32, 64, init_from=d)
    ref = keras_hub.models.Backbone.from_preset(d)
    p = RNG.uniform(0, 1, (2, 32, 32, 1)).astype("float32")
    rgb = (np.repeat(p, 3, axis=-1) - np.array(C.IMAGENET_MEAN)) / np.array(C.IMAGENET_STD)
    expected = np.asarray(ref(rgb.astype("float32")))
    cls, tokens = enc(2 * p - 1)
    np.testing.assert_allclose(np.asarray(cls), expected[:, 0], atol=2e-5)
    np.testing.assert_allclose(np.asarray(tokens), expected[:, 1:], atol=2e-5)
    np.testing.assert_array_equal(
        _weight(enc.backbone, "vit_patching_and_embedding/class_token"),
        t["vit.embeddings.cls_token"],
    )


def test_fold_grayscale_patch_embedding_by_hand():
    k = np.zeros((1, 1, 3, 1), "float32")
    k[0, 0, :, 0] = [1.0, 2.0, 3.0]
    folded, bias = fold_grayscale_patch_embedding(
        k, np.array([0.5], "float32"), [2, 2, 2], [-1, -1, -1]
    )
    np.testing.assert_allclose(folded[0, 0, :, 0], [6.0])  # 0.5·2·(1+2+3): plain sum
    np.testing.assert_allclose(bias, [0.5])  # (2/2 - 1) = 0: no shift
    folded, bias = fold_grayscale_patch_embedding(k, np.zeros(1, "float32"), [4, 4, 4], [0, 0, 0])
    np.testing.assert_allclose(folded[0, 0, :, 0], [12.0])
    np.testing.assert_allclose(bias, [12.0])  # x = -1 (black) → p = 0 → input 0


def test_vit_positions_interpolated_to_another_image_size(hf_vit):
    d, t = hf_vit
    enc = ViTImageEncoder(48, 8, 2, 2, 32, 64, init_from=d)
    pos = _weight(enc.backbone, "vit_patching_and_embedding/position_embedding/embeddings")
    src = t["vit.embeddings.position_embeddings"][0]
    assert pos.shape == (1 + 36, 32)
    np.testing.assert_array_equal(pos[0], src[0].astype("float32"))  # class token kept
    grid = tf.image.resize(src[1:].reshape(1, 4, 4, 32), (6, 6), method="bicubic")
    np.testing.assert_allclose(pos[1:], grid.numpy().reshape(36, 32), atol=1e-6)


def test_keras_hub_vit_preset(tmp_path):
    d = str(tmp_path / "kh_vit")
    src = C.write_keras_hub_vit(d)
    enc = ViTImageEncoder(32, 8, 2, 2, 32, 64, init_from=d)
    path = "vit_encoder/transformer_block_2/mha/query/kernel"
    np.testing.assert_array_equal(_weight(enc.backbone, path), _weight(src, path))


# ------------------------------------------------------------------ bad checkpoints


def test_corrupt_and_truncated_safetensors_name_the_file(tmp_path):
    d = str(tmp_path / "bert")
    C.write_hf_bert(d)
    weights = os.path.join(d, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated download
    with pytest.raises(pretrained.CheckpointError, match="corrupt or truncated") as err:
        TextEncoder(len(C.CASED_VOCAB), 1, 2, 32, 64, max_sequence_length=16, init_from=d)
    assert weights in str(err.value)
    with open(weights, "wb") as f:
        f.write(b"\x00" * 64)  # not a safetensors file at all
    with pytest.raises(pretrained.CheckpointError, match="corrupt or truncated"):
        tok.report_tokenizer(config_lib.DataConfig(max_length=16), d)


def test_wrong_family_names_the_file(hf_vit, tmp_path):
    with pytest.raises(pretrained.CheckpointError, match="model_type 'vit'") as err:
        TextEncoder(36, 1, 2, 32, 64, max_sequence_length=16, init_from=hf_vit[0])
    assert os.path.join(hf_vit[0], "config.json") in str(err.value)
    kh = str(tmp_path / "kh_vit")
    C.write_keras_hub_vit(kh)
    with pytest.raises(pretrained.CheckpointError, match="keras-hub ViTBackbone, not a bert"):
        tok.report_tokenizer(config_lib.DataConfig(max_length=16), kh)


def test_missing_vocabulary_names_the_file(tmp_path):
    d = str(tmp_path / "bert")
    C.write_hf_bert(d)
    os.remove(os.path.join(d, "vocab.txt"))
    with pytest.raises(pretrained.CheckpointError, match="has no vocab.txt") as err:
        tok.report_tokenizer(config_lib.DataConfig(max_length=16), d)
    assert os.path.join(d, "vocab.txt") in str(err.value)


def test_pytorch_only_checkpoint_says_how_to_get_safetensors(tmp_path):
    d = str(tmp_path / "old_repo")
    C.write_hf_bert(d)
    os.replace(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(pretrained.CheckpointError) as err:
        TextEncoder(len(C.CASED_VOCAB), 1, 2, 32, 64, max_sequence_length=16, init_from=d)
    msg = str(err.value)
    assert "no model.safetensors (it has only pytorch_model.bin)" in msg
    assert "--revision refs/pr/N" in msg and "safe_serialization=True" in msg


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(pretrained.CheckpointError, match="neither a keras-hub preset"):
        ViTImageEncoder(32, 8, 1, 2, 32, 64, init_from=str(tmp_path))


@pytest.mark.parametrize("why", ["hf_hub_offline", "unreachable"])
def test_hub_handle_offline_fails_fast_naming_handle(why, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    if why == "hf_hub_offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(pretrained, "_reachable", lambda *a, **k: False)
    handle = "hf://emilyalsentzer/Bio_ClinicalBERT"
    start = time.monotonic()
    with pytest.raises(pretrained.CheckpointError) as err:
        tok.report_tokenizer(config_lib.DataConfig(max_length=16), handle)
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert f"cannot download {handle}" in msg
    assert "hf download emilyalsentzer/Bio_ClinicalBERT --local-dir DIR" in msg
    assert ("HF_HUB_OFFLINE is set" if why == "hf_hub_offline" else "unreachable") in msg
    print(f"offline failure after {elapsed:.2f} s")  # figure for the README, not asserted


def test_unknown_name_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="no_such_preset_or_dir"):
        pretrained.resolve("no_such_preset_or_dir", "image encoder", "vit")


# ------------------------------------------------------------------ train + export


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from place_tf.data import synthetic

    d = str(tmp_path_factory.mktemp("corpus"))
    synthetic.generate_corpus(d, 24, image_size=32, seed=0, num_shards=1, workers=1)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hugging_face", "keras_hub"])
def test_train_and_export_from_checkpoints(fmt, tiny_corpus, tmp_path):
    """A short run from each checkpoint format; the SavedModel's embed_text tokenizes with
    the checkpoint's (cased) vocabulary and equals the in-memory model."""
    import keras
    import tensorflow_text  # noqa: F401  (the SavedModel's tokenizer ops)

    from place_tf import export as export_lib
    from place_tf.config import Configs
    from place_tf.training.loop import Trainer

    text, image = str(tmp_path / "text"), str(tmp_path / "image")
    if fmt == "hugging_face":
        C.write_hf_bert(text, seed=3)
        C.write_hf_vit(image, seed=4)
    else:
        C.write_keras_hub_bert(text)
        C.write_keras_hub_vit(image)
    values = dict(config_lib.TINY_MODEL_FIELDS)
    values.update(
        corpus_dir=tiny_corpus,
        model_dir=str(tmp_path / "run"),
        max_steps=2,
        per_replica_batch=4,
        jit_compile=False,
        text_init=text,
        image_init=image,
        vit_width=8,  # replaced by the checkpoint's 32
    )
    cfg = Configs(**config_lib.from_flat(values, "convirt"))
    keras.utils.set_random_seed(0)
    trainer = Trainer(cfg)
    summary = trainer.run()
    assert summary["steps"] == 2
    mc = trainer.model.model_config
    assert (mc.vit_width, mc.text_width, mc.vocab_size) == (32, 32, len(C.CASED_VOCAB))
    assert trainer.tokenizer.get_vocabulary() == list(C.CASED_VOCAB)

    out = export_lib.export_saved_model(
        trainer.model, trainer.tokenizer, str(tmp_path / "serving" / "1"), image_size=32
    )
    with open(os.path.join(out, "assets", "vocab.txt"), encoding="utf-8") as f:
        assert f.read().split("\n")[:-1] == list(C.CASED_VOCAB)
    reports = ["Left Lung is clear.", "left lung is clear."]
    served = tf.saved_model.load(out).signatures["embed_text"](reports=tf.constant(reports))
    ids, mask = trainer.tokenizer(tf.constant(reports))
    assert ids.numpy()[0, 1] == C.CASED_VOCAB.index("Left")  # cased, as the checkpoint
    expected = trainer.model.encode_text(ids, mask, training=False)["text_embedding"]
    np.testing.assert_allclose(served["text_embedding"].numpy(), np.asarray(expected), atol=1e-5)
    # Casing reaches the embedding: the two spellings are different token sequences.
    assert not np.allclose(served["text_embedding"].numpy()[0], served["text_embedding"].numpy()[1])


def test_preset_name_offline_names_kaggle_handle_and_cache(monkeypatch):
    monkeypatch.setattr(pretrained, "_reachable", lambda *a, **k: False)
    monkeypatch.setattr(pretrained, "_kaggle_cached", lambda handle: False)
    with pytest.raises(pretrained.CheckpointError) as err:
        pretrained.resolve("vit_base_patch16_224_imagenet", "image encoder", "vit")
    msg = str(err.value)
    assert "cannot download kaggle://keras/vit/keras/vit_base_patch16_224_imagenet" in msg
    assert "kagglehub.model_download('keras/vit/keras/vit_base_patch16_224_imagenet" in msg
    assert "KAGGLEHUB_CACHE" in msg
