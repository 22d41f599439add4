"""Everything a training step needs before it runs: the strategy, seeds and determinism,
the precision policy, and the train state (model + optimizer + loop counters) built in
the strategy's scope. The benchmark builds exactly this, so it times what training runs.
"""

from __future__ import annotations

import dataclasses

from place_tf import distribute
from place_tf.training.schedule import warmup_cosine


def prepare(train_cfg):
    """Strategy, seeds, determinism and precision policy of a run, in the order TF needs
    (the strategy first: splitting the CPU into logical devices must precede any op)."""
    import keras
    import tensorflow as tf

    strategy = distribute.make_strategy(train_cfg.strategy, train_cfg.num_cpu_devices)
    keras.utils.set_random_seed(train_cfg.seed)
    if train_cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(train_cfg.mixed_precision)
    return strategy


def steps_per_epoch(train_cfg, num_train_examples: int, global_batch: int) -> int:
    return train_cfg.steps_per_epoch or max(1, num_train_examples // global_batch)


def total_steps(train_cfg, num_train_examples: int, global_batch: int) -> int:
    if train_cfg.max_steps:
        return train_cfg.max_steps
    return steps_per_epoch(train_cfg, num_train_examples, global_batch) * train_cfg.epochs


@dataclasses.dataclass
class TrainState:
    """What a step updates and a checkpoint holds. `global_step` counts loop steps
    including skipped ones (optimizer.iterations counts applied steps only);
    `overflow_steps` counts mixed_float16 loss-scale overflows (not bad steps)."""

    model: object
    optimizer: object  # LossScaleOptimizer over AdamW
    bad_steps: object
    global_step: object
    overflow_steps: object

    def counters(self) -> dict:
        """The checkpointed loop counters, by their checkpoint names."""
        return {
            "bad_steps": self.bad_steps,
            "global_step": self.global_step,
            "overflow_steps": self.overflow_steps,
        }


def make_optimizer(train_cfg, steps: int):
    """AdamW with the warm-up cosine schedule, in a LossScaleOptimizer.

    LossScaleOptimizer skips steps whose gradients are not finite (on every replica
    alike) and does dynamic loss scaling for mixed_float16; in fp32/bf16 it keeps a
    scale of 1 (no growth).
    """
    import keras

    t = train_cfg
    inner = keras.optimizers.AdamW(
        learning_rate=warmup_cosine(t.learning_rate, steps, t.warmup_steps),
        weight_decay=t.weight_decay,
        beta_1=t.beta_1,
        beta_2=t.beta_2,
        global_clipnorm=None,
    )
    # Norm and bias weights are not decayed (as MGCA/open_clip).
    inner.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "norm"])
    dynamic = t.mixed_precision == "mixed_float16"
    return keras.optimizers.LossScaleOptimizer(
        inner,
        initial_scale=2.0**15 if dynamic else 1.0,
        dynamic_growth_steps=2000 if dynamic else 2**31 - 1,
    )


def build_train_state(strategy, model_cfg, objective_cfg, train_cfg, steps: int) -> TrainState:
    """The model and optimizer built inside `strategy`'s scope, the optimizer built before
    any traced step (keras#23085), plus the loop counters."""
    import tensorflow as tf

    from place_tf.models import factory

    with strategy.scope():
        model = factory.create_model(model_cfg, objective_cfg)
        optimizer = make_optimizer(train_cfg, steps)
        optimizer.build(model.trainable_variables)  # before tracing (keras#23085)
        return TrainState(
            model=model,
            optimizer=optimizer,
            bad_steps=tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_steps"),
            global_step=tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step"),
            overflow_steps=tf.Variable(0, dtype=tf.int64, trainable=False, name="overflow_steps"),
        )
