"""The issue #21 options of PLACEModel: diagnostics keys, PCMA presence, CCE target variants,
and the MGCA preset as MGCA's code runs (summed fixed-temperature ITA, BatchNorm heads,
parameter-free token attention, prototypes frozen in the first epoch)."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_batches import make_batch

from place_tf.config import tiny_model_config
from place_tf.models.place_model import PLACEModel
from place_tf.objectives import objective_config

K = 4  # tiny model's num_queries


@pytest.fixture(scope="module")
def batch():
    return make_batch()


@pytest.fixture(scope="module")
def mgca():
    return PLACEModel(tiny_model_config(), objective_config("mgca"), seed=3)


# ------------------------------------------------------------------ presets


def test_mgca_preset_is_mgca_code_and_overrides_win():
    cfg = objective_config("mgca")
    assert (cfg.lambda_ita, cfg.lambda_cta, cfg.lambda_cpa) == (1.0, 1.0, 1.0)
    assert not cfg.learn_temperature and cfg.temperature_init == 0.07
    assert cfg.ita_sum_directions and cfg.cta_attention == "parameter_free"
    assert cfg.cta_word_weights == "cls_attention"
    assert (cfg.projection_head, cfg.projection_hidden) == ("mgca", 2048)
    assert cfg.freeze_prototypes_epochs == 1
    ours = objective_config("mgca", cta_attention="learned", projection_head="mlp")
    assert (ours.cta_attention, ours.projection_head) == ("learned", "mlp")
    place = objective_config("place")
    assert place.projection_head == "mlp" and not place.ita_sum_directions
    assert place.pcma_presence == "none" and not place.cce_center
    with pytest.raises(ValueError, match="cta_attention must be one of"):
        objective_config("mgca", cta_attention="mha")


# ------------------------------------------------------------------ diagnostics


def test_place_diagnostics_keys_ranges_and_switch(batch):
    model = PLACEModel(tiny_model_config(), objective_config("place"), seed=1)
    diag = model.diagnostics(batch)
    for prefix in ("diag/vpor", "diag/tpor"):
        for k in range(K):
            assert f"{prefix}_cross_cos_{k}" in diag and f"{prefix}_attn_entropy_{k}" in diag
        per_slot = [float(diag[f"{prefix}_cross_cos_{k}"]) for k in range(K)]
        np.testing.assert_allclose(float(diag[f"{prefix}_cross_cos"]), np.mean(per_slot), 1e-5)
        assert -1.0 <= float(diag[f"{prefix}_slot_cos"]) <= 1.0
        assert 0.0 <= float(diag[f"{prefix}_attn_entropy"]) <= 1.0 + 1e-6
    assert {"diag/image_cross_cos", "diag/text_cross_cos", "diag/cce_target_diagonal"} <= set(diag)
    assert all(v.dtype == tf.float32 for v in diag.values())
    off = PLACEModel(
        tiny_model_config(), objective_config("place", diagnostics=False), seed=1
    ).compute_losses(batch)[1]
    assert not [k for k in off if k.startswith("diag/")]


def test_cce_without_diagonal_has_no_diagonal_mass(batch):
    model = PLACEModel(
        tiny_model_config(),
        objective_config("place_no_pcma", cce_exclude_diagonal=True, cce_center=True),
        seed=2,
    )
    _, losses = model.compute_losses(batch)
    assert float(losses["diag/cce_target_diagonal"]) == 0.0
    assert np.isfinite(float(losses["cce"]))


def test_pcma_presence_changes_only_the_inter_term(batch):
    keras.utils.set_random_seed(5)
    plain = PLACEModel(tiny_model_config(), objective_config("place_no_cce"), seed=4)
    weighted = PLACEModel(
        tiny_model_config(),
        objective_config("place_no_cce", pcma_presence="text_attention"),
        seed=4,
    )
    weighted.set_weights(plain.get_weights())
    _, a = plain.compute_losses(batch)
    _, b = weighted.compute_losses(batch)
    np.testing.assert_allclose(float(a["pcma_slot"]), float(b["pcma_slot"]), rtol=1e-6)
    np.testing.assert_allclose(float(a["ita"]), float(b["ita"]), rtol=1e-6)
    assert abs(float(a["pcma_inter"]) - float(b["pcma_inter"])) > 1e-7


# ------------------------------------------------------------------ MGCA


def test_mgca_ita_is_the_summed_cross_entropies_at_0_07(mgca, batch):
    img = mgca.encode_image(batch["image"])["image_embedding"].numpy().astype("float64")
    txt = mgca.encode_text(batch["token_ids"], batch["padding_mask"])["text_embedding"]
    logits = img @ txt.numpy().astype("float64").T / 0.07
    n = len(logits)

    def ce(z):  # mean over rows of -log softmax(z)[i, i]
        z = z - z.max(1, keepdims=True)
        return -np.mean(np.diag(z) - np.log(np.exp(z).sum(1)))

    _, losses = mgca.compute_losses(batch, training=False)
    np.testing.assert_allclose(float(losses["ita"]), ce(logits) + ce(logits.T), rtol=1e-4)
    np.testing.assert_allclose(float(losses["temperature"]), 0.07, rtol=1e-6)
    assert n == 4 and not hasattr(mgca, "token_cross_attention")
    assert mgca.image_projection.hidden_dim == 2048


def test_mgca_heads_use_batch_statistics_in_training(mgca, batch):
    head = mgca.image_local_projection
    assert head.style == "mgca" and head.output_norm.synchronized
    assert not head.output_norm.center and not head.output_norm.scale  # affine=False
    tokens = tf.random.normal((3, 5, mgca.image_encoder.token_dim), seed=1)
    raw = keras.Sequential([head.hidden, head.hidden_norm])  # the head's own layers
    before = head.hidden_norm.moving_mean.numpy().copy()
    hidden = head.hidden(tokens).numpy().reshape(-1, 2048)
    normed = raw(tokens, training=True).numpy().reshape(-1, 2048)
    # Statistics over batch AND tokens (MGCA's Conv1d + BatchNorm1d), PyTorch momentum 0.1.
    np.testing.assert_allclose(normed.mean(0), 0.0, atol=1e-4)
    gamma, beta = head.hidden_norm.gamma.numpy(), head.hidden_norm.beta.numpy()
    np.testing.assert_allclose(normed.std(0), np.abs(gamma), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(beta, 0.0)
    after = head.hidden_norm.moving_mean.numpy()
    np.testing.assert_allclose(after, 0.9 * before + 0.1 * hidden.mean(0), rtol=1e-4, atol=1e-5)


def _prototype_grad(model, batch):
    protos = model.prototype_layer.trainable_variables
    with tf.GradientTape() as tape:
        total, _ = model.compute_losses(batch, training=True)
    return tape.gradient(total, protos)[0]


def test_mgca_prototypes_frozen_during_the_first_epoch(batch):
    model = PLACEModel(tiny_model_config(), objective_config("mgca"), seed=5)
    g = _prototype_grad(model, batch)  # never told the step: trainable (as before)
    assert float(tf.norm(g)) > 0
    model.set_training_step(0, steps_per_epoch=3)
    assert float(tf.norm(_prototype_grad(model, batch))) == 0.0
    model.set_training_step(2, steps_per_epoch=3)
    assert float(tf.norm(_prototype_grad(model, batch))) == 0.0
    model.set_training_step(3, steps_per_epoch=3)
    assert float(tf.norm(_prototype_grad(model, batch))) > 0
    # Without the option there is no gate and the call is a no-op.
    plain = PLACEModel(
        tiny_model_config(), objective_config("mgca", freeze_prototypes_epochs=0), seed=5
    )
    plain.set_training_step(0, steps_per_epoch=3)
    assert not hasattr(plain, "prototype_gradient_gate")


def test_mgca_xla_matches_eager_and_save_load(mgca, batch, tmp_path):
    train_xla = tf.function(lambda b: mgca.compute_losses(b, training=True), jit_compile=True)
    total, _ = train_xla(batch)  # synchronized BatchNorm inside one XLA cluster
    assert math.isfinite(float(total))
    # (training moved the BatchNorm statistics: the references come after it)
    _, eager = mgca.compute_losses(batch, training=False)
    xla = tf.function(lambda b: mgca.compute_losses(b, training=False), jit_compile=True)
    _, compiled = xla(batch)
    for k in ("ita", "cta", "cpa"):
        np.testing.assert_allclose(float(compiled[k]), float(eager[k]), rtol=1e-4)
    path = str(tmp_path / "mgca.keras")
    mgca.save(path)
    loaded = keras.saving.load_model(path)
    _, again = loaded.compute_losses(batch, training=False)
    for k in ("ita", "cta", "cpa"):
        np.testing.assert_allclose(float(again[k]), float(eager[k]), rtol=1e-5)


def test_cls_attention_is_the_last_bert_layer_cls_row(mgca, batch):
    got = mgca.cls_attention(batch["token_ids"], batch["padding_mask"]).numpy()
    mask = batch["padding_mask"]
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)  # a softmax over real tokens
    assert np.all(got[~mask] < 1e-6)
    # The same scores from keras-hub's own graph: the last layer's input, then the layer.
    bb = mgca.text_encoder.backbone
    last = bb.transformer_layers[-1]
    upto_last = keras.Model(bb.input, last.input[0])  # inputs: (x, padding_mask)
    ids = tf.constant(batch["token_ids"])
    pad = tf.cast(mask, "int32")
    x = upto_last({"token_ids": ids, "segment_ids": tf.zeros_like(ids), "padding_mask": pad})
    _, scores = last(x, padding_mask=pad, return_attention_scores=True)
    np.testing.assert_allclose(got, scores.numpy()[:, :, 0, :].mean(1), atol=1e-6)


def test_cls_attention_word_weights_change_only_the_cta(mgca, batch):
    uniform = PLACEModel(
        tiny_model_config(), objective_config("mgca", cta_word_weights="uniform"), seed=3
    )
    uniform.set_weights(mgca.get_weights())
    _, weighted = mgca.compute_losses(batch)
    _, plain = uniform.compute_losses(batch)
    np.testing.assert_allclose(float(weighted["ita"]), float(plain["ita"]), rtol=1e-6)
    assert abs(float(weighted["cta"]) - float(plain["cta"])) > 1e-6
