"""Encoders and PLACE layers: shapes, masking, get_config/from_config round trips, presets."""

import keras
import keras_hub
import numpy as np
import pytest

from place_tf.models.image_encoders import ResNetImageEncoder, ViTImageEncoder
from place_tf.models.layers.correlation_decoder import CorrelationDecoder
from place_tf.models.layers.mgca_heads import PrototypeLayer, TokenCrossAttention
from place_tf.models.layers.observation_extractor import (
    CrossAttentionBlock,
    LearnedQueries,
    ObservationExtractor,
)
from place_tf.models.layers.projection_head import ProjectionHead
from place_tf.models.text_encoder import TextEncoder

RNG = np.random.default_rng(0)


def _rand(*shape):
    return RNG.normal(size=shape).astype("float32")


def _mask(lengths, length):
    return np.arange(length)[None, :] < np.asarray(lengths)[:, None]


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _assert_round_trip(layer, *args, **kwargs):
    """A layer rebuilt from its config, with copied weights, gives identical outputs."""
    out = _as_tuple(layer(*args, **kwargs))
    clone = layer.__class__.from_config(layer.get_config())
    clone(*args, **kwargs)  # build
    assert len(clone.get_weights()) == len(layer.get_weights()) > 0
    clone.set_weights(layer.get_weights())
    out2 = _as_tuple(clone(*args, **kwargs))
    assert len(out) == len(out2)
    for a, b in zip(out, out2, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Registered serializable: the generic serializer finds the class again.
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is type(layer)


# ------------------------------------------------------------------ image encoders


@pytest.fixture(scope="module")
def vit():
    return ViTImageEncoder(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )


def test_vit_shapes_and_grid(vit):
    images = _rand(3, 32, 32, 1)
    cls, tokens = vit(images)
    assert cls.shape == (3, 32) and tokens.shape == (3, 16, 32)
    assert (vit.grid_size, vit.num_patches, vit.token_dim) == (4, 16, 32)


def test_vit_encode_patches_all_kept_equals_forward(vit):
    images = _rand(2, 32, 32, 1)
    cls, tokens = vit(images)
    cls2, tokens2 = vit.encode_patches(images)
    np.testing.assert_allclose(cls2, cls, atol=1e-5)
    np.testing.assert_allclose(tokens2, tokens, atol=1e-5)


def test_vit_encode_patches_gathers_the_kept_patches(vit):
    images = _rand(2, 32, 32, 1)
    _, tokens = vit(images)
    # A permutation of ALL patches: the transformer is permutation-equivariant once the
    # position embeddings are added, so the output is the forward's tokens, permuted.
    perm = np.stack([RNG.permutation(16), RNG.permutation(16)]).astype("int32")
    _, permuted = vit.encode_patches(images, perm)
    np.testing.assert_allclose(
        permuted, np.take_along_axis(np.asarray(tokens), perm[..., None], 1), atol=1e-4
    )
    # A subset: M tokens come back, and they differ from the full view's (fewer keys).
    keep = perm[:, :6]
    _, visible = vit.encode_patches(images, keep)
    assert visible.shape == (2, 6, 32)
    assert not np.allclose(
        visible, np.take_along_axis(np.asarray(tokens), keep[..., None], 1), atol=1e-4
    )


def test_vit_rejects_indivisible_patch_size():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        ViTImageEncoder(
            image_size=30, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
        )


def test_vit_round_trip(vit):
    _assert_round_trip(vit, _rand(2, 32, 32, 1))


@pytest.fixture(scope="module")
def resnet():
    return ResNetImageEncoder(image_size=64, token_dim=32)


def test_resnet_shapes(resnet):
    pooled, tokens = resnet(_rand(2, 64, 64, 1))
    assert pooled.shape == (2, 2048) and tokens.shape == (2, 16, 32)
    assert (resnet.grid_size, resnet.num_patches, resnet.patch_size) == (4, 16, 16)


def test_resnet_encode_patches_zeroes_masked_cells(resnet):
    images = _rand(2, 64, 64, 1)
    keep = np.array([[0, 5, 15], [3, 4, 10]], "int32")
    pooled, visible = resnet.encode_patches(images, keep)
    # Hand-built masked input: 16x16 cells outside `keep` set to 0.
    masked = images.copy()
    for b in range(2):
        for cell in range(16):
            if cell not in keep[b]:
                r, c = divmod(cell, 4)
                masked[b, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16] = 0.0
    ref_pooled, ref_tokens = resnet(masked)
    np.testing.assert_allclose(pooled, ref_pooled, atol=1e-4)
    np.testing.assert_allclose(
        visible, np.take_along_axis(np.asarray(ref_tokens), keep[..., None], 1), atol=1e-4
    )
    # All kept: the plain forward.
    _, full = resnet.encode_patches(images, None)
    np.testing.assert_allclose(full, resnet(images)[1], atol=1e-5)


def test_resnet_needs_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        ResNetImageEncoder(image_size=48, token_dim=8)


# ------------------------------------------------------------------ text encoder


@pytest.fixture(scope="module")
def bert():
    return TextEncoder(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )


def test_text_encoder_shapes_mask_and_padding_invariance(bert):
    ids = RNG.integers(1, 64, (2, 16)).astype("int32")
    mask = _mask([16, 7], 16)
    cls, states, out_mask = bert(ids, mask)
    assert cls.shape == (2, 32) and states.shape == (2, 16, 32)
    np.testing.assert_array_equal(out_mask, mask)
    # Default pooling: the mean of the real tokens' states (hand-computed).
    st = np.asarray(states)
    np.testing.assert_allclose(cls[0], st[0].mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cls[1], st[1, :7].mean(axis=0), rtol=1e-5, atol=1e-6)
    # Changing the ids under padding does not change any real token's state, nor the pool.
    ids2 = ids.copy()
    ids2[1, 7:] = 3
    pooled2, states2, _ = bert(ids2, mask)
    np.testing.assert_allclose(np.asarray(states2)[1, :7], st[1, :7], atol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled2)[1], np.asarray(cls)[1], atol=1e-5)


def test_text_encoder_cls_pooling_and_config_round_trip(bert):
    cls_bert = TextEncoder.from_config({**bert.get_config(), "pooling": "cls"})
    assert TextEncoder.from_config(bert.get_config()).pooling == "mean"
    ids = RNG.integers(1, 64, (2, 16)).astype("int32")
    cls, states, _ = cls_bert(ids, _mask([16, 7], 16))
    np.testing.assert_array_equal(cls, np.asarray(states)[:, 0])
    with pytest.raises(ValueError, match="text pooling must be one of"):
        TextEncoder(vocabulary_size=64, pooling="max")


def test_text_encoder_pooled_head_frozen(bert):
    names = [v.path for v in bert.trainable_variables]
    assert names and not any("pooled_dense" in n for n in names)
    assert any("pooled_dense" in v.path for v in bert.non_trainable_variables)


def test_text_encoder_round_trip(bert):
    ids = RNG.integers(1, 64, (2, 16)).astype("int32")
    _assert_round_trip(bert, ids, _mask([16, 5], 16))


# ------------------------------------------------------------------ presets


def test_vit_init_from_rgb_preset_sums_channels(tmp_path):
    src = keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    src.save_to_preset(str(tmp_path / "vit"))
    enc = ViTImageEncoder(32, 8, 1, 2, 32, 64, init_from=str(tmp_path / "vit"))
    by_path = {w.path: w.numpy() for w in src.weights}
    for w in enc.backbone.weights:
        ref = by_path[w.path]
        if w.path.endswith("patch_embedding/kernel"):
            ref = ref.sum(axis=2, keepdims=True)  # RGB → grayscale
        np.testing.assert_array_equal(w.numpy(), ref)


def test_text_init_truncates_positions_and_checks_shapes(tmp_path):
    src = keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=32,
    )
    src.save_to_preset(str(tmp_path / "bert"))
    enc = TextEncoder(64, 1, 2, 32, 64, max_sequence_length=16, init_from=str(tmp_path / "bert"))
    pos = [w for w in enc.backbone.weights if w.path == "position_embedding/embeddings"][0]
    ref = [w for w in src.weights if w.path == "position_embedding/embeddings"][0]
    np.testing.assert_array_equal(pos.numpy(), ref.numpy()[:16])
    with pytest.raises(ValueError, match="token_embedding/embeddings"):
        TextEncoder(128, 1, 2, 32, 64, max_sequence_length=16, init_from=str(tmp_path / "bert"))


def test_missing_preset_dir_raises_naming_it(tmp_path):
    missing = str(tmp_path / "no_such_preset")
    with pytest.raises(FileNotFoundError, match="no_such_preset"):
        ViTImageEncoder(32, 8, 1, 2, 32, 64, init_from=missing)
    with pytest.raises(FileNotFoundError, match="no_such_preset"):
        TextEncoder(64, 1, 2, 32, 64, max_sequence_length=16, init_from=missing)


# ------------------------------------------------------------------ PLACE layers


def test_projection_head_normalised_and_round_trip():
    head = ProjectionHead(8, hidden_dim=16)
    x = _rand(5, 12)
    y = np.asarray(head(x))
    assert y.shape == (5, 8) and y.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, atol=1e-5)
    # Works on any rank (observation slots).
    assert head(_rand(2, 3, 12)).shape == (2, 3, 8)
    raw = ProjectionHead(8, hidden_dim=0, normalize=False)
    assert not np.allclose(np.linalg.norm(np.asarray(raw(x)), axis=-1), 1.0)
    _assert_round_trip(head, x)


def test_learned_queries_round_trip():
    q = LearnedQueries(4, 8)
    out = q(_rand(3, 5, 2))
    assert out.shape == (3, 4, 8)
    np.testing.assert_array_equal(np.asarray(out)[0], np.asarray(out)[2])
    _assert_round_trip(q, _rand(3, 5, 2))


def test_observation_extractor_attention_maps():
    ext = ObservationExtractor(num_layers=2, num_heads=2, width=16)
    tokens, queries = _rand(2, 10, 24), _rand(2, 4, 16)
    mask = _mask([10, 6], 10)
    obs, attn = ext(tokens, queries, token_mask=mask)
    assert obs.shape == (2, 4, 16) and attn.shape == (2, 4, 10)
    attn = np.asarray(attn)
    np.testing.assert_allclose(attn.sum(-1), 1.0, atol=1e-5)
    assert (attn >= 0).all()
    np.testing.assert_allclose(attn[1, :, 6:], 0.0, atol=1e-6)  # padding gets no attention
    # Padded tokens do not influence the observations.
    tokens2 = tokens.copy()
    tokens2[1, 6:] = 100.0
    obs2, _ = ext(tokens2, queries, token_mask=mask)
    np.testing.assert_allclose(np.asarray(obs2)[1], np.asarray(obs)[1], atol=1e-5)
    _assert_round_trip(ext, tokens, queries, token_mask=mask)


def test_observation_extractor_unmasked():
    ext = ObservationExtractor(num_layers=1, num_heads=2, width=16)
    _, attn = ext(_rand(2, 9, 16), _rand(2, 3, 16))
    np.testing.assert_allclose(np.asarray(attn).sum(-1), 1.0, atol=1e-5)


def test_cross_attention_block_round_trip():
    block = CrossAttentionBlock(num_heads=2, width=16, self_attention=False)
    x, ctx = _rand(2, 3, 16), _rand(2, 5, 8)
    out, attn = block(x, ctx, context_mask=_mask([5, 2], 5))
    assert out.shape == (2, 3, 16) and attn.shape == (2, 3, 5)
    _assert_round_trip(block, x, ctx, context_mask=_mask([5, 2], 5))
    with pytest.raises(ValueError, match="divisible"):
        CrossAttentionBlock(num_heads=3, width=16)


def test_correlation_decoder():
    dec = CorrelationDecoder(num_patches=8, num_layers=1, num_heads=2, width=16, output_dim=12)
    visible = _rand(2, 3, 20)
    keep = np.array([[0, 4, 7], [1, 2, 6]], "int32")
    ctx, ctx_mask = _rand(2, 5, 24), _mask([5, 3], 5)
    out = np.asarray(dec(visible, keep, ctx, context_mask=ctx_mask))
    assert out.shape == (2, 8, 12)
    # The visible set is what matters, not its order: permuting (token, index) pairs
    # together gives the same prediction.
    order = np.array([2, 0, 1])
    out_perm = dec(visible[:, order], keep[:, order], ctx, context_mask=ctx_mask)
    np.testing.assert_allclose(out_perm, out, atol=1e-5)
    # The prediction is conditioned on the report, and padded report tokens are ignored.
    ctx2 = ctx.copy()
    ctx2[1, 3:] = 50.0
    np.testing.assert_allclose(dec(visible, keep, ctx2, context_mask=ctx_mask), out, atol=1e-5)
    ctx3 = ctx.copy()
    ctx3[1, 0] = _rand(24) * 3.0  # (a constant shift would be undone by LayerNorm)
    assert not np.allclose(np.asarray(dec(visible, keep, ctx3, context_mask=ctx_mask))[1], out[1])
    _assert_round_trip(dec, visible, keep, ctx, context_mask=ctx_mask)


def test_token_cross_attention():
    tca = TokenCrossAttention(num_heads=1)
    img, txt, mask = _rand(2, 6, 8), _rand(2, 5, 8), _mask([5, 3], 5)
    img_for_txt, txt_for_img = tca(img, txt, text_mask=mask)
    assert img_for_txt.shape == (2, 5, 8) and txt_for_img.shape == (2, 6, 8)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(txt_for_img), axis=-1), 1.0, atol=1e-5)
    txt2 = txt.copy()
    txt2[1, 3:] = 9.0  # masked words do not reach the patches
    _, t2 = tca(img, txt2, text_mask=mask)
    np.testing.assert_allclose(t2, txt_for_img, atol=1e-5)
    _assert_round_trip(tca, img, txt, text_mask=mask)
    with pytest.raises(ValueError, match="equal widths"):
        TokenCrossAttention()(img, _rand(2, 5, 4))


def test_prototype_layer():
    protos = PrototypeLayer(6, 4)
    p = np.asarray(protos(_rand(2, 4)))
    assert p.shape == (6, 4)
    np.testing.assert_allclose(np.linalg.norm(p, axis=-1), 1.0, atol=1e-5)
    _assert_round_trip(protos, _rand(2, 4))
