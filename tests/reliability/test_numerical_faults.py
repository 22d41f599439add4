"""Numerical faults: a step whose loss is NaN/Inf is skipped (never applied), counted, and
too many of them stop the run with NonFiniteLossError; under mixed_float16 an overflowing
step halves the loss scale and is skipped without counting as a bad step.

Faults are injected in-process by wrapping PLACEModel.compute_losses: a counter variable
numbers the steps, and the chosen steps' loss is multiplied by NaN (or by a huge finite
factor that overflows float16 gradients). Checkpoints after every step show exactly what
each step did to the weights and the optimizer.
"""

import os

import numpy as np
import pytest
import reliability_util as U
import tensorflow as tf

from place_tf.models.place_model import PLACEModel
from place_tf.training.guards import NonFiniteLossError
from place_tf.training.loop import Trainer


def poison_steps(monkeypatch, steps, factor):
    """Multiply the loss of the given (1-based) steps by `factor`, in-graph."""
    original = PLACEModel.compute_losses
    calls = tf.Variable(0, dtype=tf.int64, trainable=False)
    chosen = tf.constant(list(steps), tf.int64)

    def compute_losses(self, batch, training):
        total, logs = original(self, batch, training)
        n = calls.assign_add(1)
        hit = tf.reduce_any(tf.equal(n, chosen))
        scale = tf.where(hit, tf.constant(factor, total.dtype), tf.constant(1.0, total.dtype))
        return total * scale, logs

    monkeypatch.setattr(PLACEModel, "compute_losses", compute_losses)
    return calls


def ckpt(model_dir, n):
    return U.read_checkpoint(os.path.join(model_dir, "checkpoints", f"ckpt-{n}"))


def inner_optimizer_state(c):
    """Moments and step counter of AdamW (the loss-scale variables change on a skipped step:
    the scale halves, also in float32 where scaling by a power of two is exact)."""
    return {k: v for k, v in U.optimizer_state(c).items() if not U.is_loss_scale_key(k)}


def differs(a, b):
    return [k for k in a if not np.array_equal(a[k], b[k])]


# With XLA the loss and gradients come out of a compiled cluster (one device): the skip
# must hold there too.
@pytest.mark.parametrize("jit_compile", [False, True], ids=["eager_ops", "xla"])
def test_nan_steps_are_skipped_counted_and_stop_the_run(
    tiny_corpus, tmp_path, monkeypatch, global_tf_state, jit_compile
):
    model_dir = str(tmp_path / "run")
    cfg = U.tiny_configs(
        tiny_corpus,
        model_dir,
        jit_compile=jit_compile,
        max_steps=8,
        checkpoint_every=1,
        keep_checkpoints=10,
        max_bad_steps=2,
        learning_rate=1e-3,
    )
    calls = poison_steps(monkeypatch, steps=(2, 4, 5), factor=float("nan"))
    with pytest.raises(NonFiniteLossError) as err:
        Trainer(cfg).run()
    msg = str(err.value)
    assert "3 training steps had a non-finite loss or gradient" in msg
    assert "limit max_bad_steps=2" in msg and "stopping at step 5" in msg
    assert os.path.join(model_dir, "checkpoints") in msg
    assert int(calls.numpy()) == 5  # stopped right at the third bad step

    c = {n: ckpt(model_dir, n) for n in range(1, 6)}
    # Step 2 (NaN): weights AND optimizer state (moments, iterations) untouched.
    U.assert_same_arrays(U.model_weights(c[1]), U.model_weights(c[2]))
    U.assert_same_arrays(inner_optimizer_state(c[1]), inner_optimizer_state(c[2]))
    assert U.scalar(c[1], "bad_steps") == 0 and U.scalar(c[2], "bad_steps") == 1
    # Step 3 (finite) is applied to every trained weight group.
    assert differs(U.model_weights(c[2]), U.model_weights(c[3]))
    assert U.scalar(c[3], *U.ITERATIONS) == 2  # applied steps: 1 and 3
    # Steps 4 and 5 (NaN): nothing applied; the stop checkpoint equals step 3's weights.
    U.assert_same_arrays(U.model_weights(c[3]), U.model_weights(c[5]))
    assert U.scalar(c[5], "bad_steps") == 3
    # The loop step counts skipped steps too (a resumed run continues at step 5).
    assert [U.scalar(c[n], "global_step") for n in range(1, 6)] == [1, 2, 3, 4, 5]
    for n in c:
        for k, v in c[n].items():
            if v.dtype.kind == "f":
                assert np.all(np.isfinite(v)), f"ckpt-{n}: {k} is not finite"


def test_mixed_float16_overflow_halves_the_scale_and_skips(
    tiny_corpus, tmp_path, monkeypatch, global_tf_state
):
    model_dir = str(tmp_path / "run")
    cfg = U.tiny_configs(
        tiny_corpus,
        model_dir,
        max_steps=3,
        checkpoint_every=1,
        keep_checkpoints=10,
        max_bad_steps=0,  # an overflow must not count: a bad step would stop this run
        mixed_precision="mixed_float16",
        learning_rate=1e-3,
    )
    # x 1e30: the float32 loss stays finite, float16 gradients overflow to inf.
    poison_steps(monkeypatch, steps=(2,), factor=1e30)
    summary = Trainer(cfg).run()
    assert summary["bad_steps"] == 0 and summary["steps"] == 3

    c = {n: ckpt(model_dir, n) for n in range(1, 4)}
    scale = {n: float(c[n][U.find_key(c[n], *U.DYNAMIC_SCALE)]) for n in c}
    # Step 1 may overflow by itself at the initial scale 2**15 (then it halves too).
    natural = {2.0**15: 0, 2.0**14: 1}[scale[1]]
    assert scale[2] == scale[1] / 2  # the injected overflow halved the scale ...
    U.assert_same_arrays(U.model_weights(c[1]), U.model_weights(c[2]))  # ... and was skipped
    U.assert_same_arrays(inner_optimizer_state(c[1]), inner_optimizer_state(c[2]))
    assert scale[3] == scale[2]  # step 3 finite: applied, scale kept (growth every 2000)
    assert differs(U.model_weights(c[2]), U.model_weights(c[3]))
    assert summary["overflow_steps"] == 1 + natural
    assert U.scalar(c[3], "overflow_steps") == 1 + natural and U.scalar(c[3], "bad_steps") == 0
    assert U.scalar(c[3], *U.ITERATIONS) == 2 - natural
