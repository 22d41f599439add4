"""Compile the PLACE pipeline for Kubeflow Pipelines v2 / Vertex AI Pipelines.

    tools/run python pipelines/kubeflow_v2_runner.py --output place_pipeline.json \
        --image us-docker.pkg.dev/<project>/<repo>/place-tf:<tag> \
        --pipeline_root gs://<bucket>/tfx --data_root gs://<bucket>/data/mimic

The component image is built from pipelines/Dockerfile on the same requirements.lock.
Data processing (StatisticsGen, ExampleGen, ...) runs on Dataflow with
configs.DATAFLOW_BEAM_PIPELINE_ARGS when --dataflow is given; submit the JSON with the
Vertex AI SDK (aiplatform.PipelineJob(template_path=...).submit()) or the KFP UI/client.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfx import v1 as tfx  # noqa: E402

from pipelines import configs  # noqa: E402
from pipelines.place_pipeline import create_pipeline  # noqa: E402

DEFAULT_IMAGE = "gcr.io/my-project/place-tf:latest"
# Inside the image the repo lives at /app (see Dockerfile).
IMAGE_REPO_ROOT = "/app"


def compile_pipeline(
    output: str, image: str, pipeline_root: str, data_root: str, serving_dir: str, dataflow: bool
) -> str:
    pipeline = create_pipeline(
        pipeline_name=configs.PIPELINE_NAME,
        pipeline_root=pipeline_root,
        data_root=data_root,
        schema_path=f"{IMAGE_REPO_ROOT}/pipelines/schema",
        trainer_run_fn=configs.TRAINER_RUN_FN,
        serving_model_dir=serving_dir,
        training=configs.TRAINING,
        train_steps=configs.TRAIN_STEPS,
        eval_steps=configs.EVAL_STEPS,
        blessing=configs.BLESSING,
        max_bad_fraction=configs.MAX_BAD_FRACTION,
        beam_pipeline_args=configs.DATAFLOW_BEAM_PIPELINE_ARGS
        if dataflow
        else configs.BEAM_PIPELINE_ARGS,
    )
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(default_image=image),
        output_filename=output,
    )
    runner.run(pipeline, write_out=True)
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--output", default="place_pipeline.json")
    p.add_argument("--image", default=DEFAULT_IMAGE)
    p.add_argument("--pipeline_root", default="gs://my-bucket/tfx/place")
    p.add_argument("--data_root", default="gs://my-bucket/data/synth")
    p.add_argument("--serving_dir", default="gs://my-bucket/serving/place")
    p.add_argument("--dataflow", action="store_true")
    a = p.parse_args(argv)
    path = compile_pipeline(
        a.output, a.image, a.pipeline_root, a.data_root, a.serving_dir, a.dataflow
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
