"""The distributed training step: `build_train_step(...)(dist_batch) -> logs`.

Each replica runs
  tape { features = XLA(forward) ; losses(features) incl. all_gather } -> grads
and the optimizer (a LossScaleOptimizer) SUM-reduces gradients across replicas, which is
the convention of place_tf.losses (see losses/gather.py). With one replica the whole
forward+loss+backward is one XLA function. Why not `model.fit`: Keras' jit_compile fails
under MirroredStrategy (keras#19005), and the cross-replica contrastive losses need a
collective that XLA on CPU cannot compile.

A step with a non-finite loss or gradient on any replica is skipped everywhere (never
applied) and counted in `state.bad_steps`; with mixed_float16, a step whose scaled
gradients overflow only halves the loss scale (counted in `state.overflow_steps`).
"""

from __future__ import annotations

from absl import logging

from place_tf import objectives

# How each logged per-replica value combines across replicas. Contrastive terms are the
# full global-batch loss on every replica (mean); per-example terms are each replica's
# share local_sum / global_batch (sum); see place_tf/losses/gather.py.
REDUCTION = {"cce": "sum", "cta": "sum", "pcma_slot": "sum"}


def combine_logs(logs: dict, objective) -> dict:
    """Recompute the mixed terms (pcma, total loss) from the replica-reduced parts."""
    out = dict(logs)
    if "pcma_inter" in out and "pcma_slot" in out:
        out["pcma"] = 0.5 * (out["pcma_inter"] + out["pcma_slot"])
    weights = objectives.term_weights(objective)
    terms = [w * out[k] for k, w in weights.items() if w and k in out]
    if terms:
        out["loss"] = sum(terms[1:], terms[0])
    return out


def _replica_step(strategy, state, train_cfg):
    """The per-replica function: forward, losses, backward, guarded optimizer update."""
    import tensorflow as tf

    model, optimizer = state.model, state.optimizer
    replicas = strategy.num_replicas_in_sync
    dynamic = train_cfg.mixed_precision == "mixed_float16"
    # Only the variables the objective uses (ConVIRT leaves the PCMA branch unused, and
    # a None gradient must not reach the cross-replica reduction).
    variables = model.trainable_loss_variables

    def loss_and_grads(batch):
        with tf.GradientTape() as tape:
            total, logs = model.compute_losses(batch, training=True)
            scaled = optimizer.scale_loss(total)
        grads = tape.gradient(scaled, variables)
        return total, logs, grads

    if replicas == 1:
        # One device: forward, losses and backward in one XLA cluster. The optimizer
        # update stays outside it: compiled in, it multiplied the compile time several
        # times over for a step-time gain within the run-to-run noise.
        fused = tf.function(
            loss_and_grads, jit_compile=train_cfg.jit_compile, reduce_retracing=True
        )

        def replica_step(batch):
            return _apply(*fused(batch), optimizer, dynamic, variables)

        return replica_step
    if train_cfg.jit_compile and hasattr(model, "forward_features"):
        # Several replicas: the encoders (and per-example losses) run under XLA; the
        # cross-replica gather of the contrastive losses runs outside it (XLA:CPU has
        # no collectives, and merge_call cannot run inside a jit function).
        forward = tf.function(model.forward_features, jit_compile=True)

        def replica_step(batch):
            with tf.GradientTape() as tape:
                feats = forward(batch, training=True)
                total, logs = model.losses_from_features(feats)
                scaled = optimizer.scale_loss(total)
            grads = tape.gradient(scaled, variables)
            return _apply(total, logs, grads, optimizer, dynamic, variables)

        return replica_step
    if train_cfg.jit_compile:
        logging.warning("this model has no forward_features: XLA is off with %d replicas", replicas)

    def replica_step(batch):
        return _apply(*loss_and_grads(batch), optimizer, dynamic, variables)

    return replica_step


def build_train_step(strategy, state, train_cfg, objective_cfg, steps_per_epoch=None):
    """The distributed step `step(dist_batch) -> logs` (a tf.function; the logs stay on
    the device until the caller reads them). Updates `state`'s counters on the device.
    `steps_per_epoch` places epoch-based schedules of the objective (MGCA's prototypes
    frozen in the first epochs); without it those options stay off."""
    import tensorflow as tf

    replica_step = _replica_step(strategy, state, train_cfg)
    freeze = steps_per_epoch and getattr(objective_cfg, "freeze_prototypes_epochs", 0)

    @tf.function
    def step(dist_batch):
        if freeze:
            # Cross-replica context, before the replicas run: every copy sees one gate.
            state.model.set_training_step(state.global_step, steps_per_epoch)
        per_replica = strategy.run(replica_step, args=(dist_batch,))
        logs = {
            k: strategy.reduce(REDUCTION.get(k, "mean"), v, axis=None)
            for k, v in per_replica.items()
        }
        skipped = logs["skipped_step"] > 0
        overflow = logs.pop("overflow_step") > 0
        # A loss-scale overflow (mixed_float16) is routine: the scale halves, the step
        # is skipped; only genuinely non-finite steps count towards max_bad_steps.
        state.bad_steps.assign_add(tf.cast(skipped & ~overflow, tf.int64))
        state.global_step.assign_add(1)
        state.overflow_steps.assign_add(tf.cast(overflow, tf.int64))
        if objective_cfg.cce_teacher == "ema" and "cce" in logs:
            state.model.update_teacher()  # cross-replica context: every copy moves alike
        return combine_logs(logs, objective_cfg)

    return step


def repeat_step(train_step):
    """`run(iterator, steps) -> logs`: `steps` (a scalar tensor, >= 1) calls of
    `train_step` on the iterator's next batches in one tf.function call; the logs are
    the last step's."""
    import tensorflow as tf

    @tf.function
    def run(iterator, steps):
        logs = train_step(next(iterator))
        for _ in tf.range(steps - 1):
            logs = train_step(next(iterator))
        return logs

    return run


def _apply(total, logs, grads, optimizer, dynamic, variables):
    """Apply `grads` unless any replica's loss or gradient is non-finite (then the
    LossScaleOptimizer skips the update: NaN gradients are its skip signal)."""
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    grads_finite = tf.reduce_all(
        [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
    )
    loss_finite = tf.math.is_finite(total)
    # Same decision on every replica: a single replica's NaN skips the step everywhere.
    bad = ctx.all_reduce(
        "sum",
        tf.stack(
            [
                1.0 - tf.cast(tf.logical_and(grads_finite, loss_finite), tf.float32),
                1.0 - tf.cast(loss_finite, tf.float32),
            ]
        ),
    )
    all_finite = bad[0] < 0.5
    # Finite losses but overflowing scaled gradients while the loss scale is > 1: the
    # loss scaler's business (it halves the scale), not a bad step.
    overflow = tf.logical_and(tf.logical_not(all_finite), bad[1] < 0.5)
    if dynamic:
        overflow = tf.logical_and(overflow, optimizer.dynamic_scale > 1.0)
    else:
        overflow = tf.constant(False)
    grads = [
        g if g is None else tf.where(all_finite, g, tf.fill(tf.shape(g), float("nan")))
        for g in grads
    ]
    optimizer.apply(grads, variables)

    out = {"loss": total}
    out.update({k: v for k, v in logs.items() if k != "loss"})
    out["skipped_step"] = 1.0 - tf.cast(all_finite, tf.float32)
    out["overflow_step"] = tf.cast(overflow, tf.float32)
    return out
