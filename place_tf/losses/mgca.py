"""MGCA baseline losses: token-wise cross-attention alignment (CTA) and cross-modal
prototype alignment (CPA), following MGCA (Wang et al., NeurIPS 2022) and its code.

CTA (per example, local): for each word token w_i, the text-attended image feature a_i
(cross-attention of w_i over the patches) must be closer to w_i than to the other words'
attended features of the same report, and vice versa (InfoNCE over the tokens of the
example, both directions); the same for patches against their report-attended features.
CTA_i = word term + patch term, as MGCA's `loss_patch + loss_word`. Departures from the
reference code: padding words are masked out of the softmax (MGCA only zero-weights them),
and token weights are uniform over real tokens unless given (MGCA derives them from the
last-layer [CLS] attention, clipped to the 10-90 % quantiles).

`cta_parameter_free_per_example` is MGCA's code path as it runs by default
(`use_local_atten=False`, ViT image encoder; HKU-MedAI/MGCA mgca/models/mgca/
mgca_module.py, MGCA.forward): each word attends to the patches with the parameter-free
softmax(w p^T / 0.1) p (no mask: patches have no padding), the result L2-normalised; each
patch attends to the words with padding words masked (-inf); for a ViT the patch's attended
word feature is NOT re-normalised (only the CNN branch normalises it). The word InfoNCE
softmaxes run over all word positions, padding included (MGCA pads its word-aggregated
features with zeros and only zero-weights them), with word weights normalised over the
real words. Word and patch weights: MGCA's are the last-layer [CLS] attention clipped to
the 10-90 % quantiles (`quantile_clipped_weights`); they are uniform unless given
(PLACEModel gives word weights with cta_word_weights="cls_attention").

CPA: prototype scores of the global batch -> Sinkhorn-Knopp codes (no gradient); each
modality's codes are predicted from the other modality's prototype softmax (swapped
prediction), averaged over both directions. Contrastive/global: computed in full on every
replica from gathered embeddings.
"""

from __future__ import annotations

import tensorflow as tf

from place_tf.losses.gather import (
    check_rank,
    check_same_shape,
    diagonal,
    gather_with_grad,
    per_example_to_replica,
    scale_grad_for_replicas,
    to_float32,
)

_NEG = -1e9  # finite "minus infinity": keeps log-softmax and its gradient NaN-free


def cross_attend(query_tokens, key_tokens, key_mask=None, temperature: float = 0.1):
    """MGCA's parameter-free token attention: softmax(q k^T / T) k, float32 [B, Lq, D].

    `key_mask` [B, Lk] (True = real token) hides padding keys. Inputs are used as given
    (MGCA passes L2-normalised local embeddings)."""
    q = to_float32(query_tokens)
    k = to_float32(key_tokens)
    check_rank(q, 3, "query_tokens", "cross_attend")
    check_rank(k, 3, "key_tokens", "cross_attend")
    scores = tf.matmul(q, k, transpose_b=True) / temperature  # [B, Lq, Lk]
    if key_mask is not None:
        mask = tf.cast(key_mask, tf.bool)[:, None, :]
        scores = tf.where(mask, scores, tf.cast(_NEG, scores.dtype))
    return tf.matmul(tf.nn.softmax(scores, axis=-1), k)


def _token_mask(mask, tokens: tf.Tensor, name: str, temperature: float, fn: str) -> tf.Tensor:
    """`mask` as bool [B, L] matching tokens [B, L, D]; also checks the temperature."""
    mask = tf.cast(mask, tf.bool)
    check_rank(mask, 2, name, fn)
    if not mask.shape.is_compatible_with(tokens.shape[:2]):
        raise ValueError(f"{fn}: {name} must be [B, L] = {tokens.shape[:2]}, got {mask.shape}")
    if temperature <= 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")
    return mask


def _token_infonce(sim: tf.Tensor, mask: tf.Tensor, weights, mask_softmax=True) -> tf.Tensor:
    """Per-example bidirectional token InfoNCE of sim [B, M, M] (positives on the diagonal),
    padding (mask [B, M] False) removed from both softmaxes (unless `mask_softmax` is
    False: then padding only gets weight 0), rows weighted by `weights` normalised over
    real tokens -> [B]."""
    if mask_softmax:
        neg = tf.cast(_NEG, sim.dtype)
        to_other = tf.nn.log_softmax(tf.where(mask[:, None, :], sim, neg), axis=-1)
        from_other = tf.nn.log_softmax(tf.where(mask[:, :, None], sim, neg), axis=-2)
    else:
        to_other = tf.nn.log_softmax(sim, axis=-1)
        from_other = tf.nn.log_softmax(sim, axis=-2)
    ce_1 = -diagonal(to_other)  # token i vs attended features j
    ce_2 = -diagonal(from_other)  # attended feature j vs tokens i
    ce_1 = tf.where(mask, ce_1, tf.zeros_like(ce_1))
    ce_2 = tf.where(mask, ce_2, tf.zeros_like(ce_2))
    w = tf.cast(mask, sim.dtype)
    if weights is not None:
        w = w * to_float32(weights)
    w = tf.math.divide_no_nan(w, tf.reduce_sum(w, axis=-1, keepdims=True))
    return 0.5 * (tf.reduce_sum(w * ce_1, axis=-1) + tf.reduce_sum(w * ce_2, axis=-1))


def cta_per_example(
    img_tokens,
    txt_tokens,
    txt_mask,
    attn_img_for_txt,
    attn_txt_for_img,
    temperature: float = 0.1,
    *,
    word_weights=None,
    patch_weights=None,
) -> tf.Tensor:
    """float32 [B]: word term + patch term of MGCA's token-wise alignment per example."""
    fn = "cta_loss"
    img = tf.math.l2_normalize(to_float32(img_tokens), axis=-1)
    txt = tf.math.l2_normalize(to_float32(txt_tokens), axis=-1)
    img_for_txt = tf.math.l2_normalize(to_float32(attn_img_for_txt), axis=-1)
    txt_for_img = tf.math.l2_normalize(to_float32(attn_txt_for_img), axis=-1)
    check_rank(img, 3, "img_tokens", fn)
    check_rank(txt, 3, "txt_tokens", fn)
    check_same_shape(txt, img_for_txt, "txt_tokens and attn_img_for_txt", fn)
    check_same_shape(img, txt_for_img, "img_tokens and attn_txt_for_img", fn)
    mask = _token_mask(txt_mask, txt, "txt_mask", temperature, fn)

    word_sim = tf.matmul(txt, img_for_txt, transpose_b=True) / temperature  # [B, L, L]
    word = _token_infonce(word_sim, mask, word_weights)
    patch_sim = tf.matmul(img, txt_for_img, transpose_b=True) / temperature  # [B, N, N]
    patch_mask = tf.ones(tf.shape(patch_sim)[:2], tf.bool)
    patch = _token_infonce(patch_sim, patch_mask, patch_weights)
    return word + patch


def cta_loss(
    img_tokens,
    txt_tokens,
    txt_mask,
    attn_img_for_txt,
    attn_txt_for_img,
    temperature: float = 0.1,
    *,
    word_weights=None,
    patch_weights=None,
    global_batch_size=None,
) -> tf.Tensor:
    """float32 scalar MGCA CTA loss; img_tokens [B, N, D], txt_tokens [B, L, D], txt_mask
    [B, L] (True = real token), attn_img_for_txt [B, L, D] (image features attended by each
    word), attn_txt_for_img [B, N, D]. Cosine similarities (all four are L2-normalised
    here). Optional word_weights [B, L] / patch_weights [B, N] replace uniform token
    weights. Per-example: local_sum / global_batch_size (default: summed local sizes)."""
    per_example = cta_per_example(
        img_tokens,
        txt_tokens,
        txt_mask,
        attn_img_for_txt,
        attn_txt_for_img,
        temperature,
        word_weights=word_weights,
        patch_weights=patch_weights,
    )
    return per_example_to_replica(per_example, global_batch_size)


def cta_parameter_free_per_example(
    patch_emb,
    word_emb,
    word_mask,
    temperature: float = 0.1,
    *,
    word_weights=None,
    patch_weights=None,
    normalize_patch_attended: bool = False,
) -> tf.Tensor:
    """float32 [B]: MGCA's token-wise alignment as its code computes it (module docstring):
    loss_word + loss_patch of one example, each the mean of its two directions.

    patch_emb [B, N, D] and word_emb [B, L, D]: the local embeddings, L2-normalised by the
    caller (MGCA normalises them right after the local heads); word_emb excludes [CLS].
    word_mask [B, L] (True = real word). `normalize_patch_attended`: re-normalise the
    patch->word attended features (MGCA does for a CNN encoder, not for a ViT)."""
    fn = "cta_parameter_free"
    patches = to_float32(patch_emb)
    words = to_float32(word_emb)
    check_rank(patches, 3, "patch_emb", fn)
    check_rank(words, 3, "word_emb", fn)
    mask = _token_mask(word_mask, words, "word_mask", temperature, fn)
    word_attended = tf.math.l2_normalize(cross_attend(words, patches, None, temperature), -1)
    word_sim = tf.matmul(words, word_attended, transpose_b=True) / temperature  # [B, L, L]
    word = _token_infonce(word_sim, mask, word_weights, mask_softmax=False)
    patch_attended = cross_attend(patches, words, mask, temperature)
    if normalize_patch_attended:
        patch_attended = tf.math.l2_normalize(patch_attended, -1)
    patch_sim = tf.matmul(patches, patch_attended, transpose_b=True) / temperature  # [B, N, N]
    all_patches = tf.ones(tf.shape(patch_sim)[:2], tf.bool)
    patch = _token_infonce(patch_sim, all_patches, patch_weights, mask_softmax=False)
    return word + patch


def quantile_clipped_weights(weights, mask=None, low: float = 0.1, high: float = 0.9):
    """float32 [B, L]: MGCA's token weights — each example's attention weights [B, L]
    clipped to its own `low`..`high` quantiles over the real tokens (mask [B, L], True =
    real; None = all), 0 at the others. Quantiles interpolate linearly as torch.quantile
    does (MGCA.forward clips the last-layer [CLS] attention of words and patches so; the
    CTA losses normalise the weights over the real tokens)."""
    w = to_float32(weights)
    check_rank(w, 2, "weights", "quantile_clipped_weights")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"quantile_clipped_weights: need 0 <= low <= high <= 1, got {low}, {high}")
    real = tf.ones_like(w, tf.bool) if mask is None else tf.cast(mask, tf.bool)
    n = tf.reduce_sum(tf.cast(real, tf.int32), axis=-1, keepdims=True)  # [B, 1]
    ordered = tf.sort(tf.where(real, w, tf.float32.max), axis=-1)  # real values first

    def quantile(q):
        pos = q * tf.cast(tf.maximum(n - 1, 0), tf.float32)
        below = tf.floor(pos)
        lo = tf.gather(ordered, tf.cast(below, tf.int32), batch_dims=1)
        hi = tf.gather(ordered, tf.cast(tf.math.ceil(pos), tf.int32), batch_dims=1)
        return lo + (pos - below) * (hi - lo)

    clipped = tf.clip_by_value(w, quantile(low), quantile(high))
    return tf.where(real, clipped, tf.zeros_like(clipped))


def sinkhorn(scores, epsilon: float = 0.05, iterations: int = 3) -> tf.Tensor:
    """Sinkhorn-Knopp codes [B, P] (rows sum to 1, no gradient) from scores [B, P].

    MGCA/SwAV's algorithm (Q = exp(scores/eps)^T, alternate prototype-marginal 1/P and
    sample-marginal 1/B normalisations, then columns to 1), done in the log domain so that
    large scores / small epsilon cannot overflow. Use it on the global batch."""
    s = tf.stop_gradient(to_float32(scores))
    check_rank(s, 2, "scores", "sinkhorn")
    if epsilon <= 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    log_q = tf.transpose(s) / epsilon  # [P, B]
    log_q -= tf.reduce_logsumexp(log_q)
    shape = tf.cast(tf.shape(log_q), tf.float32)
    log_r = -tf.math.log(shape[0])  # prototypes get equal mass
    log_c = -tf.math.log(shape[1])  # samples get equal mass
    for _ in range(int(iterations)):
        log_q += log_r - tf.reduce_logsumexp(log_q, axis=1, keepdims=True)
        log_q += log_c - tf.reduce_logsumexp(log_q, axis=0, keepdims=True)
    log_q -= tf.reduce_logsumexp(log_q, axis=0, keepdims=True)
    return tf.stop_gradient(tf.transpose(tf.exp(log_q)))


def cpa_loss(
    img_emb,
    txt_emb,
    prototypes,
    epsilon: float = 0.05,
    iterations: int = 3,
    temperature: float = 0.1,
) -> tf.Tensor:
    """float32 scalar MGCA prototype alignment. img_emb, txt_emb [B, D] and prototypes
    [P, D] are L2-normalised by the caller (MGCA re-normalises the prototype weights each
    step). Sinkhorn codes come from the gathered global batch; every replica returns the
    full global value (1/R of the prototype gradient per replica)."""
    fn = "cpa_loss"
    img = to_float32(img_emb)
    txt = to_float32(txt_emb)
    protos = to_float32(prototypes)
    check_rank(img, 2, "img_emb", fn)
    check_rank(txt, 2, "txt_emb", fn)
    check_rank(protos, 2, "prototypes", fn)
    check_same_shape(img, txt, "img_emb and txt_emb", fn)
    if not img.shape[-1:].is_compatible_with(protos.shape[-1:]):
        raise ValueError(f"{fn}: prototypes must be [P, {img.shape[-1]}], got {protos.shape}")
    if temperature <= 0:
        raise ValueError(f"{fn}: temperature must be > 0, got {temperature}")

    protos = scale_grad_for_replicas(protos)
    img_scores = tf.matmul(gather_with_grad(img), protos, transpose_b=True)  # [G, P]
    txt_scores = tf.matmul(gather_with_grad(txt), protos, transpose_b=True)
    img_code = sinkhorn(img_scores, epsilon, iterations)
    txt_code = sinkhorn(txt_scores, epsilon, iterations)
    img_logp = tf.nn.log_softmax(img_scores / temperature, axis=-1)
    txt_logp = tf.nn.log_softmax(txt_scores / temperature, axis=-1)
    i2t = -tf.reduce_mean(tf.reduce_sum(img_code * txt_logp, axis=-1))
    t2i = -tf.reduce_mean(tf.reduce_sum(txt_code * img_logp, axis=-1))
    return 0.5 * (i2t + t2i)
