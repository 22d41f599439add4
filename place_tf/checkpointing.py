"""Training checkpoints that really hold every weight.

`tf.train.Checkpoint(model=keras3_model)` walks TF's object graph, which does not see
Keras 3 layers kept in Python lists (keras-hub's ViT transformer blocks, our decoder
blocks): those weights would silently come back at their random initial values on
resume. So checkpoints here are keyed by each variable's unique Keras path, flat:
`model/<path>` and `optimizer/<path>`, plus any extra trackables (data iterator,
counters). Restoring asserts that every model and optimizer variable was found.
"""

from __future__ import annotations

from absl import logging

MODEL_PREFIX = "model"
OPTIMIZER_PREFIX = "optimizer"


def _key(prefix: str, path: str) -> str:
    # Checkpoint attribute names: keep them readable and free of separators.
    return f"{prefix}.{path.replace('/', '.')}"


def flat_variables(prefix: str, variables, model_name: str = "", renames=None) -> dict:
    """{checkpoint key: variable} for Keras variables, with unique keys (or an error).

    The top-level model's own name is auto-numbered per process ("place_model_1" when a
    second model was built first), so it is removed from the keys. Likewise optimizers
    ("adam_w_1"): `renames` maps a path's first component to a fixed name.
    """
    out: dict = {}
    for v in variables:
        path = v.path
        head, sep, rest = path.partition("/")
        if renames and sep and head in renames:
            path = f"{renames[head]}/{rest}"
        if model_name:
            if path.startswith(model_name + "/"):
                path = path[len(model_name) + 1 :]
            path = path.replace(f"/{model_name}_", "/", 1)  # optimizer slots: adamw/<model>_...
        key = _key(prefix, path)
        if key in out:
            raise ValueError(f"two {prefix} variables share the path {v.path!r}; cannot checkpoint")
        out[key] = v  # Keras 3 variables on TF are trackable themselves
    return out


def optimizer_renames(optimizer) -> dict:
    """Fixed names for an optimizer (and a LossScaleOptimizer's inner one), whose own
    names are auto-numbered per process: a checkpoint must restore in a fresh process."""
    renames = {optimizer.name: "optimizer"}
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None:
        renames[inner.name] = "inner_optimizer"
    return renames


def make_checkpoint(model, optimizer=None, **extras):
    """A tf.train.Checkpoint over the model's (and optimizer's) variables and `extras`."""
    import tensorflow as tf

    objects = flat_variables(MODEL_PREFIX, model.weights, model.name)
    if optimizer is not None:
        objects.update(
            flat_variables(
                OPTIMIZER_PREFIX, optimizer.variables, model.name, optimizer_renames(optimizer)
            )
        )
    clash = set(objects) & set(extras)
    if clash:
        raise ValueError(f"extra checkpoint names clash with variables: {sorted(clash)}")
    objects.update(extras)
    return tf.train.Checkpoint(**objects)


def restore_latest_good(manager, checkpoint) -> str | None:
    """Restore the newest checkpoint that reads back completely; fall back to older ones.

    A checkpoint truncated or half-written by a crash, or one missing variables, fails
    to restore; it is logged and skipped, and the previous one is used. Returns the path
    restored, or None when there is none.
    """
    import tensorflow as tf

    for path in reversed(manager.checkpoints):
        try:
            status = checkpoint.restore(path)
            status.assert_existing_objects_matched()
            status.assert_consumed()
            return path
        # IndexError / RuntimeError: what a truncated index or data file can raise from
        # the reader instead of an OpError.
        except (tf.errors.OpError, ValueError, AssertionError, IndexError, RuntimeError) as e:
            logging.warning(
                "checkpoint %s is unreadable or incomplete (%s); trying an older one",
                path,
                type(e).__name__,
            )
    return None


def restore_model(model, checkpoint_path: str) -> None:
    """Restore only the model's weights from a training checkpoint (evaluation, export)."""
    ckpt = make_checkpoint(model)
    ckpt.restore(checkpoint_path).expect_partial().assert_existing_objects_matched()
