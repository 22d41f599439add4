"""TFX Trainer module: a thin `run_fn` over place_tf.train.

The settings come from the Trainer's `custom_config` with the same names as the CLI
flags (place_tf/config.py). The WordPiece vocabulary is learned here from the train
split's reports, not in a separate component: the stock Trainer accepts no custom
artifact as input, and learning it inside the run keeps it next to the model that uses
it — it is written into the Model artifact (`Format-Serving/assets/vocab.txt` and the
run dir), so MLMD tracks it with the model's lineage.

Beside the trained model (`Format-Serving`, what Pusher pushes) the Model artifact holds
its random-init twin (`Format-RandomInit`: the same architecture and tokenizer, weights
at a fresh initialisation), the reference PlaceEvaluator's blessing must beat.
"""

from __future__ import annotations

import os

from absl import logging
from tfx.components.trainer.fn_args_utils import FnArgs

RANDOM_INIT_SUBDIR = "Format-RandomInit"


def random_init_dir(serving_model_dir: str) -> str:
    """Where the random-init twin is exported: beside `Format-Serving` in the Model artifact."""
    return os.path.join(os.path.dirname(serving_model_dir.rstrip("/")), RANDOM_INIT_SUBDIR)


def _reports(files: list[str], limit: int = 200_000):
    import tensorflow as tf

    from place_tf.data import schema

    spec = {k: schema.feature_spec()[k] for k in (schema.FINDINGS, schema.IMPRESSION)}
    ds = tf.data.TFRecordDataset(files, compression_type="GZIP").take(limit)
    for s in ds.as_numpy_iterator():
        ex = tf.io.parse_single_example(s, spec)
        yield schema.report_text(
            ex[schema.FINDINGS].numpy().decode("utf-8", "replace"),
            ex[schema.IMPRESSION].numpy().decode("utf-8", "replace"),
        )


def run_fn(fn_args: FnArgs) -> None:
    import keras
    import tensorflow as tf

    from place_tf.data import tokenizer as tok

    settings = dict(fn_args.custom_config or {})
    objective = settings.pop("objective", "place")
    vocab_size = int(settings.pop("vocab_size", 1000))
    run_dir = fn_args.model_run_dir
    tf.io.gfile.makedirs(run_dir)
    train_files = sorted(f for g in fn_args.train_files for f in tf.io.gfile.glob(g))
    if not settings.get("text_init"):
        # A text checkpoint (--text_init) brings its own vocabulary; otherwise learn one.
        vocab_file = os.path.join(run_dir, "vocab.txt")
        tok.learn_vocabulary(_reports(train_files), vocab_size, vocab_file)
        settings["vocab_file"] = vocab_file
    settings.update(
        train_files=",".join(train_files),
        eval_files=",".join(fn_args.eval_files),
        model_dir=run_dir,
        max_steps=int(fn_args.train_steps),
    )
    from place_tf import config as config_lib
    from place_tf.training.loop import Trainer

    cfg = config_lib.Configs(**config_lib.from_flat(settings, objective))
    trainer = Trainer(cfg)
    summary = trainer.run()
    # The model built inside the TFX process must be Keras 3, even though TFX imported
    # tensorflow_transform (which switches tf.keras to Keras 2).
    assert isinstance(trainer.model, keras.Model) and keras.__version__.startswith("3.")
    from place_tf import export as export_lib
    from place_tf.evaluate import linear_probe

    twin = linear_probe.random_init_twin_for(trainer.model, int(cfg.train.seed))
    for model, out_dir in (
        (trainer.model, fn_args.serving_model_dir),
        (twin, random_init_dir(fn_args.serving_model_dir)),
    ):
        export_lib.export_saved_model(
            model,
            trainer.tokenizer,
            out_dir,
            image_size=cfg.data.image_size,
            require_version=False,  # TFX's Format-Serving; Pusher versions it
        )
    logging.info(
        "run_fn: %d steps, final loss %.4f; SavedModel in %s",
        summary["steps"],
        summary["final_losses"].get("loss", float("nan")),
        fn_args.serving_model_dir,
    )
