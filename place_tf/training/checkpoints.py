"""Training checkpoints that really hold every weight, and the one way to restore them.

`tf.train.Checkpoint(model=keras3_model)` walks TF's object graph, which does not see
Keras 3 layers kept in Python lists (keras-hub's ViT transformer blocks, our decoder
blocks): those weights would silently come back at their random initial values on
resume. So checkpoints here are keyed by each variable's unique Keras path, flat:
`model/<path>` and `optimizer/<path>`, plus any extra trackables (counters). Restoring
asserts that every model and optimizer variable was found.

`restore_newest_readable` is used by training (resume) and evaluation (a run directory
without model.keras) alike: a crash can leave the newest checkpoint listed but truncated,
so the newest checkpoint that reads back completely is restored.
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


def checkpoint_paths(ckpt_dir: str) -> list[str]:
    """The checkpoints the `checkpoint` state file of `ckpt_dir` lists, oldest first."""
    import os

    import tensorflow as tf

    if not os.path.isdir(ckpt_dir):
        return []
    # A manager lists them as training's own manager does (max_to_keep=None: deletes none).
    return list(tf.train.CheckpointManager(tf.train.Checkpoint(), ckpt_dir, None).checkpoints)


def readable_checkpoints(paths) -> list[str]:
    """`paths` up to the newest one whose every tensor reads back (CRC-checked).

    A crash (of the machine, not just the process) can leave the latest checkpoint listed
    but truncated; TF then fails in ways restore does not always report as OpError (a
    truncated object graph raises IndexError) or after assigning part of the variables.
    Reading it first, without assigning anything, skips it cleanly. Only checkpoints
    newer than the first readable one are read twice.
    """
    import tensorflow as tf

    paths = list(paths)
    while paths:
        path = paths[-1]
        try:
            reader = tf.train.load_checkpoint(path)
            for key in reader.get_variable_to_shape_map():
                reader.get_tensor(key)
            break
        except Exception as e:  # TF is not uniform: OpError, IndexError, ValueError, ...
            logging.warning(
                "checkpoint %s is unreadable or incomplete (%s: %s); trying an older one",
                path,
                type(e).__name__,
                str(e)[:200],
            )
            paths.pop()
    return paths


def restore_newest_readable(checkpoint, paths, partial: bool = False) -> str | None:
    """Restore the newest of `paths` (oldest first) that reads back completely into
    `checkpoint`; fall back to older ones. Returns the path restored, or None.

    A checkpoint truncated or half-written by a crash, or one missing variables, fails
    to restore; it is logged and skipped. `partial`: the checkpoint may hold more than
    `checkpoint` tracks (evaluation restores the model without the optimizer).
    """
    import tensorflow as tf

    for path in reversed(readable_checkpoints(paths)):
        try:
            status = checkpoint.restore(path)
            if partial:
                status.expect_partial()
            status.assert_existing_objects_matched()
            if not partial:
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


def restore_model(model, ckpt_dir: str) -> str:
    """Restore only the model's weights from the newest readable checkpoint in `ckpt_dir`
    (evaluation, export); ValueError when none restores."""
    path = restore_newest_readable(make_checkpoint(model), checkpoint_paths(ckpt_dir), True)
    if path is None:
        raise ValueError(f"{ckpt_dir}: no checkpoint could be restored into the model")
    logging.info("restored model weights from %s", path)
    return path


class CheckpointSaver:
    """Saves `checkpoint` as ckpt-<step> under `ckpt_dir` (at most once per step).

    Multi-worker protocol: every worker takes part in a save (it is collective), but only
    the chief writes to `ckpt_dir`; the others write to a scratch directory, and all of
    them restore the chief's checkpoints (`restore_paths`).
    """

    def __init__(self, checkpoint, ckpt_dir: str, keep: int, scratch_dir: str = ""):
        import tensorflow as tf

        self.ckpt_dir = ckpt_dir
        self._manager = tf.train.CheckpointManager(
            checkpoint, scratch_dir or ckpt_dir, max_to_keep=1 if scratch_dir else keep
        )

    def restore_paths(self) -> list[str]:
        return checkpoint_paths(self.ckpt_dir)

    @property
    def latest(self) -> str | None:
        return self._manager.latest_checkpoint

    def save(self, step: int) -> None:
        if not (self.latest or "").endswith(f"-{step}"):
            self._manager.save(checkpoint_number=step)
