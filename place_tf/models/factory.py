"""The one way to make a PLACEModel: from configs (`create_model`), as the untrained twin
of another model (`random_init_twin`), or from what a training run left (`load_model`:
a .keras file, or a run directory's configs + newest readable checkpoint)."""

from __future__ import annotations

import dataclasses
import os

from absl import logging


def dummy_batch(model_cfg) -> dict:
    """A one-example batch of the model's input shapes (builds a model's weights)."""
    import tensorflow as tf

    s, n = model_cfg.image_size, model_cfg.max_length
    return {
        "image": tf.zeros([1, s, s, 1]),
        "token_ids": tf.zeros([1, n], tf.int32),
        "padding_mask": tf.ones([1, n], tf.bool),
    }


def create_model(model_cfg, objective_cfg, seed: int | None = None, build: bool = True):
    """PLACEModel of these configs (dataclasses or their dicts). `seed`: the CCE mask
    generator's (None: from Keras' global RNG). `build`: create every weight now with a
    dummy forward pass (a checkpoint or an optimizer needs them); unbuilt layers create
    theirs at the first call."""
    from place_tf.config import ModelConfig, ObjectiveConfig, from_dict
    from place_tf.models.place_model import PLACEModel

    if isinstance(model_cfg, dict):
        model_cfg = from_dict(ModelConfig, model_cfg)
    if isinstance(objective_cfg, dict):
        objective_cfg = from_dict(ObjectiveConfig, objective_cfg)
    model = PLACEModel(model_cfg, objective_cfg, seed=seed)
    if build:
        model(dummy_batch(model_cfg), training=False)
    return model


def random_init_twin(model_cfg, objective_cfg, seed: int, build: bool = True):
    """The untrained model of the same configs, initialised from `seed` (the baseline a
    pre-trained model must beat). Checkpoint initialisation (`image_init`, `text_init`) is
    dropped: the twin of a model that started from public weights is random too."""
    import keras

    from place_tf.config import ModelConfig, from_dict

    if isinstance(model_cfg, dict):
        model_cfg = from_dict(ModelConfig, model_cfg)
    model_cfg = dataclasses.replace(model_cfg, image_init="", text_init="")
    keras.utils.set_random_seed(seed)
    return create_model(model_cfg, objective_cfg, seed=seed, build=build)


def twin_of(model, seed: int, build: bool = True):
    """`random_init_twin` of an existing PLACEModel's configs."""
    return random_init_twin(
        dataclasses.asdict(model.model_config),
        dataclasses.asdict(model.objective_config),
        seed,
        build=build,
    )


def load_model(path: str):
    """PLACEModel from a .keras file or a training run directory.

    A run directory with checkpoints and run_info.json: the model is rebuilt from the
    recorded configs and the newest readable checkpoint restored (a run stopped before
    writing model.keras can still be evaluated); without checkpoints, its model.keras.
    """
    import keras
    import tensorflow as tf

    import place_tf.models.place_model  # noqa: F401  (registers PLACEModel for load_model)
    from place_tf.training import checkpoints, run_dir

    if not path:
        raise ValueError("no model given: pass a .keras file or a training run directory")
    if os.path.isfile(path):
        if not path.endswith(".keras"):
            raise ValueError(f"{path}: expected a .keras file or a run directory")
        return keras.saving.load_model(path, compile=False)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path not found: {path}")
    ckpt_dir = run_dir.checkpoint_dir(path)
    latest = tf.train.latest_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    info = run_dir.read_run_info(path)
    keras_file = os.path.join(path, run_dir.MODEL_FILE)
    if latest and info is not None:
        cfgs = info.get("configs", {})
        if "model" not in cfgs or "objective" not in cfgs:
            raise ValueError(
                f"{os.path.join(path, run_dir.RUN_INFO_FILE)}: 'configs' needs 'model' and "
                "'objective'"
            )
        model = create_model(cfgs["model"], cfgs["objective"], build=False)
        checkpoints.restore_model(model, ckpt_dir)  # the newest readable one, as training
        return model
    if os.path.exists(keras_file):
        return keras.saving.load_model(keras_file, compile=False)
    logging.debug("no checkpoint, run_info or model file in %s", path)
    raise FileNotFoundError(
        f"{path}: neither {run_dir.CKPT_SUBDIR}/ with {run_dir.RUN_INFO_FILE} nor "
        f"{run_dir.MODEL_FILE}: not a PLACE-TF run"
    )
