"""The TFX pipeline end to end on a tiny SynthCXR corpus, with a real MLMD store.

1. The user path: `tfx pipeline create` + `tfx run create` (the TFX CLI) run every
   component; MLMD holds the artifacts and their lineage; the pushed, versioned SavedModel
   answers `serving_default`.
2. A corrupt corpus (empty reports, undecodable images) is stopped by the corpus gate
   before training, and nothing is pushed.
3. The Kubeflow V2 runner compiles a pipeline JSON with every component and our image.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from place_tf.config import TINY_MODEL_FIELDS

# TFX 1.21 needs glibc >= 2.39: `make test` runs these in the TFX environment.
pytestmark = pytest.mark.tfx

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_TRAINING = {
    "objective": "place",
    **TINY_MODEL_FIELDS,
    "per_replica_batch": 8,
    "learning_rate": 1e-3,
    "warmup_steps": 1,
    "vocab_size": 300,
    "jit_compile": False,
}
COMPONENTS = [
    "ImportExampleGen",
    "StatisticsGen",
    "ImportSchemaGen",
    "ExampleValidator",
    "CorpusGate",
    "Trainer",
    "latest_blessed_model_resolver",
    "PlaceEvaluator",
    "Pusher",
]


def _store(db_path):
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    cfg = metadata_store_pb2.ConnectionConfig()
    cfg.sqlite.filename_uri = db_path
    return metadata_store.MetadataStore(cfg)


def _pipeline_env(tmp_path, data_root):
    env = dict(os.environ)
    env.update(
        HOME=str(tmp_path / "home"),
        PLACE_TFX_ROOT=str(tmp_path / "tfx"),
        PLACE_DATA_ROOT=str(data_root),
        PLACE_TRAIN_STEPS="4",
        PLACE_EVAL_STEPS="1",
        PLACE_TRAINING_JSON=json.dumps(TINY_TRAINING),
        PLACE_BEAM_IN_MEMORY="1",
        # 4 steps on 120 images learn nothing: the probe AUROC on the ~12 test images is
        # chance, above or below 0.5 or the random-init twin's by luck. The first run is
        # about the pipeline's mechanics (blessing recorded, model pushed), so it accepts
        # any candidate; test_blessing_reasons covers the thresholds.
        PLACE_MIN_PROBE_AUROC="0.0",
        PLACE_MIN_GAIN_OVER_RANDOM_INIT="-1.0",
        PYTHONPATH=REPO,
    )
    os.makedirs(env["HOME"], exist_ok=True)
    return env


def _run_local_runner(env) -> subprocess.CompletedProcess:
    """`python pipelines/local_runner.py` (LocalDagRunner in one process)."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "pipelines", "local_runner.py")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
    )


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from place_tf.data import synthetic

    out = tmp_path_factory.mktemp("synth") / "corpus"
    synthetic.generate_corpus(str(out), 120, image_size=32, seed=3, num_shards=2, workers=1)
    return out


@pytest.mark.slow
def test_tfx_cli_runs_pipeline_and_pushes_a_servable_model(tmp_path, tiny_corpus):
    env = _pipeline_env(tmp_path, tiny_corpus)
    tfx_bin = os.path.join(os.path.dirname(sys.executable), "tfx")
    runner = os.path.join(REPO, "pipelines", "local_runner.py")
    for cmd in (
        [tfx_bin, "pipeline", "create", f"--pipeline_path={runner}", "--engine=local"],
        [tfx_bin, "run", "create", "--pipeline_name=place", "--engine=local"],
    ):
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    store = _store(str(tmp_path / "tfx" / "metadata" / "place" / "metadata.sqlite"))
    from ml_metadata.proto import metadata_store_pb2

    execs = store.get_executions()
    states = {
        store.get_execution_types_by_id([e.type_id])[0].name: e.last_known_state for e in execs
    }
    done = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)
    ran = [n for n, s in states.items() if s in done]
    for comp in ("ImportExampleGen", "StatisticsGen", "ExampleValidator", "Trainer", "Pusher"):
        assert any(comp in n for n in ran), (comp, states)
    assert any("CorpusGate" in n for n in ran) and any("PlaceEvaluator" in n for n in ran)

    # Artifacts of every kind, and the lineage Examples -> Trainer -> Model -> Pusher.
    for t in (
        "Examples",
        "ExampleStatistics",
        "Schema",
        "ExampleAnomalies",
        "Model",
        "ModelBlessing",
        "ModelEvaluation",
        "PushedModel",
        "place.CorpusReport",
    ):
        assert store.get_artifacts_by_type(t), t
    model = store.get_artifacts_by_type("Model")[0]
    events = store.get_events_by_artifact_ids([model.id])
    producer = [e.execution_id for e in events if e.type == e.OUTPUT][0]
    inputs = [
        e.artifact_id for e in store.get_events_by_execution_ids([producer]) if e.type == e.INPUT
    ]
    input_types = {
        store.get_artifact_types_by_id([a.type_id])[0].name
        for a in store.get_artifacts_by_id(inputs)
    }
    assert "Examples" in input_types
    blessing = store.get_artifacts_by_type("ModelBlessing")[0]
    assert blessing.custom_properties["blessed"].int_value == 1
    assert blessing.custom_properties["current_model_id"].int_value == model.id

    # A versioned SavedModel under the serving base dir, answering serving_default.
    serving = tmp_path / "tfx" / "serving_model" / "place"
    versions = [d for d in os.listdir(serving) if d.isdigit()]
    assert len(versions) == 1
    import tensorflow as tf
    import tensorflow_text  # noqa: F401

    from place_tf.data import synthetic

    img = synthetic.render_example(0, seed=3, image_size=32)[0]
    png = tf.io.encode_png(img[..., None]).numpy()
    sm = tf.saved_model.load(str(serving / versions[0]))
    out = sm.signatures["serving_default"](images=tf.constant([png, png]))
    emb = out["image_embedding"].numpy()
    assert emb.shape == (2, TINY_TRAINING["embed_dim"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    # The evaluator scored the candidate against its random-init twin, exported beside it.
    evaluation = store.get_artifacts_by_type("ModelEvaluation")[0]
    report = json.loads(open(os.path.join(evaluation.uri, "evaluation.json")).read())
    assert report["blessed"] and report["reasons"] == []
    assert report["random_init"]["num_test"] == report["candidate"]["num_test"] > 0
    assert os.path.isfile(os.path.join(model.uri, "Format-RandomInit", "saved_model.pb"))

    # Second run, same pipeline and store, now requiring the candidate to beat its
    # random-init twin by more than an AUROC can: NOT_BLESSED, and nothing new is pushed.
    env["PLACE_MIN_GAIN_OVER_RANDOM_INIT"] = "1.0"
    proc = _run_local_runner(env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    blessings = sorted(store.get_artifacts_by_type("ModelBlessing"), key=lambda a: a.id)
    assert [b.custom_properties["blessed"].int_value for b in blessings] == [1, 0]
    evaluation = max(store.get_artifacts_by_type("ModelEvaluation"), key=lambda a: a.id)
    report = json.loads(open(os.path.join(evaluation.uri, "evaluation.json")).read())
    assert not report["blessed"]
    assert any("does not beat its random-init twin's" in r for r in report["reasons"])
    assert [d for d in os.listdir(serving) if d.isdigit()] == versions
    pushes = sorted(store.get_artifacts_by_type("PushedModel"), key=lambda a: a.id)
    assert [p.custom_properties["pushed"].int_value for p in pushes] == [1, 0]


def test_local_runner_keeps_a_configured_corpus_and_refreshes_its_own(
    tmp_path, tiny_corpus, monkeypatch
):
    """PLACE_DATA_ROOT set: the corpus there is used as it is (here a 120-image SynthCXR
    at 32 px, not what the runner would generate). Unset: the runner's own cache is
    generated at the stored size and regenerated when the settings change."""
    import json as json_lib

    sys.path.insert(0, REPO)
    from pipelines import configs, local_runner
    from place_tf.data import synthetic

    mpath = os.path.join(str(tiny_corpus), "manifest.json")
    before = os.stat(mpath).st_mtime_ns
    monkeypatch.setattr(configs, "DATA_ROOT", str(tiny_corpus))
    monkeypatch.setattr(configs, "DATA_ROOT_CONFIGURED", True)
    local_runner.ensure_data()
    assert os.stat(mpath).st_mtime_ns == before
    assert json_lib.load(open(mpath))["generator"]["num_images"] == 120

    own = str(tmp_path / "synth_tfx")
    monkeypatch.setattr(configs, "DATA_ROOT", own)
    monkeypatch.setattr(configs, "DATA_ROOT_CONFIGURED", False)
    monkeypatch.setattr(configs, "SYNTHETIC_IMAGES", 12)
    monkeypatch.setattr(configs, "TRAINING", {**configs.TRAINING, "image_size": 16})
    local_runner.ensure_data()
    assert synthetic.corpus_is_valid(own, 12, synthetic.STORED_IMAGE_SIZE, 0)
    monkeypatch.setattr(configs, "SYNTHETIC_IMAGES", 14)
    local_runner.ensure_data()
    assert synthetic.corpus_is_valid(own, 14, synthetic.STORED_IMAGE_SIZE, 0)


def test_blessing_reasons():
    """The evaluator's decision: absolute thresholds, regression against the baseline, NaN."""
    sys.path.insert(0, REPO)
    from pipelines.components.place_evaluator import blessing_reasons

    th = {"min_probe_auroc": 0.6, "min_retrieval_p_at_5": 0.2, "max_regression": 0.02}
    good = {"probe_auroc": 0.7, "retrieval_p_at_5": 0.3}
    assert blessing_reasons(good, None, **th) == []
    # Against the random-init twin: 0.7 beats 0.64 by more than 0.05, not 0.66.
    gain = {**th, "min_gain_over_random_init": 0.05}
    assert blessing_reasons(good, None, random_init={"probe_auroc": 0.64}, **gain) == []
    (r,) = blessing_reasons(good, None, random_init={"probe_auroc": 0.66}, **gain)
    assert r == "probe AUROC 0.700 does not beat its random-init twin's 0.660 by 0.05"
    nan_twin = {"probe_auroc": float("nan")}
    assert len(blessing_reasons(good, None, random_init=nan_twin, **gain)) == 1
    assert blessing_reasons(good, {"probe_auroc": 0.715}, **th) == []  # within tolerance
    (r,) = blessing_reasons(good, {"probe_auroc": 0.73}, **th)
    assert "below the blessed baseline's 0.730 by more than 0.02" in r
    r = blessing_reasons({"probe_auroc": 0.55, "retrieval_p_at_5": 0.1}, None, **th)
    assert r == ["probe AUROC 0.550 < 0.6", "retrieval P@5 0.100 < 0.2"]
    nan = {"probe_auroc": float("nan"), "retrieval_p_at_5": 0.3}
    assert len(blessing_reasons(nan, {"probe_auroc": 0.7}, **th)) == 2  # NaN never blessed
    assert blessing_reasons(nan, None, **{**th, "min_probe_auroc": 0.0}) != []


def _corrupt_corpus(src, dst):
    """A copy of the corpus where a third of the train records lose their report or image."""
    import tensorflow as tf

    from place_tf.data import manifest, schema

    os.makedirs(dst)
    m = manifest.read_manifest(str(src))
    for split, info in m["splits"].items():
        for name in info["shards"]:
            with tf.io.TFRecordWriter(os.path.join(dst, name)) as w:
                for i, s in enumerate(tf.data.TFRecordDataset(os.path.join(src, name))):
                    rec = schema.from_example(s.numpy())
                    if split == "train" and i % 3 == 0:
                        rec.findings, rec.impression = "", ""
                    if split == "train" and i % 3 == 1:
                        rec.image = b"\x89PNG\r\n\x1a\n" + b"\0" * 40  # undecodable
                    w.write(schema.to_example(rec).SerializeToString())
    with open(os.path.join(dst, manifest.MANIFEST_NAME), "w") as f:
        json.dump(m, f)


@pytest.mark.slow
def test_corrupt_corpus_is_stopped_before_training_and_nothing_is_pushed(tmp_path, tiny_corpus):
    bad = tmp_path / "bad_corpus"
    _corrupt_corpus(tiny_corpus, str(bad))
    env = _pipeline_env(tmp_path, bad)
    proc = _run_local_runner(env)
    assert proc.returncode != 0
    log = proc.stdout + proc.stderr
    assert "corpus rejected before training" in log
    assert "empty_report" in log and "bad_image" in log
    serving = tmp_path / "tfx" / "serving_model" / "place"
    assert not serving.exists() or not os.listdir(serving)
    store = _store(str(tmp_path / "tfx" / "metadata" / "place" / "metadata.sqlite"))
    assert not store.get_artifacts_by_type("Model")
    assert not store.get_artifacts_by_type("PushedModel")


@pytest.mark.slow
def test_kubeflow_v2_runner_compiles_pipeline_json(tmp_path):
    out = tmp_path / "place_pipeline.json"
    image = "example.registry/place-tf:test"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "pipelines", "kubeflow_v2_runner.py"),
            f"--output={out}",
            f"--image={image}",
            "--pipeline_root=gs://bucket/root",
            "--data_root=gs://bucket/data",
            "--trainer_gpus=2",
            "--trainer_accelerator=NVIDIA_L4",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = json.loads(out.read_text())
    pipeline_spec = spec.get("pipelineSpec", spec)
    tasks = pipeline_spec["root"]["dag"]["tasks"]
    for comp in COMPONENTS:
        # KFP v2 compiles the Resolver into its own task with a "-resolvelatest..." name.
        assert any(t == comp or t.startswith(comp) for t in tasks), (comp, sorted(tasks))
    executors = pipeline_spec["deploymentSpec"]["executors"]
    images = {e["container"]["image"] for e in executors.values() if "container" in e}
    assert images == {image}
    # The Trainer runs our thin run_fn, importable from the image's /app.
    assert "pipelines.trainer_module.run_fn" in json.dumps(tasks["Trainer"])
    # Only the Trainer's container asks for the accelerators.
    label = pipeline_spec["components"][tasks["Trainer"]["componentRef"]["name"]]["executorLabel"]
    accelerators = {
        k: e["container"].get("resources", {}).get("accelerator")
        for k, e in executors.items()
        if "container" in e
    }
    assert accelerators.pop(label) == {"type": "NVIDIA_L4", "count": "2"}
    assert set(accelerators.values()) == {None}
