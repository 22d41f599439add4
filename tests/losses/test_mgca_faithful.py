"""MGCA's code path (HKU-MedAI/MGCA mgca/models/mgca/mgca_module.py): parameter-free token
attention, the summed ITA, and the token alignment against a NumPy transcription of
MGCA.forward (loops written as its torch code is)."""

import math

import numpy as np
import pytest
import tensorflow as tf

from place_tf.losses.gather import per_example_to_replica
from place_tf.losses.ita import ita_loss
from place_tf.losses.mgca import (
    cross_attend,
    cta_parameter_free_per_example,
    quantile_clipped_weights,
)


def f32(x):
    return tf.constant(np.asarray(x, "float32"))


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def ce(logits, target):
    z = logits - logits.max()
    return -(z[target] - math.log(np.exp(z).sum()))


def test_parameter_free_attention_2x3_by_hand():
    q = [[[1.0, 0.0], [0.0, 1.0]]]
    k = [[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]
    got = cross_attend(f32(q), f32(k), None, 0.1).numpy()[0]
    e = math.exp(10.0)  # q1.k = (1, 0, 0) / 0.1 -> softmax (e^10, 1, 1) / (e^10 + 2)
    np.testing.assert_allclose(got[0], [e / (e + 2), 1 / (e + 2)], rtol=1e-6)
    np.testing.assert_allclose(got[1], [1 / (e + 2), e / (e + 2)], rtol=1e-6)
    # Key 2 masked: q1 -> (e^10 k1 + k2) / (e^10 + 1).
    got = cross_attend(f32(q), f32(k), np.array([[True, True, False]]), 0.1).numpy()[0]
    np.testing.assert_allclose(got[0], [e / (e + 1), 1 / (e + 1)], rtol=1e-6)


def test_summed_ita_by_hand():
    x = f32([[1.0, 0.0], [0.6, 0.8]])  # cosines: 1 on the diagonal, 0.6 off it
    a = 1 / 0.07  # every row and column CE is log(1 + e^(0.6a - a))
    one_direction = math.log1p(math.exp(-0.4 * a))
    np.testing.assert_allclose(ita_loss(x, x, a).numpy(), one_direction, rtol=1e-5)
    np.testing.assert_allclose(
        ita_loss(x, x, a, sum_directions=True).numpy(), 2 * one_direction, rtol=1e-5
    )


def mgca_local_reference(
    patch, word, pad, temp, normalize_patch_attended=False, word_w=None, patch_w=None
):
    """MGCA.forward's loss_local (bidirectional), float64; word/patch weights are
    normalised per example (uniform when None; padding words weigh 0)."""
    bz, n = patch.shape[:2]
    length = word.shape[1]
    word_w = (~pad).astype(float) if word_w is None else word_w * ~pad
    word_w = word_w / word_w.sum(1, keepdims=True)
    patch_w = np.ones((bz, n)) if patch_w is None else patch_w
    patch_w = patch_w / patch_w.sum(1, keepdims=True)
    loss_word_1 = loss_word_2 = loss_patch_1 = loss_patch_2 = 0.0
    for b in range(bz):
        att = softmax(word[b] @ patch[b].T / temp)
        word_out = unit(att @ patch[b])
        word_sim = word[b] @ word_out.T / temp
        for i in range(length):
            loss_word_1 += ce(word_sim[i], i) * word_w[b, i] / bz
            loss_word_2 += ce(word_sim[:, i], i) * word_w[b, i] / bz
        sim = patch[b] @ word[b].T
        sim[:, pad[b]] = -np.inf
        patch_out = softmax(sim / temp) @ word[b]
        if normalize_patch_attended:
            patch_out = unit(patch_out)
        patch_sim = patch[b] @ patch_out.T / temp
        for i in range(n):
            loss_patch_1 += ce(patch_sim[i], i) * patch_w[b, i] / bz
            loss_patch_2 += ce(patch_sim[:, i], i) * patch_w[b, i] / bz
    return (loss_word_1 + loss_word_2) / 2 + (loss_patch_1 + loss_patch_2) / 2


@pytest.mark.parametrize("normalize_patch_attended", [False, True])
def test_parameter_free_cta_matches_mgca_code(normalize_patch_attended):
    rng = np.random.default_rng(3)
    patch = unit(rng.normal(size=(2, 4, 5)))
    word = unit(rng.normal(size=(2, 3, 5)))
    pad = np.array([[False, False, True], [False, False, False]])
    got = per_example_to_replica(
        cta_parameter_free_per_example(
            f32(patch), f32(word), ~pad, 0.1, normalize_patch_attended=normalize_patch_attended
        )
    )
    want = mgca_local_reference(patch, word, pad, 0.1, normalize_patch_attended)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)


def test_padding_words_are_negatives_but_carry_no_weight():
    """As in MGCA, a padding word changes the loss only through the softmaxes."""
    rng = np.random.default_rng(4)
    patch = unit(rng.normal(size=(1, 4, 5)))
    word = unit(rng.normal(size=(1, 3, 5)))
    mask = np.array([[True, True, False]])
    base = cta_parameter_free_per_example(f32(patch), f32(word), mask).numpy()
    moved = word.copy()
    moved[0, 2] = unit(rng.normal(size=5))
    other = cta_parameter_free_per_example(f32(patch), f32(moved), mask).numpy()
    assert abs(other[0] - base[0]) > 1e-4
    np.testing.assert_allclose(
        other, mgca_local_reference(patch, moved, ~mask, 0.1)[None], rtol=1e-5
    )


def test_parameter_free_cta_rejects_bad_mask():
    x = f32(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="cta_parameter_free: word_mask must be"):
        cta_parameter_free_per_example(x, x, np.ones((2, 4), bool))


def test_quantile_clipped_weights_match_torch_quantile_semantics():
    rng = np.random.default_rng(5)
    w = rng.uniform(0.0, 1.0, size=(3, 7)).astype("float32")
    mask = np.ones((3, 7), bool)
    mask[1, 4:] = False  # 4 real words
    mask[2, 1:] = False  # a single real word: clipped to itself
    got = quantile_clipped_weights(f32(w), mask).numpy()
    for b in range(3):
        real = w[b, mask[b]]
        lo, hi = np.quantile(real, 0.1), np.quantile(real, 0.9)  # linear, as torch.quantile
        np.testing.assert_allclose(got[b, mask[b]], np.clip(real, lo, hi), rtol=1e-6)
        assert np.all(got[b, ~mask[b]] == 0.0)
    # By hand: 0, 1, ..., 10 -> quantiles 1 and 9.
    ramp = np.arange(11, dtype="float32")[None]
    np.testing.assert_allclose(
        quantile_clipped_weights(f32(ramp)).numpy()[0], np.clip(ramp[0], 1.0, 9.0)
    )


def test_parameter_free_cta_with_clipped_attention_weights_matches_mgca_code():
    rng = np.random.default_rng(6)
    patch = unit(rng.normal(size=(2, 5, 4)))
    word = unit(rng.normal(size=(2, 4, 4)))
    pad = np.array([[False, False, False, True], [False, False, False, False]])
    word_attn = rng.uniform(0.01, 1.0, size=(2, 4)) * ~pad
    patch_attn = rng.uniform(0.01, 1.0, size=(2, 5))
    word_w = quantile_clipped_weights(f32(word_attn), ~pad)
    patch_w = quantile_clipped_weights(f32(patch_attn))
    got = per_example_to_replica(
        cta_parameter_free_per_example(
            f32(patch), f32(word), ~pad, 0.1, word_weights=word_w, patch_weights=patch_w
        )
    )
    want = mgca_local_reference(
        patch, word, pad, 0.1, word_w=word_w.numpy(), patch_w=patch_w.numpy()
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5)
