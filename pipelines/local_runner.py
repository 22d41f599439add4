"""Run the PLACE pipeline locally (LocalDagRunner, sqlite MLMD, Beam DirectRunner).

    tfx pipeline create --pipeline_path=$PWD/pipelines/local_runner.py --engine=local
    tfx run create --pipeline_name=place --engine=local
or directly: tools/run python pipelines/local_runner.py

With no data configured (PLACE_DATA_ROOT unset) it generates a small SynthCXR corpus.
Settings: pipelines/configs.py (environment variables override them).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402
from tfx import v1 as tfx  # noqa: E402

from pipelines import configs  # noqa: E402
from pipelines.place_pipeline import create_pipeline  # noqa: E402


def ensure_data() -> None:
    """A configured DATA_ROOT with a corpus is used as it is. Otherwise SynthCXR is
    generated there, and the runner's own cache is regenerated when stale (older
    generator, other image count or render size): synthetic.refresh_cache."""
    from place_tf.data import manifest, synthetic

    if configs.DATA_ROOT_CONFIGURED and os.path.exists(
        os.path.join(configs.DATA_ROOT, manifest.MANIFEST_NAME)
    ):
        return
    synthetic.refresh_cache(
        configs.DATA_ROOT,
        configs.SYNTHETIC_IMAGES,
        image_size=configs.TRAINING["image_size"],
        seed=0,
    )


def build() -> tfx.dsl.Pipeline:
    ensure_data()
    os.makedirs(os.path.dirname(configs.METADATA_PATH), exist_ok=True)
    return create_pipeline(
        pipeline_name=configs.PIPELINE_NAME,
        pipeline_root=configs.PIPELINE_ROOT,
        data_root=configs.DATA_ROOT,
        schema_path=configs.SCHEMA_PATH,
        trainer_run_fn=configs.TRAINER_RUN_FN,
        serving_model_dir=configs.SERVING_MODEL_DIR,
        training=configs.TRAINING,
        train_steps=configs.TRAIN_STEPS,
        eval_steps=configs.EVAL_STEPS,
        blessing=configs.BLESSING,
        max_bad_fraction=configs.MAX_BAD_FRACTION,
        metadata_connection_config=tfx.orchestration.metadata.sqlite_metadata_connection_config(
            configs.METADATA_PATH
        ),
        beam_pipeline_args=configs.BEAM_PIPELINE_ARGS,
    )


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    tfx.orchestration.LocalDagRunner().run(build())
