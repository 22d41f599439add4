"""`create_pipeline(...)`: the PLACE pipeline definition shared by every runner.

ImportExampleGen ─┬─ StatisticsGen ─ ExampleValidator ─┐
                  │  ImportSchemaGen ──────────────────┤
                  │                                 CorpusGate
                  ├─────────────────────────────── Trainer (run_fn → place_tf.train)
                  │                                    │
Resolver (latest blessed model) ──────────────── PlaceEvaluator ─ Pusher
"""

from __future__ import annotations

from tfx import v1 as tfx

from pipelines.components.corpus_gate import CorpusGate
from pipelines.components.place_evaluator import PlaceEvaluator

SPLITS = ("train", "validate", "test")


def create_pipeline(
    pipeline_name: str,
    pipeline_root: str,
    data_root: str,
    schema_path: str,
    trainer_run_fn: str,
    serving_model_dir: str,
    training: dict,
    train_steps: int,
    eval_steps: int,
    blessing: dict,
    max_bad_fraction: float = 0.0,
    metadata_connection_config=None,
    beam_pipeline_args: list[str] | None = None,
    enable_cache: bool = True,
) -> tfx.dsl.Pipeline:
    # Our converters already split the corpus (by subject, so no patient crosses splits);
    # ImportExampleGen keeps those splits.
    input_config = tfx.proto.Input(
        splits=[tfx.proto.Input.Split(name=s, pattern=f"{s}-*.tfrecord") for s in SPLITS]
    )
    example_gen = tfx.components.ImportExampleGen(input_base=data_root, input_config=input_config)
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=f"{schema_path}/schema.pbtxt")
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    gate = CorpusGate(
        examples=example_gen.outputs["examples"],
        anomalies=example_validator.outputs["anomalies"],
        max_bad_fraction=max_bad_fraction,
    )
    trainer = tfx.components.Trainer(
        run_fn=trainer_run_fn,
        examples=example_gen.outputs["examples"],
        schema=schema_gen.outputs["schema"],
        train_args=tfx.proto.TrainArgs(splits=["train"], num_steps=train_steps),
        eval_args=tfx.proto.EvalArgs(splits=["validate"], num_steps=eval_steps),
        custom_config=dict(training),
    )
    trainer.add_upstream_node(gate)  # nothing trains on a rejected corpus
    model_resolver = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        model_blessing=tfx.dsl.Channel(type=tfx.types.standard_artifacts.ModelBlessing),
    ).with_id("latest_blessed_model_resolver")
    evaluator = PlaceEvaluator(
        model=trainer.outputs["model"],
        examples=example_gen.outputs["examples"],
        baseline_model=model_resolver.outputs["model"],
        min_probe_auroc=float(blessing["min_probe_auroc"]),
        min_retrieval_p_at_5=float(blessing["min_retrieval_p_at_5"]),
        max_regression=float(blessing["max_regression"]),
        min_gain_over_random_init=float(blessing["min_gain_over_random_init"]),
    )
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        model_blessing=evaluator.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=serving_model_dir)
        ),
    )
    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name,
        pipeline_root=pipeline_root,
        components=[
            example_gen,
            statistics_gen,
            schema_gen,
            example_validator,
            gate,
            trainer,
            model_resolver,
            evaluator,
            pusher,
        ],
        enable_cache=enable_cache,
        metadata_connection_config=metadata_connection_config,
        beam_pipeline_args=beam_pipeline_args or [],
    )
