"""Learning-rate schedule of pre-training: linear warm-up, then cosine decay to 0."""

from __future__ import annotations


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int):
    """Keras schedule (a function of the optimizer's step), so a resumed run continues it."""
    import keras

    decay_steps = max(1, total_steps - warmup_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else base_lr,
        decay_steps=decay_steps,
        warmup_target=base_lr if warmup_steps else None,
        warmup_steps=warmup_steps,
        alpha=0.0,
    )
