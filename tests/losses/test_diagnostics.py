"""Method diagnostics on hand-built tensors: collapsed slots, uniform attention, identity
CCE targets, and the values the diagnostics must give on them."""

import math

import numpy as np
import pytest
import tensorflow as tf

from place_tf.losses.cce import cce_target
from place_tf.losses.diagnostics import (
    attention_entropy,
    cross_sample_cosine,
    diagonal_mass,
    observation_diagnostics,
    within_sample_slot_cosine,
)


def f32(x):
    return tf.constant(np.asarray(x, "float32"))


def test_collapsed_slot_has_cross_sample_cosine_one():
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(5, 3, 4))
    obs[:, 1] = 2.5 * np.array([1.0, -2.0, 0.5, 3.0])  # slot 1: the same vector (any scale)
    obs[:, 2] = 0.0
    obs[:, 2, 0] = [1, -1, 1, -1, 1]  # slot 2: +e0 or -e0: pairs +1 (4 same-sign pairs) ...
    got = cross_sample_cosine(f32(obs)).numpy()
    assert got.shape == (3,)
    np.testing.assert_allclose(got[1], 1.0, atol=1e-6)
    # slot 2: 3 "+" and 2 "-": same-sign ordered pairs 3*2 + 2*1 = 8 (+1), mixed 12 (-1).
    np.testing.assert_allclose(got[2], (8 - 12) / 20, atol=1e-6)
    assert abs(got[0]) < 0.9


def test_orthogonal_slots_have_zero_within_sample_cosine_and_copies_one():
    eye = np.eye(4)[None, :3]  # 1 example, 3 orthogonal slots
    np.testing.assert_allclose(within_sample_slot_cosine(f32(eye)).numpy(), 0.0, atol=1e-7)
    same = np.tile(np.array([[[0.3, -1.0, 2.0]]]), (2, 4, 1))  # every slot identical
    np.testing.assert_allclose(within_sample_slot_cosine(f32(same)).numpy(), 1.0, atol=1e-6)
    # Hand-made: slots (1,0), (1,1) -> cos = 1/sqrt(2) for the only pair.
    two = np.array([[[1.0, 0.0], [1.0, 1.0]]])
    np.testing.assert_allclose(
        within_sample_slot_cosine(f32(two)).numpy(), 1 / math.sqrt(2), atol=1e-6
    )


def test_attention_entropy_uniform_one_peaked_zero_and_mask():
    b, k, n = 2, 3, 5
    attn = np.full((b, k, n), 1.0 / n)
    attn[:, 1] = 0.0
    attn[:, 1, 2] = 1.0  # query 1 looks at one token
    attn[:, 2] = [0.5, 0.5, 0, 0, 0]  # query 2: two of five tokens -> log 2 / log 5
    got = attention_entropy(f32(attn)).numpy()
    np.testing.assert_allclose(got, [1.0, 0.0, math.log(2) / math.log(5)], atol=1e-6)
    # With a mask of 2 real tokens, query 2 is uniform over the real tokens: 1.
    mask = np.array([[True, True, False, False, False]] * b)
    np.testing.assert_allclose(attention_entropy(f32(attn), mask).numpy()[2], 1.0, atol=1e-6)


def test_diagonal_mass_identity_uniform_and_cce_targets():
    n = 4
    np.testing.assert_allclose(diagonal_mass(f32(np.eye(n)[None])).numpy(), 1.0)
    np.testing.assert_allclose(diagonal_mass(f32(np.full((2, n, n), 1 / n))).numpy(), 0.25)
    # Orthogonal patches at tau_t = 0.05: row i = softmax(20 on i, 0 elsewhere).
    target = cce_target(f32(np.eye(n)[None]), 0.05)
    want = math.exp(20) / (math.exp(20) + n - 1)
    np.testing.assert_allclose(diagonal_mass(target).numpy(), want, rtol=1e-6)
    # The no-diagonal target puts exactly nothing there.
    target = cce_target(f32(np.eye(n)[None]), 0.05, exclude_diagonal=True)
    assert diagonal_mass(target).numpy() == 0.0
    np.testing.assert_allclose(target.numpy()[0].sum(-1), 1.0, atol=1e-6)


def test_centred_cce_target_hand_computed():
    # x = (1,0), (0,1), (1,1); mean (2/3, 2/3); deviations d1=(1,-2)/3, d2=(-2,1)/3,
    # d3=(1,1)/3: cos(d1,d2) = -4/5, cos(d1,d3) = cos(d2,d3) = -1/sqrt(10).
    x = f32([[[1, 0], [0, 1], [1, 1]]])
    tau = 0.5
    got = cce_target(x, tau, center=True).numpy()[0]
    c = -1 / math.sqrt(10)
    row0 = np.exp(np.array([1.0, -0.8, c]) / tau)
    row2 = np.exp(np.array([c, c, 1.0]) / tau)
    np.testing.assert_allclose(got[0], row0 / row0.sum(), rtol=1e-5)
    np.testing.assert_allclose(got[2], row2 / row2.sum(), rtol=1e-5)


def test_observation_diagnostics_keys_and_values():
    obs = np.tile(np.array([1.0, 0.0, 0.0]), (3, 2, 1))  # every slot of every example equal
    attn = np.full((3, 2, 4), 0.25)
    got = observation_diagnostics("vpor", f32(obs), f32(attn))
    assert set(got) == {
        "vpor_cross_cos",
        "vpor_slot_cos",
        "vpor_attn_entropy",
        "vpor_cross_cos_0",
        "vpor_cross_cos_1",
        "vpor_attn_entropy_0",
        "vpor_attn_entropy_1",
    }
    for v in got.values():
        np.testing.assert_allclose(v.numpy(), 1.0, atol=1e-6)


def test_diagnostics_carry_no_gradient():
    x = tf.Variable(np.random.default_rng(1).normal(size=(3, 2, 4)).astype("float32"))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(cross_sample_cosine(x)) + within_sample_slot_cosine(x)
    assert tape.gradient(y, x) is None


def test_rank_errors_name_the_function():
    with pytest.raises(ValueError, match="cross_sample_cosine: observations must have rank 3"):
        cross_sample_cosine(f32(np.ones((2, 3))))
    with pytest.raises(ValueError, match="attention_entropy: attention must have rank 3"):
        attention_entropy(f32(np.ones((2, 3))))
