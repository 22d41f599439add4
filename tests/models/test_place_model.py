"""PLACEModel and objective presets: outputs, losses, gradients, XLA, save/load, fit."""

import dataclasses
import math

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from tiny_batches import make_batch

from place_tf.config import ObjectiveConfig, tiny_model_config
from place_tf.models.place_model import PLACEModel, num_visible_patches
from place_tf.objectives import (
    OBJECTIVE_TERMS,
    OBJECTIVES,
    active_terms,
    loss_keys,
    objective_config,
)


def tiny(**overrides):
    return tiny_model_config(**overrides)


@pytest.fixture(scope="module")
def place():
    return PLACEModel(tiny(), objective_config("place"), seed=7)


@pytest.fixture(scope="module")
def batch():
    return make_batch()


# ------------------------------------------------------------------ objectives


def test_objective_presets_set_lambdas():
    assert OBJECTIVES == {"convirt", "mgca", "place", "place_no_pcma", "place_no_cce"}
    expected = {
        "convirt": {"ita"},
        "mgca": {"ita", "cta", "cpa"},
        "place": {"ita", "pcma", "cce"},
        "place_no_pcma": {"ita", "cce"},
        "place_no_cce": {"ita", "pcma"},
    }
    for name, terms in expected.items():
        cfg = objective_config(name)
        assert cfg.name == name and set(active_terms(cfg)) == terms
        for t in ("ita", "pcma", "cce", "cta", "cpa"):
            assert getattr(cfg, f"lambda_{t}") == (1.0 if t in terms else 0.0)
    cfg = objective_config("place", lambda_cce=0.5, cce_teacher="ema")
    assert cfg.lambda_cce == 0.5 and cfg.cce_teacher == "ema"
    # A zero λ removes the term; the name decides which terms exist at all.
    assert active_terms(objective_config("place", lambda_cce=0.0)) == ("ita", "pcma")
    assert active_terms(ObjectiveConfig()) == OBJECTIVE_TERMS["place"]
    assert loss_keys(objective_config("place_no_cce")) == (
        "ita",
        "pcma",
        "pcma_inter",
        "pcma_slot",
        "temperature",
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="simclr"), "unknown objective"),
        (dict(name="place", cce_teacher="momentum"), "cce_teacher"),
        (dict(name="place", lambda_ita=-1.0), "lambda_ita"),
        (dict(name="place", bogus=1), "unknown ObjectiveConfig fields"),
    ],
)
def test_objective_config_rejects_bad_input(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=message):
        objective_config(name, **kwargs)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_keys_and_branches_per_objective(name, batch):
    cfg = objective_config(name, lambda_ita=0.5)
    model = PLACEModel(tiny(), cfg, seed=1)
    total, losses = model.compute_losses(batch, training=False)
    assert {k for k in losses if not k.startswith("diag/")} == set(loss_keys(cfg))
    assert all(v.dtype == tf.float32 and np.isfinite(v.numpy()) for v in losses.values())
    expected_total = sum(getattr(cfg, f"lambda_{t}") * float(losses[t]) for t in active_terms(cfg))
    np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)
    np.testing.assert_allclose(float(losses["temperature"]), 0.07, rtol=1e-5)
    terms = OBJECTIVE_TERMS[name]
    assert hasattr(model, "correlation_decoder") == ("cce" in terms)
    assert hasattr(model, "token_cross_attention") == (
        "cta" in terms and cfg.cta_attention == "learned"
    )
    assert hasattr(model, "prototype_layer") == ("cpa" in terms)


# ------------------------------------------------------------------ encoders


def test_encode_outputs_vit(place, batch):
    out = place(batch)
    b, e, k = 4, 16, 4
    shapes = {
        "image_embedding": (b, e),
        "observations": (b, k, e),
        "attention_maps": (b, k, 4, 4),
        "patch_tokens": (b, 16, 32),
        "image_features": (b, 32),
        "text_embedding": (b, e),
        "text_observations": (b, k, e),
        "token_states": (b, 16, 32),
        "text_features": (b, 32),
    }
    assert {key: tuple(v.shape) for key, v in out.items()} == shapes
    for key in ("image_embedding", "observations", "text_embedding", "text_observations"):
        np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, atol=1e-5)
    maps = np.asarray(out["attention_maps"])
    assert (maps >= 0).all()
    np.testing.assert_allclose(maps.sum(axis=(2, 3)), 1.0, atol=1e-5)
    img = place.encode_image(batch["image"])
    np.testing.assert_allclose(img["image_embedding"], out["image_embedding"], atol=1e-6)


def test_resnet_model_at_64px():
    model = PLACEModel(tiny(image_encoder="resnet50", image_size=64), objective_config("place"))
    batch = make_batch(b=2, size=64)
    out = model(batch)
    assert out["image_features"].shape == (2, 2048)
    assert out["patch_tokens"].shape == (2, 16, 32)
    assert out["attention_maps"].shape == (2, 4, 4, 4)
    np.testing.assert_allclose(np.linalg.norm(out["image_embedding"], axis=-1), 1.0, atol=1e-5)
    assert model.num_visible == 8
    total, losses = model.compute_losses(batch, training=True)
    terms = {k for k in losses if not k.startswith("diag/")}
    assert np.isfinite(float(total)) and terms == set(loss_keys(model.objective_config))


def test_logit_scale_init_clip_and_freeze():
    model = PLACEModel(tiny(), objective_config("convirt", temperature_init=0.05))
    np.testing.assert_allclose(float(model.logit_scale), 20.0, rtol=1e-5)
    assert any(v is model.log_logit_scale for v in model.trainable_variables)
    model.log_logit_scale.assign(math.log(1000.0))
    np.testing.assert_allclose(float(model.logit_scale), 100.0, rtol=1e-5)
    frozen = PLACEModel(tiny(), objective_config("convirt", learn_temperature=False))
    assert not any(v is frozen.log_logit_scale for v in frozen.trainable_variables)


# ------------------------------------------------------------------ CCE mask / teacher


def test_sample_keep_indices(place):
    assert num_visible_patches(16, 0.5) == 8 and num_visible_patches(196, 0.75) == 49
    with pytest.raises(ValueError, match="cce_mask_ratio"):
        num_visible_patches(16, 1.0)
    idx = place.sample_keep_indices(5).numpy()
    assert idx.shape == (5, 8) and idx.dtype == np.int32
    assert ((idx >= 0) & (idx < 16)).all()
    assert all(len(set(row)) == 8 for row in idx)  # distinct per example
    assert len({tuple(sorted(row)) for row in idx}) > 1  # random per example
    # Same seed -> same masks; the generator moves on between calls.
    a = PLACEModel(tiny(), objective_config("place"), seed=3)
    b = PLACEModel(tiny(), objective_config("place"), seed=3)
    first = a.sample_keep_indices(4).numpy()
    np.testing.assert_array_equal(first, b.sample_keep_indices(4).numpy())
    assert not np.array_equal(first, a.sample_keep_indices(4).numpy())


def test_cce_keep_indices_override(place, batch):
    keep = np.tile(np.arange(8, dtype="int32")[None], (4, 1))
    _, l1 = place.compute_losses({**batch, "cce_keep_indices": keep}, training=False)
    _, l2 = place.compute_losses({**batch, "cce_keep_indices": keep}, training=False)
    np.testing.assert_allclose(float(l1["cce"]), float(l2["cce"]), rtol=1e-6)
    _, l3 = place.compute_losses({**batch, "cce_keep_indices": keep + 8}, training=False)
    assert float(l3["cce"]) != pytest.approx(float(l1["cce"]), rel=1e-6)


def test_ema_teacher_starts_as_copy_and_moves_by_momentum(batch):
    model = PLACEModel(tiny(), objective_config("place", cce_teacher="ema"), seed=2)
    assert not model.teacher_encoder.trainable_variables
    for t, s in zip(model.teacher_encoder.weights, model.image_encoder.weights, strict=True):
        np.testing.assert_array_equal(t.numpy(), s.numpy())
    before = [w.numpy() for w in model.teacher_encoder.weights]
    for s in model.image_encoder.weights:
        s.assign(s + 1.0)
    model.update_teacher(0.9)
    for t, b0, s in zip(
        model.teacher_encoder.weights, before, model.image_encoder.weights, strict=True
    ):
        np.testing.assert_allclose(t.numpy(), 0.9 * b0 + 0.1 * s.numpy(), rtol=1e-5, atol=1e-6)
    _, losses = model.compute_losses(batch, training=True)
    assert np.isfinite(float(losses["cce"]))


# ------------------------------------------------------------------ gradients


def _grads(model, batch, variables):
    with tf.GradientTape() as tape:
        total, _ = model.compute_losses(batch, training=True)
    return tape.gradient(total, variables)


def test_place_gradients_reach_every_trainable_weight(place, batch):
    variables = place.trainable_variables
    assert len(place.trainable_loss_variables) == len(variables)
    assert not any("pooled_dense" in v.path for v in variables)
    grads = _grads(place, batch, variables)
    missing = [v.path for g, v in zip(grads, variables, strict=True) if g is None]
    assert not missing
    for g, v in zip(grads, variables, strict=True):
        g = tf.convert_to_tensor(g)
        assert np.isfinite(g.numpy()).all(), v.path
    paths = {v.path for v in variables}
    assert any(p.startswith("correlation_decoder/") for p in paths)
    assert any(p.startswith("text_observer/") for p in paths)


def test_convirt_builds_no_cce_and_trains_no_observers(batch):
    model = PLACEModel(tiny(), objective_config("convirt"))
    assert not hasattr(model, "correlation_decoder") and not hasattr(model, "cce_seed_generator")
    assert not any("correlation_decoder" in v.path for v in model.weights)
    variables = model.trainable_variables
    grads = _grads(model, batch, variables)
    none = {v.path for g, v in zip(grads, variables, strict=True) if g is None}
    observer_layers = (
        "pathology_queries",
        "image_observer",
        "text_observer",
        "observation_projection",
    )
    assert none and all(any(k in p for k in observer_layers) for p in none)
    used = model.trainable_loss_variables
    assert {v.path for v in used}.isdisjoint(none) and len(used) + len(none) == len(variables)
    assert all(g is not None for g in _grads(model, batch, used))


# ------------------------------------------------------------------ XLA, save/load, fit


@pytest.mark.slow
def test_compute_losses_xla_matches_eager(place, batch):
    keep = place.sample_keep_indices(4).numpy()
    fixed = {**batch, "cce_keep_indices": keep}
    fixed.pop("labels")
    total, losses = place.compute_losses(fixed, training=False)
    xla = tf.function(lambda b: place.compute_losses(b, training=False), jit_compile=True)
    total_x, losses_x = xla(fixed)
    np.testing.assert_allclose(float(total_x), float(total), rtol=1e-4)
    for key, value in losses.items():
        np.testing.assert_allclose(float(losses_x[key]), float(value), rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(tmp_path, batch):
    model = PLACEModel(tiny(), objective_config("place", cce_teacher="ema"), seed=5)
    model.image_projection.output_layer.kernel.assign(
        model.image_projection.output_layer.kernel + 0.5
    )  # differs from any fresh init
    path = str(tmp_path / "place.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, PLACEModel)
    assert loaded.model_config == model.model_config
    assert loaded.objective_config == model.objective_config
    out, out2 = model(batch), loaded(batch)
    for key in out:
        np.testing.assert_array_equal(np.asarray(out2[key]), np.asarray(out[key]), err_msg=key)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # The mask generator's state is saved too: the next CCE loss is the same.
    _, la = model.compute_losses(batch, training=False)
    _, lb = loaded.compute_losses(batch, training=False)
    np.testing.assert_allclose(float(lb["cce"]), float(la["cce"]), rtol=1e-6)


def test_preset_init_via_config(tmp_path, batch):
    with pytest.raises(FileNotFoundError, match="no_vit_here"):
        PLACEModel(tiny(image_init=str(tmp_path / "no_vit_here")), objective_config("convirt"))
    with pytest.raises(FileNotFoundError, match="no_bert_here"):
        PLACEModel(tiny(text_init=str(tmp_path / "no_bert_here")), objective_config("convirt"))
    src = keras_hub.models.BertBackbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
    )
    src.save_to_preset(str(tmp_path / "bert"))
    model = PLACEModel(tiny(text_init=str(tmp_path / "bert")), objective_config("convirt"))
    ours = {w.path: w.numpy() for w in model.text_encoder.backbone.weights}
    for w in src.weights:
        np.testing.assert_array_equal(ours[w.path], w.numpy())
    config = model.get_config()
    assert config["model_config"]["text_init"] == ""  # weights travel in the file instead
    assert dataclasses.asdict(model.model_config)["text_init"] == str(tmp_path / "bert")


def test_mixed_precision_losses_are_float32(batch):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = PLACEModel(tiny(), objective_config("place"), seed=1)
        assert model.image_encoder.compute_dtype == "bfloat16"
        total, losses = model.compute_losses(batch, training=True)
        out = model.encode_image(batch["image"])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert total.dtype == tf.float32 and np.isfinite(float(total))
    assert all(v.dtype == tf.float32 for v in losses.values())
    assert out["image_embedding"].dtype == tf.float32
    np.testing.assert_allclose(np.linalg.norm(out["image_embedding"], axis=-1), 1.0, atol=1e-3)


def _fit(objective, jit_compile, steps=20, drop_remainder=True):
    keras.utils.set_random_seed(0)
    model = PLACEModel(tiny(), objective_config(objective), seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.0), jit_compile=jit_compile)
    data = make_batch(b=8, seed=1)
    data.pop("labels")
    ds = tf.data.Dataset.from_tensor_slices(data).batch(4, drop_remainder=drop_remainder)
    history = model.fit(ds.repeat(), epochs=steps // 2, steps_per_epoch=2, verbose=0, shuffle=False)
    return history.history


def test_fit_decreases_loss_convirt():
    history = _fit("convirt", jit_compile=False)
    losses = history["loss"]
    assert len(losses) == 10 and set(history) == {"loss", "ita", "temperature"}
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_fit_decreases_loss_place_xla():
    history = _fit("place", jit_compile=True)
    losses = history["loss"]
    assert set(history) == {"loss", "ita", "pcma", "pcma_inter", "pcma_slot", "cce", "temperature"}
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.slow
def test_fit_pcma_with_unknown_batch_dim():
    history = _fit("place_no_cce", jit_compile=False, steps=2, drop_remainder=False)
    assert np.isfinite(history["loss"]).all()
