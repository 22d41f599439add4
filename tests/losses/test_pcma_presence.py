"""PCMA's presence-weighted L_inter ([design] option of issue #21) on hand-computed values."""

import math

import numpy as np
import tensorflow as tf

from place_tf.losses.pcma import pcma_loss, text_presence


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def obs(seed, b=3, k=2, d=4):
    return unit(np.random.default_rng(seed).normal(size=(b, k, d))).astype("float32")


def positive_loss(v, t, scale, i, k):
    """0.5 * (CE of image i over reports + CE of report i over images), slot k (float64)."""
    z = scale * v[:, k].astype("float64") @ t[:, k].astype("float64").T
    row = z[i, i] - math.log(np.exp(z[i]).sum())
    col = z[i, i] - math.log(np.exp(z[:, i]).sum())
    return -0.5 * (row + col)


def test_uniform_presence_equals_plain_pcma():
    v, t = obs(0), obs(1)
    plain = pcma_loss(v, t, 5.0)
    weighted = pcma_loss(v, t, 5.0, presence=np.full((3, 2), 0.3, "float32"))
    for key in ("total", "inter", "slot"):
        np.testing.assert_allclose(weighted[key].numpy(), plain[key].numpy(), rtol=1e-6)


def test_presence_selects_the_weighted_positives():
    v, t = obs(2), obs(3)
    presence = np.zeros((3, 2), "float32")
    presence[0, 1] = 1.0  # only pair 0 has the pathology of slot 1
    got = pcma_loss(v, t, 4.0, presence=presence)
    np.testing.assert_allclose(got["inter"].numpy(), positive_loss(v, t, 4.0, 0, 1), rtol=1e-5)
    presence[2, 0] = 3.0  # weighted mean of two positives
    got = pcma_loss(v, t, 4.0, presence=presence)
    want = (positive_loss(v, t, 4.0, 0, 1) + 3.0 * positive_loss(v, t, 4.0, 2, 0)) / 4.0
    np.testing.assert_allclose(got["inter"].numpy(), want, rtol=1e-5)
    # The slot term does not depend on presence.
    np.testing.assert_allclose(got["slot"].numpy(), pcma_loss(v, t, 4.0)["slot"].numpy())


def test_zero_presence_gives_zero_inter_and_no_nan_gradient():
    v, t = tf.Variable(obs(4)), tf.Variable(obs(5))
    with tf.GradientTape() as tape:
        inter = pcma_loss(v, t, 4.0, presence=np.zeros((3, 2), "float32"))["inter"]
    assert float(inter) == 0.0
    grads = tape.gradient(inter, [v, t])
    assert all(g is None or np.all(np.isfinite(g.numpy())) for g in grads)


def test_text_presence_from_attention():
    attn = np.zeros((1, 3, 4), "float32")
    attn[0, 0] = 0.25  # spread over the report: absent -> 0
    attn[0, 1, 2] = 1.0  # one token: present -> 1
    attn[0, 2, :2] = 0.5  # two of four tokens -> 1 - log 2 / log 4 = 0.5
    got = text_presence(attn).numpy()
    np.testing.assert_allclose(got, [[0.0, 1.0, 0.5]], atol=1e-6)
    # Padding does not count: two real tokens, uniform over them -> absent.
    mask = np.array([[True, True, False, False]])
    np.testing.assert_allclose(text_presence(attn, mask).numpy()[0, 2], 0.0, atol=1e-6)
