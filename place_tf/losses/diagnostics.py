"""Method diagnostics: numbers that say whether PCMA's slots and CCE's targets mean anything.

Pure functions on tensors, float32, no gradient (every input is stop-gradient'ed). They
answer the suspected weaknesses of issue #21:
- `cross_sample_cosine`: per slot, the mean cosine between the observations of DIFFERENT
  examples. Near 1: the slot is a constant (collapsed); near the instance-level value
  (the same number for the global embeddings): the slot is a copy of ITA.
- `within_sample_slot_cosine`: the mean cosine between different slots of the SAME
  example. Near 1: all slots say the same thing (no pathology-specific slots).
- `attention_entropy`: per query, the entropy of its attention over the (unmasked)
  tokens, divided by log(number of tokens): 1 = uniform (looks at nothing in
  particular), 0 = one token.
- `diagonal_mass`: the mean probability a target row puts on its own entry (CCE: each
  patch's self-similarity); 1 = identity targets, 1/N = uniform.
"""

from __future__ import annotations

import tensorflow as tf

from place_tf.losses.gather import check_rank, diagonal, to_float32


def _unit(x, name: str, fn: str, rank: int) -> tf.Tensor:
    x = tf.stop_gradient(to_float32(x))
    check_rank(x, rank, name, fn)
    return tf.math.l2_normalize(x, axis=-1)


def _mean_off_diagonal(gram: tf.Tensor) -> tf.Tensor:
    """Mean of the off-diagonal entries of square matrices [..., M, M] -> [...] (0 if M=1)."""
    m = tf.cast(tf.shape(gram)[-1], tf.float32)
    off = tf.reduce_sum(gram, axis=[-2, -1]) - tf.reduce_sum(diagonal(gram), axis=-1)
    return tf.math.divide_no_nan(off, m * (m - 1.0))


def cross_sample_cosine(observations) -> tf.Tensor:
    """float32 [K]: for each slot k, the mean cosine between observations[i, k] and
    observations[j, k] over example pairs i != j of observations [B, K, D]."""
    x = _unit(observations, "observations", "cross_sample_cosine", 3)
    gram = tf.einsum("ikd,jkd->kij", x, x)  # [K, B, B]
    return _mean_off_diagonal(gram)


def within_sample_slot_cosine(observations) -> tf.Tensor:
    """float32 scalar: the mean cosine between different slots k != l of the same example,
    averaged over the examples of observations [B, K, D]."""
    x = _unit(observations, "observations", "within_sample_slot_cosine", 3)
    gram = tf.einsum("ikd,ild->ikl", x, x)  # [B, K, K]
    return tf.reduce_mean(_mean_off_diagonal(gram))


def attention_entropy_per_example(attention, token_mask=None) -> tf.Tensor:
    """float32 [B, K]: each query's attention entropy over the tokens of its example,
    normalised by log(n), n = the example's number of unmasked tokens (n = 1 gives 0).

    attention [B, K, N] (rows sum to 1 over the unmasked tokens); token_mask [B, N] bool
    (True = real token) or None (all real).
    """
    p = tf.stop_gradient(to_float32(attention))
    check_rank(p, 3, "attention", "attention_entropy")
    if token_mask is None:
        n = tf.cast(tf.fill(tf.shape(p)[:1], tf.shape(p)[-1]), tf.float32)  # [B]
    else:
        mask = tf.cast(token_mask, tf.float32)
        check_rank(mask, 2, "token_mask", "attention_entropy")
        p = p * mask[:, None, :]
        n = tf.reduce_sum(mask, axis=-1)
    plogp = tf.where(p > 0, p * tf.math.log(tf.maximum(p, 1e-30)), tf.zeros_like(p))
    entropy = -tf.reduce_sum(plogp, axis=-1)  # [B, K]
    return tf.math.divide_no_nan(entropy, tf.math.log(tf.maximum(n, 1.0))[:, None])


def attention_entropy(attention, token_mask=None) -> tf.Tensor:
    """float32 [K]: `attention_entropy_per_example` averaged over the examples."""
    return tf.reduce_mean(attention_entropy_per_example(attention, token_mask), axis=0)


def diagonal_mass(target) -> tf.Tensor:
    """float32 scalar: the mean of the diagonal of row-stochastic targets [B, N, N]."""
    p = tf.stop_gradient(to_float32(target))
    check_rank(p, 3, "target", "diagonal_mass")
    return tf.reduce_mean(diagonal(p))


def observation_diagnostics(prefix: str, observations, attention, token_mask=None) -> dict:
    """The observation diagnostics of one modality as flat float32 scalars:
    `{prefix}_cross_cos` (mean over slots) and `{prefix}_cross_cos_{k}` per slot,
    `{prefix}_slot_cos`, `{prefix}_attn_entropy` (mean over queries) and
    `{prefix}_attn_entropy_{k}` per query. Slot count must be static."""
    cross = cross_sample_cosine(observations)
    entropy = attention_entropy(attention, token_mask)
    k = observations.shape[1]
    if k is None:
        raise ValueError("observation_diagnostics needs a static number of slots")
    out = {
        f"{prefix}_cross_cos": tf.reduce_mean(cross),
        f"{prefix}_slot_cos": within_sample_slot_cosine(observations),
        f"{prefix}_attn_entropy": tf.reduce_mean(entropy),
    }
    for i in range(k):
        out[f"{prefix}_cross_cos_{i}"] = cross[i]
        out[f"{prefix}_attn_entropy_{i}"] = entropy[i]
    return out
