"""Every loss against a hand-written NumPy (float64) reference on tiny tensors, plus the
special cases, gradients, bfloat16 inputs, XLA compilation and the Keras wrappers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from place_tf.losses import (
    CCELoss,
    ITALoss,
    PCMALoss,
    cce_loss,
    cpa_loss,
    cross_attend,
    cta_loss,
    gather_with_grad,
    ita_loss,
    pcma_loss,
    per_example_to_replica,
    replica_info,
    scale_grad_for_replicas,
    sinkhorn,
)

TOL = 1e-5


# ----------------------------------------------------------------------------- references
def np_log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_softmax(z, axis):
    return np.exp(np_log_softmax(z, axis))


def np_normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_ce(logits, target):
    """Mean CE of integer targets, loop-by-loop on purpose (independent of the TF code)."""
    out = []
    for row, t in zip(logits, target, strict=True):
        m = row.max()
        out.append(-(row[t] - m - np.log(np.sum(np.exp(row - m)))))
    return float(np.mean(out))


def np_ita(img, txt, scale):
    logits = scale * img @ txt.T
    labels = np.arange(len(img))
    return 0.5 * (np_ce(logits, labels) + np_ce(logits.T, labels))


def np_pcma(v, t, scale):
    b, k, _ = v.shape
    inter = np.mean([np_ita(v[:, j], t[:, j], scale) for j in range(k)])
    slot = np.mean([np_ita(v[i], t[i], scale) for i in range(b)])
    return 0.5 * (inter + slot), inter, slot


def np_cce(target, pred, tt, ts, exclude_diagonal=False, center=False):
    if center:
        target = target - target.mean(axis=1, keepdims=True)
        pred = pred - pred.mean(axis=1, keepdims=True)
    losses = []
    for tb, pb in zip(np_normalize(target), np_normalize(pred), strict=True):
        n = len(tb)
        zt, zs = tb @ tb.T / tt, pb @ pb.T / ts
        total = 0.0
        for i in range(n):
            keep = [j for j in range(n) if not (exclude_diagonal and j == i)]
            p = np_softmax(zt[i, keep], 0)
            logq = np_log_softmax(zs[i, keep], 0)
            total += -np.sum(p * logq)
        losses.append(total / n)
    return float(np.mean(losses))


def np_token_term(sim, mask, weights):
    valid = np.flatnonzero(mask)
    w = weights[valid] / weights[valid].sum()
    sub = sim[np.ix_(valid, valid)]
    labels = np.arange(len(valid))
    ce1 = [-(np_log_softmax(sub[i], 0)[i]) for i in labels]
    ce2 = [-(np_log_softmax(sub[:, j], 0)[j]) for j in labels]
    return 0.5 * (np.sum(w * ce1) + np.sum(w * ce2))


def np_cta(img, txt, mask, a_img4txt, a_txt4img, temp, word_w=None, patch_w=None):
    out = []
    for b in range(len(img)):
        w, a = np_normalize(txt[b]), np_normalize(a_img4txt[b])
        p, q = np_normalize(img[b]), np_normalize(a_txt4img[b])
        ww = np.ones(len(w)) if word_w is None else word_w[b]
        pw = np.ones(len(p)) if patch_w is None else patch_w[b]
        word = np_token_term(w @ a.T / temp, mask[b], ww)
        patch = np_token_term(p @ q.T / temp, np.ones(len(p), bool), pw)
        out.append(word + patch)
    return float(np.mean(out))


def np_sinkhorn(scores, eps, iters):
    """MGCA's multiplicative algorithm, verbatim in structure."""
    q = np.exp(scores / eps).T
    q /= q.sum()
    k, b = q.shape
    r, c = np.ones(k) / k, np.ones(b) / b
    for _ in range(iters):
        q *= (r / q.sum(axis=1))[:, None]
        q *= (c / q.sum(axis=0))[None, :]
    return (q / q.sum(axis=0, keepdims=True)).T


def np_cpa(img, txt, protos, eps, iters, temp):
    si, st = img @ protos.T, txt @ protos.T
    ci, ct = np_sinkhorn(si, eps, iters), np_sinkhorn(st, eps, iters)
    li, lt = np_log_softmax(si / temp, 1), np_log_softmax(st / temp, 1)
    return 0.5 * (-np.mean(np.sum(ci * lt, 1)) - np.mean(np.sum(ct * li, 1)))


# ----------------------------------------------------------------------------- fixtures
def rnd(*shape, seed=0, normalize=True):
    x = np.random.default_rng(seed).normal(size=shape)
    return np_normalize(x) if normalize else x


@pytest.fixture
def ita_inputs():
    return rnd(4, 4, seed=1), rnd(4, 4, seed=2), 2.5


@pytest.fixture
def pcma_inputs():
    return rnd(3, 3, 4, seed=3), rnd(3, 3, 4, seed=4), 3.0


@pytest.fixture
def cta_inputs():
    b, n, seq, d = 3, 4, 5, 4
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    return (
        rnd(b, n, d, seed=5, normalize=False),
        rnd(b, seq, d, seed=6, normalize=False),
        mask,
        rnd(b, seq, d, seed=7, normalize=False),
        rnd(b, n, d, seed=8, normalize=False),
    )


def f32(x):
    return tf.constant(x, tf.float32)


# ----------------------------------------------------------------------------- ITA
def test_ita_matches_numpy(ita_inputs):
    img, txt, scale = ita_inputs
    got = ita_loss(f32(img), f32(txt), scale)
    assert got.dtype == tf.float32 and got.shape == ()
    np.testing.assert_allclose(got.numpy(), np_ita(img, txt, scale), atol=TOL)


def test_ita_aligned_orthogonal_pairs_large_scale_is_zero():
    eye = np.eye(4)
    assert ita_loss(f32(eye), f32(eye), 100.0).numpy() == pytest.approx(0.0, abs=1e-6)


def test_ita_identical_rows_is_log_b():
    same = np.tile(rnd(1, 4, seed=9), (4, 1))
    np.testing.assert_allclose(ita_loss(f32(same), f32(same), 10.0).numpy(), np.log(4), atol=TOL)


def test_ita_is_symmetric_and_scale_is_used(ita_inputs):
    img, txt, scale = ita_inputs
    a = ita_loss(f32(img), f32(txt), scale).numpy()
    np.testing.assert_allclose(ita_loss(f32(txt), f32(img), scale).numpy(), a, atol=TOL)
    assert abs(ita_loss(f32(img), f32(txt), 2 * scale).numpy() - a) > 1e-3


def test_ita_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="ita_loss: image_emb and text_emb"):
        ita_loss(f32(rnd(4, 4)), f32(rnd(3, 4)), 1.0)
    with pytest.raises(ValueError, match="ita_loss: image_emb must have rank 2"):
        ita_loss(f32(rnd(4, 2, 4)), f32(rnd(4, 4)), 1.0)


# ----------------------------------------------------------------------------- PCMA
def test_pcma_matches_numpy_and_decomposes(pcma_inputs):
    v, t, scale = pcma_inputs
    got = pcma_loss(f32(v), f32(t), scale)
    total, inter, slot = np_pcma(v, t, scale)
    np.testing.assert_allclose(got["total"].numpy(), total, atol=TOL)
    np.testing.assert_allclose(got["inter"].numpy(), inter, atol=TOL)
    np.testing.assert_allclose(got["slot"].numpy(), slot, atol=TOL)
    # inter = mean over slots of batch ITA; slot = mean over pairs of slot-ITA.
    by_slot = [ita_loss(f32(v[:, k]), f32(t[:, k]), scale).numpy() for k in range(3)]
    by_pair = [ita_loss(f32(v[i]), f32(t[i]), scale).numpy() for i in range(3)]
    np.testing.assert_allclose(got["inter"].numpy(), np.mean(by_slot), atol=TOL)
    np.testing.assert_allclose(got["slot"].numpy(), np.mean(by_pair), atol=TOL)
    np.testing.assert_allclose(
        got["total"].numpy(), 0.5 * (got["inter"] + got["slot"]).numpy(), atol=1e-7
    )


def test_pcma_slot_term_penalises_collapsed_slots():
    """All slots identical: the slot term is log(K) however well pairs align."""
    base = rnd(3, 1, 4, seed=10)
    collapsed = np.repeat(base, 3, axis=1)
    got = pcma_loss(f32(collapsed), f32(collapsed), 50.0)
    np.testing.assert_allclose(got["slot"].numpy(), np.log(3), atol=TOL)


def test_pcma_rejects_bad_rank():
    with pytest.raises(ValueError, match="pcma_loss: v_obs must have rank 3"):
        pcma_loss(f32(rnd(3, 4)), f32(rnd(3, 4)), 1.0)


# ----------------------------------------------------------------------------- CCE
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("exclude_diagonal", [False, True])
def test_cce_matches_numpy(exclude_diagonal, center):
    target, pred = rnd(3, 4, 5, seed=11, normalize=False), rnd(3, 4, 5, seed=12, normalize=False)
    got = cce_loss(
        f32(target), f32(pred), 0.05, 0.1, exclude_diagonal=exclude_diagonal, center=center
    )
    want = np_cce(target, pred, 0.05, 0.1, exclude_diagonal, center)
    np.testing.assert_allclose(got.numpy(), want, atol=TOL, rtol=1e-6)


def test_cce_target_equals_student_is_entropy_logsumexp_identity():
    """Same tokens and temperature: CE(p, p) = H(p) = logsumexp(z) - sum(p * z) per row."""
    x = rnd(2, 4, 3, seed=13, normalize=False)
    got = cce_loss(f32(x), f32(x), 0.3, 0.3).numpy()
    xn = np_normalize(x)
    z = np.einsum("bnc,bmc->bnm", xn, xn) / 0.3
    lse = np.log(np.exp(z).sum(-1))
    entropy = lse - np.sum(np_softmax(z, -1) * z, -1)
    np.testing.assert_allclose(got, entropy.mean(), atol=TOL)


def test_cce_target_is_stop_gradient():
    t, p = tf.Variable(rnd(2, 4, 3, seed=14)), tf.Variable(rnd(2, 4, 3, seed=15))
    with tf.GradientTape(persistent=True) as tape:
        loss = cce_loss(t, p)
    assert tape.gradient(loss, t) is None
    assert np.abs(tape.gradient(loss, p).numpy()).sum() > 0


def test_cce_rejects_mismatched_patches():
    with pytest.raises(ValueError, match="cce_loss: target_patches and predicted_patches"):
        cce_loss(f32(rnd(2, 4, 3)), f32(rnd(2, 5, 3)))


# ----------------------------------------------------------------------------- CTA
def test_cta_matches_numpy_with_padding(cta_inputs):
    got = cta_loss(*[f32(x) if x.dtype != bool else tf.constant(x) for x in cta_inputs], 0.1)
    np.testing.assert_allclose(got.numpy(), np_cta(*cta_inputs, 0.1), atol=TOL, rtol=1e-6)


def test_cta_matches_numpy_with_token_weights(cta_inputs):
    img, txt, mask, a1, a2 = cta_inputs
    ww = np.random.default_rng(16).uniform(0.1, 1.0, size=mask.shape)
    pw = np.random.default_rng(17).uniform(0.1, 1.0, size=img.shape[:2])
    got = cta_loss(
        f32(img), f32(txt), mask, f32(a1), f32(a2), 0.2, word_weights=f32(ww), patch_weights=pw
    )
    want = np_cta(img, txt, mask, a1, a2, 0.2, word_w=ww, patch_w=pw)
    np.testing.assert_allclose(got.numpy(), want, atol=TOL, rtol=1e-6)


def test_cta_ignores_padding_values(cta_inputs):
    img, txt, mask, a1, a2 = cta_inputs
    base = cta_loss(f32(img), f32(txt), mask, f32(a1), f32(a2)).numpy()
    txt2, a12 = txt.copy(), a1.copy()
    txt2[~mask] = 123.0
    a12[~mask] = -7.0
    np.testing.assert_allclose(
        cta_loss(f32(img), f32(txt2), mask, f32(a12), f32(a2)).numpy(), base, atol=TOL
    )


def test_cta_perfect_alignment_large_margin_is_zero():
    eye = np.tile(np.eye(4)[None], (2, 1, 1))
    mask = np.ones((2, 4), bool)
    got = cta_loss(f32(eye), f32(eye), mask, f32(eye), f32(eye), temperature=0.01)
    assert got.numpy() == pytest.approx(0.0, abs=1e-6)


def test_cross_attend_matches_numpy_and_masks_keys():
    q, k = rnd(2, 3, 4, seed=18), rnd(2, 5, 4, seed=19)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    got = cross_attend(f32(q), f32(k), mask, 0.1).numpy()
    for b in range(2):
        s = q[b] @ k[b].T / 0.1
        s[:, ~mask[b]] = -np.inf
        np.testing.assert_allclose(got[b], np_softmax(s, -1) @ k[b], atol=TOL)


def test_cta_rejects_bad_mask():
    x = f32(rnd(2, 3, 4))
    with pytest.raises(ValueError, match="cta_loss: txt_mask must be"):
        cta_loss(x, x, np.ones((2, 4), bool), x, x)


# ----------------------------------------------------------------------------- Sinkhorn / CPA
def test_sinkhorn_matches_mgca_multiplicative_algorithm():
    scores = rnd(4, 3, seed=20) @ rnd(3, 3, seed=21).T  # [B=4, P=3] cosine-like
    for iters in (0, 1, 3):
        got = sinkhorn(f32(scores), 0.05, iters).numpy()
        np.testing.assert_allclose(got, np_sinkhorn(scores, 0.05, iters), atol=TOL)


def test_sinkhorn_marginals():
    scores = rnd(6, 4, seed=22) @ rnd(3, 4, seed=23).T  # B=6, P=3
    codes = sinkhorn(f32(scores), 0.5, 3).numpy()
    np.testing.assert_allclose(codes.sum(axis=1), np.ones(6), atol=1e-6)  # each sample: 1
    assert (codes >= 0).all()
    converged = sinkhorn(f32(scores), 0.5, 200).numpy()
    np.testing.assert_allclose(converged.sum(axis=1), np.ones(6), atol=1e-6)
    np.testing.assert_allclose(converged.sum(axis=0), np.full(3, 6 / 3), atol=1e-4)  # B/P


def test_sinkhorn_is_stable_for_large_scores():
    scores = 50.0 * rnd(4, 3, seed=24, normalize=False)  # exp(scores/0.05) overflows float64
    codes = sinkhorn(f32(scores), 0.05, 3).numpy()
    assert np.isfinite(codes).all()
    np.testing.assert_allclose(codes.sum(axis=1), np.ones(4), atol=1e-6)


def test_cpa_matches_numpy():
    img, txt, protos = rnd(4, 4, seed=25), rnd(4, 4, seed=26), rnd(3, 4, seed=27)
    got = cpa_loss(f32(img), f32(txt), f32(protos), 0.05, 3, 0.1)
    np.testing.assert_allclose(got.numpy(), np_cpa(img, txt, protos, 0.05, 3, 0.1), atol=TOL)
    got2 = cpa_loss(f32(img), f32(txt), f32(protos), epsilon=0.3, iterations=5, temperature=0.2)
    want2 = np_cpa(img, txt, protos, 0.3, 5, 0.2)
    np.testing.assert_allclose(got2.numpy(), want2, atol=TOL)


def test_cpa_rejects_wrong_prototype_width():
    with pytest.raises(ValueError, match=r"cpa_loss: prototypes must be \[P, 4\]"):
        cpa_loss(f32(rnd(4, 4)), f32(rnd(4, 4)), f32(rnd(3, 5)))


# ----------------------------------------------------------------------------- shared checks
def _all_losses(dtype=tf.float32):
    """name -> (fn(*tensors) -> scalar, list of numpy inputs)."""
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)

    def cta(img, txt, a1, a2):
        return cta_loss(img, txt, mask, a1, a2, 0.1)

    def pcma_total(v, t, s):
        return pcma_loss(v, t, s)["total"]

    return {
        "ita": (ita_loss, [rnd(3, 4, seed=30), rnd(3, 4, seed=31), np.float64(3.0)]),
        "pcma": (pcma_total, [rnd(3, 3, 4, seed=32), rnd(3, 3, 4, seed=33), np.float64(4.0)]),
        "cce": (cce_loss, [rnd(3, 4, 4, seed=34), rnd(3, 4, 4, seed=35)]),
        "cta": (cta, [rnd(3, 4, 4, seed=36 + i, normalize=False) for i in range(4)]),
        "cpa": (cpa_loss, [rnd(3, 4, seed=40), rnd(3, 4, seed=41), rnd(3, 4, seed=42)]),
    }


@pytest.mark.parametrize("name", ["ita", "pcma", "cce", "cta", "cpa"])
def test_gradients_exist_and_are_finite(name):
    fn, inputs = _all_losses()[name]
    variables = [tf.Variable(x, dtype=tf.float32) for x in inputs]
    with tf.GradientTape() as tape:
        loss = fn(*variables)
    grads = tape.gradient(loss, variables)
    # CCE's target is stop-gradient by design; every other input must get a gradient.
    expected_none = (0,) if name == "cce" else ()
    for i, g in enumerate(grads):
        if i in expected_none:
            assert g is None
            continue
        assert g is not None, f"{name}: no gradient for input {i}"
        assert np.isfinite(g.numpy()).all(), f"{name}: non-finite gradient for input {i}"
        assert np.abs(g.numpy()).sum() > 0, f"{name}: zero gradient for input {i}"


@pytest.mark.parametrize("low", [tf.bfloat16, tf.float16])
@pytest.mark.parametrize("name", ["ita", "pcma", "cce", "cta", "cpa"])
def test_low_precision_inputs_give_float32_loss(name, low):
    fn, inputs = _all_losses()[name]
    lowered = [tf.constant(x, low) for x in inputs]
    got = fn(*lowered)
    assert got.dtype == tf.float32
    # Exactly the float32 loss of the rounded inputs: the computation itself is float32.
    same_inputs = fn(*[tf.cast(x, tf.float32) for x in lowered])
    np.testing.assert_allclose(got.numpy(), same_inputs.numpy(), atol=TOL)
    ref = fn(*[tf.constant(x, tf.float32) for x in inputs]).numpy()
    np.testing.assert_allclose(got.numpy(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name", ["ita", "pcma", "cce", "cta", "cpa"])
def test_losses_compile_with_xla(name):
    fn, inputs = _all_losses()[name]
    tensors = [tf.constant(x, tf.float32) for x in inputs]

    def loss_and_grad(*args):
        with tf.GradientTape() as tape:
            tape.watch(args[-1])
            loss = fn(*args)
        return loss, tape.gradient(loss, args[-1])

    loss, grad = tf.function(loss_and_grad, jit_compile=True)(*tensors)
    eager_loss, eager_grad = loss_and_grad(*tensors)
    np.testing.assert_allclose(loss.numpy(), eager_loss.numpy(), atol=TOL)
    np.testing.assert_allclose(grad.numpy(), eager_grad.numpy(), atol=TOL)


# ----------------------------------------------------------------------------- gather helpers
def test_gather_helpers_are_identity_without_strategy():
    x = tf.Variable(rnd(3, 2))
    with tf.GradientTape() as tape:
        y = gather_with_grad(x)
        s = scale_grad_for_replicas(tf.reduce_sum(x))
    assert y.shape == (3, 2)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(tape.gradient(s, x).numpy(), np.ones((3, 2)))
    rid, n = replica_info()
    assert int(rid) == 0 and n == 1


def test_per_example_to_replica_is_sum_over_global_batch():
    np.testing.assert_allclose(per_example_to_replica(f32([1.0, 2.0, 6.0])).numpy(), 3.0)
    np.testing.assert_allclose(per_example_to_replica(f32([1.0, 2.0, 6.0]), 6).numpy(), 1.5)
    assert per_example_to_replica(tf.zeros([0])).numpy() == 0.0
    with pytest.raises(ValueError, match=r"per_example_loss of shape \[B\]"):
        per_example_to_replica(tf.zeros([2, 2]))


# ----------------------------------------------------------------------------- Keras wrappers
def test_keras_wrappers_match_functions_and_round_trip(ita_inputs, pcma_inputs):
    img, txt, _ = ita_inputs
    v, t, _ = pcma_inputs
    patches_t, patches_p = rnd(2, 4, 3, seed=43), rnd(2, 4, 3, seed=44)
    cases = [
        (ITALoss(logit_scale=5.0), (txt, img), np_ita(img, txt, 5.0)),
        (PCMALoss(logit_scale=4.0, component="inter"), (t, v), np_pcma(v, t, 4.0)[1]),
        (
            CCELoss(0.1, 0.2, exclude_diagonal=True),
            (patches_t, patches_p),
            np_cce(patches_t, patches_p, 0.1, 0.2, True),
        ),
    ]
    for loss, (y_true, y_pred), want in cases:
        np.testing.assert_allclose(loss(y_true, y_pred).numpy(), want, atol=TOL)
        clone = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(clone) is type(loss) and clone.get_config() == loss.get_config()
        np.testing.assert_allclose(clone(y_true, y_pred).numpy(), want, atol=TOL)
    with pytest.raises(ValueError, match="component must be total"):
        PCMALoss(component="nope")
