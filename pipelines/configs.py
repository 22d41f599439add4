"""Pipeline settings (TFX penguin-template style): one place for names, paths and defaults.

Every value can be overridden by an environment variable of the same name, so the local
runner, the TFX CLI and the Kubeflow runner share one definition.
"""

from __future__ import annotations

import json
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


PIPELINE_NAME = _env("PLACE_PIPELINE_NAME", "place")
# Where pipeline artifacts, the MLMD sqlite store and the serving base dir live locally.
TFX_ROOT = _env("PLACE_TFX_ROOT", os.path.join(REPO_ROOT, "tfx_root"))
PIPELINE_ROOT = os.path.join(TFX_ROOT, "pipelines", PIPELINE_NAME)
METADATA_PATH = os.path.join(TFX_ROOT, "metadata", PIPELINE_NAME, "metadata.sqlite")
SERVING_MODEL_DIR = _env(
    "PLACE_SERVING_DIR", os.path.join(TFX_ROOT, "serving_model", PIPELINE_NAME)
)
# Input corpus: our TFRecords (manifest.json + <split>-NNNNN-of-NNNNN.tfrecord).
DATA_ROOT = _env("PLACE_DATA_ROOT", os.path.join(REPO_ROOT, "data", "synth_tfx"))
# A configured DATA_ROOT holding a corpus is used as it is, SynthCXR or converted; the
# default one is the runner's own SynthCXR cache, regenerated when stale.
DATA_ROOT_CONFIGURED = "PLACE_DATA_ROOT" in os.environ
# With no data configured the local runner generates this many SynthCXR images.
SYNTHETIC_IMAGES = int(_env("PLACE_SYNTHETIC_IMAGES", "4000"))
SCHEMA_PATH = os.path.join(REPO_ROOT, "pipelines", "schema")
# The Trainer's run_fn as an import path: importable wherever the repo (or the component
# image's /app) is on the Python path, with no module-file packaging step.
TRAINER_RUN_FN = "pipelines.trainer_module.run_fn"

# Training settings passed to place_tf.train through the Trainer's custom_config: the
# same names as the CLI flags (place_tf/config.py). The quickstart's model
# (configs/quickstart.flags) on half its images and two thirds of its steps: long enough
# to learn, so that the default run is blessed against its random-init twin (README "TFX
# pipeline" has the measured probe AUROCs and duration); 60 steps of a 1-layer model on
# 600 images were not.
TRAINING = {
    "objective": _env("PLACE_OBJECTIVE", "place"),
    "image_size": 64,
    "max_length": 48,
    "image_encoder": "vit",
    "patch_size": 8,
    "vit_layers": 2,
    "vit_heads": 4,
    "vit_width": 128,
    "vit_mlp": 256,
    "text_layers": 2,
    "text_heads": 4,
    "text_width": 128,
    "text_mlp": 256,
    "embed_dim": 64,
    "num_queries": 8,
    "query_layers": 1,
    "query_heads": 4,
    "query_width": 128,
    "cce_decoder_layers": 1,
    "cce_decoder_width": 128,
    "num_prototypes": 64,
    "per_replica_batch": 32,
    "learning_rate": 3e-4,
    "warmup_steps": 20,
    "weight_decay": 0.05,
    "vocab_size": 1000,
}
# A JSON object in PLACE_TRAINING_JSON replaces these settings (tests, experiments).
if os.environ.get("PLACE_TRAINING_JSON"):
    TRAINING = json.loads(os.environ["PLACE_TRAINING_JSON"])
TRAIN_STEPS = int(_env("PLACE_TRAIN_STEPS", "1200"))
EVAL_STEPS = int(_env("PLACE_EVAL_STEPS", "5"))

# Blessing (PlaceEvaluator): on the held-out split the candidate's probe AUROC must beat
# its random-init twin's by min_gain_over_random_init, must not be worse than the latest
# blessed model's by more than max_regression, and must reach the absolute floors.
BLESSING = {
    "min_gain_over_random_init": float(_env("PLACE_MIN_GAIN_OVER_RANDOM_INIT", "0.02")),
    "min_probe_auroc": float(_env("PLACE_MIN_PROBE_AUROC", "0.5")),
    "min_retrieval_p_at_5": float(_env("PLACE_MIN_P_AT_5", "0.0")),
    "max_regression": float(_env("PLACE_MAX_REGRESSION", "0.02")),
}
# The corpus gate stops the pipeline when more than this fraction of examples is bad.
MAX_BAD_FRACTION = float(_env("PLACE_MAX_BAD_FRACTION", "0.0"))

# Beam: DirectRunner in multi-processing mode locally; Dataflow on GCP (see README).
BEAM_PIPELINE_ARGS = (
    ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
    if os.environ.get("PLACE_BEAM_IN_MEMORY")  # small corpora, tests: no worker start-up
    else ["--direct_running_mode=multi_processing", "--direct_num_workers=0"]
)
DATAFLOW_BEAM_PIPELINE_ARGS = [
    "--runner=DataflowRunner",
    "--project=" + _env("GOOGLE_CLOUD_PROJECT", "my-project"),
    "--region=" + _env("GOOGLE_CLOUD_REGION", "us-central1"),
    "--temp_location=" + _env("PLACE_GCS_TEMP", "gs://my-bucket/tmp"),
    "--experiments=use_runner_v2",
]
