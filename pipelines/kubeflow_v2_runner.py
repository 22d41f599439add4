"""Compile the PLACE pipeline for Kubeflow Pipelines v2 / Vertex AI Pipelines.

    tools/run python pipelines/kubeflow_v2_runner.py --output place_pipeline.json \
        --image us-docker.pkg.dev/<project>/<repo>/place-tf:<tag> \
        --pipeline_root gs://<bucket>/tfx --data_root gs://<bucket>/data/mimic

The component image is built from pipelines/Dockerfile (requirements/tfx.lock), or for a
Trainer on GPUs with `--build-arg LOCK=tfx-gpu.lock` (TensorFlow's CUDA wheels; it runs
every component too): `--trainer_gpus 1 --trainer_accelerator NVIDIA_L4` requests the
accelerator for the Trainer's container (a KFP v2 ResourceSpec; Vertex AI accelerator type
names such as NVIDIA_L4, NVIDIA_TESLA_T4, NVIDIA_TESLA_A100, NVIDIA_H100_80GB).
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


def trainer_resources(
    gpus: int = 0, accelerator: str = "", cpu: float = 0.0, memory_gb: float = 0.0
):
    """The Trainer's KFP v2 ResourceSpec (None when nothing is requested)."""
    from kfp.pipeline_spec import pipeline_spec_pb2

    if gpus < 0 or (gpus and not accelerator) or (accelerator and not gpus):
        raise ValueError(
            f"--trainer_gpus ({gpus}) and --trainer_accelerator ({accelerator!r}) go together"
        )
    if not (gpus or cpu or memory_gb):
        return None
    spec = pipeline_spec_pb2.PipelineDeploymentConfig.PipelineContainerSpec.ResourceSpec(
        cpu_limit=cpu, memory_limit=memory_gb
    )
    if gpus:
        spec.accelerator.type = accelerator
        spec.accelerator.count = gpus
    return spec


def compile_pipeline(
    output: str,
    image: str,
    pipeline_root: str,
    data_root: str,
    serving_dir: str,
    dataflow: bool,
    resources=None,
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
    if resources is not None:
        trainer = next(c for c in pipeline.components if c.id == "Trainer")
        trainer.with_platform_config(resources)
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
    p.add_argument("--trainer_gpus", type=int, default=0, help="GPUs for the Trainer")
    p.add_argument("--trainer_accelerator", default="", help="e.g. NVIDIA_L4, NVIDIA_TESLA_T4")
    p.add_argument("--trainer_cpu", type=float, default=0.0, help="vCPU limit (0: default)")
    p.add_argument("--trainer_memory_gb", type=float, default=0.0, help="RAM limit in GB")
    a = p.parse_args(argv)
    try:
        resources = trainer_resources(
            a.trainer_gpus, a.trainer_accelerator, a.trainer_cpu, a.trainer_memory_gb
        )
    except ValueError as e:
        p.error(str(e))
    path = compile_pipeline(
        a.output, a.image, a.pipeline_root, a.data_root, a.serving_dir, a.dataflow, resources
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
