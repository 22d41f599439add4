"""The dense tasks' shared head training: two learning rates, best-epoch selection."""

import math

import keras
import numpy as np
import pytest

from place_tf.evaluate import head_training as ht


def test_head_only_step_is_adamw_first_step():
    w = keras.Variable(np.array([1.0, -2.0], np.float32))
    opt = ht.HeadOptimizer([w], [], learning_rate=0.1, encoder_learning_rate=0.01, weight_decay=0.0)
    assert opt.encoder is None and opt.variables == [w]
    # Adam's first step moves each weight by lr * sign(g) (m̂/√v̂ = g/|g|).
    opt.apply([np.array([2.0, -0.5], np.float32)])
    np.testing.assert_allclose(w.numpy(), [0.9, -1.9], rtol=1e-5)


def test_encoder_gets_its_own_rate_and_none_gradients_are_skipped():
    head = keras.Variable(np.float32(1.0))
    enc_a = keras.Variable(np.float32(1.0))
    enc_b = keras.Variable(np.float32(5.0))  # no gradient reaches it
    opt = ht.HeadOptimizer([head], [enc_a, enc_b], 0.1, 0.01, weight_decay=0.5)
    assert opt.variables == [head, enc_a, enc_b]
    opt.apply([np.float32(3.0), np.float32(3.0), None])
    # AdamW: w -= lr * wd * w (decoupled decay), then w -= lr * sign(g).
    assert float(head.numpy()) == pytest.approx(1.0 - 0.1 * 0.5 - 0.1, rel=1e-5)
    assert float(enc_a.numpy()) == pytest.approx(1.0 - 0.01 * 0.5 - 0.01, rel=1e-5)
    assert float(enc_b.numpy()) == 5.0


def test_wrong_number_of_gradients_is_named():
    opt = ht.HeadOptimizer([keras.Variable(1.0)], [keras.Variable(1.0)], 0.1, 0.01, 0.0)
    with pytest.raises(ValueError, match="1 gradients for 1 head \\+ 1 encoder variables"):
        opt.apply([np.float32(1.0)])


def _run(scores, higher_is_better=True, validate=True):
    """Epoch e sets the weight to e; validation returns scores[e - 1]."""
    w = keras.Variable(np.float32(0.0))
    epoch = {"n": 0}

    def train_epoch():
        epoch["n"] += 1
        w.assign(float(epoch["n"]))
        return {"loss": 10.0 / epoch["n"]}

    history, best = ht.fit_selecting_on_validation(
        "t",
        len(scores),
        train_epoch,
        (lambda: scores[epoch["n"] - 1]) if validate else None,
        [w],
        "val_score",
        higher_is_better,
    )
    return float(w.numpy()), best, history


def test_best_epoch_is_restored_and_nan_never_selected():
    w, best, history = _run([0.2, math.nan, 0.5, 0.3])
    assert (w, best) == (3.0, 0.5)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[2] == {"epoch": 3, "loss": pytest.approx(10 / 3), "val_score": 0.5}
    assert math.isnan(history[1]["val_score"])


def test_lower_is_better_for_losses():
    w, best, _ = _run([3.0, 1.0, 2.0, math.nan], higher_is_better=False)
    assert (w, best) == (2.0, 1.0)


def test_without_validation_the_last_epoch_stays():
    w, best, history = _run([0.9, 0.1, 0.2], validate=False)
    assert w == 3.0 and math.isnan(best)
    assert "val_score" not in history[0]


def test_all_nan_validation_keeps_the_last_epoch():
    w, best, _ = _run([math.nan, math.nan])
    assert w == 2.0 and math.isnan(best)


class _Features:
    """The part of task_data.TaskFeatures that for_task reads."""

    def __init__(self, finetune):
        self.encoder = keras.layers.BatchNormalization()
        self.encoder.build((None, 3))
        self.finetune = finetune

    def trainable_variables(self):
        return list(self.encoder.trainable_variables) if self.finetune else []

    def encoder_weights(self):
        return list(self.encoder.weights)


def test_for_task_tracks_every_head_weight_and_the_encoder_only_when_fine_tuned():
    head = keras.layers.BatchNormalization()  # 2 trainable + 2 non-trainable weights
    head.build((None, 3))
    frozen = ht.HeadOptimizer.for_task(head, _Features(False), 0.1, 0.01, 0.0)
    assert frozen.encoder is None and frozen.variables == list(head.trainable_variables)
    assert [id(v) for v in frozen.tracked] == [id(v) for v in head.weights]
    feats = _Features(True)
    tuned = ht.HeadOptimizer.for_task(head, feats, 0.1, 0.01, 0.0)
    assert tuned.encoder_variables == list(feats.encoder.trainable_variables)
    want = head.weights + feats.encoder.weights
    assert [id(v) for v in tuned.tracked] == [id(v) for v in want] and len(want) == 8
