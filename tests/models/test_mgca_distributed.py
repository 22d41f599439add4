"""The MGCA preset's synchronized BatchNorm heads under MirroredStrategy on 2 logical CPUs,
run as the trainer's multi-replica step runs (forward_features under XLA inside
strategy.run, losses_from_features outside it): the losses equal the single-device losses
of the same global batch, because the BatchNorm statistics are the global batch's.

Logical devices must be configured before TensorFlow initialises, so the check runs in a
subprocess (`python <this file>`) that prints its results as JSON.
"""

import json
import os
import subprocess
import sys

import numpy as np

TOL = 1e-4


def _run() -> dict:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from place_tf.config import tiny_model_config
    from place_tf.models.place_model import PLACEModel
    from place_tf.objectives import objective_config

    rng = np.random.default_rng(0)
    b, length = 8, 16
    lengths = rng.integers(4, length + 1, b)
    batch = {
        "image": rng.uniform(-1, 1, (b, 32, 32, 1)).astype("float32"),
        "token_ids": rng.integers(5, 64, (b, length)).astype("int32"),
        "padding_mask": np.arange(length)[None, :] < lengths[:, None],
    }
    cfg = objective_config("mgca")
    keras.utils.set_random_seed(0)
    single = PLACEModel(tiny_model_config(), cfg, seed=0)
    _, want = single.compute_losses(batch, training=True)

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = PLACEModel(tiny_model_config(), cfg, seed=0)
    model.set_weights(single.get_weights())
    forward = tf.function(model.forward_features, jit_compile=True)

    def replica_step(shard):
        feats = forward(shard, training=True)
        return model.losses_from_features(feats)[1]

    @tf.function
    def step(dist_batch):
        per_replica = strategy.run(replica_step, args=(dist_batch,))
        reduction = {"cta": "sum"}  # per-example share; the rest are global values
        return {
            k: strategy.reduce(reduction.get(k, "mean"), v, axis=None)
            for k, v in per_replica.items()
            if k in ("ita", "cta", "cpa")
        }

    ds = tf.data.Dataset.from_tensor_slices(batch).batch(b)
    got = step(next(iter(strategy.experimental_distribute_dataset(ds))))
    return {
        "want": {k: float(want[k]) for k in ("ita", "cta", "cpa")},
        "got": {k: float(v) for k, v in got.items()},
    }


def test_mgca_batchnorm_heads_give_global_batch_losses_over_two_replicas():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for k, want in result["want"].items():
        np.testing.assert_allclose(result["got"][k], want, rtol=TOL, err_msg=k)


if __name__ == "__main__":
    print(json.dumps(_run()))
