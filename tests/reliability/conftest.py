"""Fixtures of the reliability tests: one tiny SynthCXR corpus per session, the
uninterrupted reference runs and the fault-injected pre-emption chain (shared by the
pre-emption, checkpoint-integrity and reproducibility tests), and a guard that restores the
process-global TF/Keras state that an in-process training run changes."""

from __future__ import annotations

import os

import pytest
import reliability_util as U

# The chain's training settings: 6 steps, a checkpoint every 2, 2 kept, a warm-up so the
# learning-rate schedule matters, --deterministic so runs can be compared bit for bit.
CHAIN_FLAGS = [
    "--deterministic",
    "--objective=convirt",
    "--max_steps=6",
    "--checkpoint_every=2",
    "--keep_checkpoints=2",
    "--log_every=1",
    "--learning_rate=1e-3",
    "--warmup_steps=2",
]
TIMEOUT = 1200  # seconds per training process (the CI machine may be loaded)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """SynthCXR, 64 images of 32 px (train/validate/test, vocab.txt, manifest)."""
    from place_tf.data import synthetic

    out = str(tmp_path_factory.mktemp("corpus") / "synth")
    synthetic.generate_corpus(
        out, U.CORPUS_IMAGES, image_size=U.CORPUS_IMAGE_SIZE, seed=0, num_shards=4, workers=1
    )
    return out


class _Background:
    """A training subprocess started now and awaited when a test needs its result."""

    def __init__(self, cmd, log, env, model_dir):
        self.model_dir, self.log = model_dir, log
        self._proc = U.start(cmd, log, env)
        self._rc = None

    def result(self) -> int:
        if self._rc is None:
            self._rc = U.wait(self._proc, TIMEOUT)
        return self._rc

    def ensure_ok(self) -> None:
        rc = self.result()
        assert rc == 0, f"training run failed (rc={rc}); log:\n{U.log_text(self.log)[-4000:]}"


@pytest.fixture(scope="session")
def reference_runs(tiny_corpus, tmp_path_factory):
    """Two uninterrupted runs of the chain's command (started in the background)."""
    base = tmp_path_factory.mktemp("reference")
    runs = {}
    for name in ("R1", "R2"):
        model_dir = str(base / name)
        cmd = U.train_command(tiny_corpus, model_dir, *CHAIN_FLAGS)
        runs[name] = _Background(cmd, str(base / f"{name}.log"), U.child_env(), model_dir)
    yield runs
    for r in runs.values():
        r.result()


@pytest.fixture(scope="session")
def preemption_chain(tiny_corpus, reference_runs, tmp_path_factory):
    """One run interrupted three ways, then finished, all with the same command:

    P1  paused after step 3 (ckpt-2 is the latest) and SIGKILLed;
    P2  restarted: resumes from ckpt-2, paused after step 3 and SIGTERMed -> ckpt-3, rc 143;
    P3  restarted: resumes from ckpt-3, SIGKILLed inside the save of ckpt-4, after its files
        are written and before the `checkpoint` state names it; then ckpt-3's data file is
        truncated to half (a latest checkpoint a crash left half-written);
    P4  restarted: ckpt-3 fails to restore, ckpt-2 is used; trains steps 3-6 to the end.
    Returns what each phase left behind; the tests assert on it.
    """
    base = tmp_path_factory.mktemp("chain")
    model_dir = str(base / "run")
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    cmd = U.train_command(tiny_corpus, model_dir, *CHAIN_FLAGS)
    env = U.child_env()
    out = {"model_dir": model_dir, "ckpt_dir": ckpt_dir, "logs": {}}

    def log(name):
        out["logs"][name] = str(base / f"{name}.log")
        return out["logs"][name]

    out["P1_rc"] = U.kill_at_pause(cmd, log("P1"), env, 3, U.SIGKILL, TIMEOUT)
    out["P1_state"] = U.checkpoint_state(ckpt_dir)

    out["P2_rc"] = U.kill_at_pause(cmd, log("P2"), env, 3, U.SIGTERM, TIMEOUT)
    out["P2_state"] = U.checkpoint_state(ckpt_dir)
    out["P2_ckpt3"] = U.read_checkpoint(os.path.join(ckpt_dir, "ckpt-3"))

    out["P3_rc"] = U.run(cmd, log("P3"), dict(env, PLACE_FAULT_KILL_IN_SAVE="4"), TIMEOUT)
    out["P3_state"] = U.checkpoint_state(ckpt_dir)
    out["P3_files"] = sorted(os.listdir(ckpt_dir))
    data3 = os.path.join(ckpt_dir, "ckpt-3.data-00000-of-00001")
    size = os.path.getsize(data3)
    with open(data3, "r+b") as f:
        f.truncate(size // 2)

    out["P4_rc"] = U.run(cmd, log("P4"), env, TIMEOUT)
    out["P4_state"] = U.checkpoint_state(ckpt_dir)
    out["P4_files"] = sorted(os.listdir(ckpt_dir))
    summary = os.path.join(model_dir, "summary.json")
    out["P4_summary"] = U.read_json(summary) if os.path.exists(summary) else None
    return out


@pytest.fixture
def global_tf_state():
    """Restore what Trainer.run sets process-wide (precision policy, op determinism)."""
    import keras
    from tensorflow.python.framework import config as tf_config

    was_deterministic = tf_config.is_op_determinism_enabled()
    policy = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(policy)
    if not was_deterministic:
        tf_config.disable_op_determinism()  # no public API to undo enable_op_determinism


@pytest.fixture(scope="session")
def canary_run(tiny_corpus, tmp_path_factory):
    """A corpus whose every report and id carries a canary (plus a few bad records that
    carry them too), trained on by the CLI at INFO logging with the SavedModel exported;
    stdout+stderr captured. Returns paths (the SavedModel is shared with the fuzz and
    resource-bound tests)."""
    import tensorflow as tf

    from place_tf.data import manifest as manifest_lib
    from place_tf.data import schema
    from place_tf.data import tokenizer as tok

    base = tmp_path_factory.mktemp("canary")
    corpus = str(base / "corpus")
    source = tf.data.TFRecordDataset(manifest_lib.split_files(tiny_corpus, "train"))
    records = [schema.from_example(bytes(r)) for r in source.take(32).as_numpy_iterator()]
    man = manifest_lib.Manifest(source="canary")
    writer = manifest_lib.ShardedWriter(corpus, man, {"train": 2, "validate": 1, "test": 1})
    texts = []
    for i, rec in enumerate(records):
        rec.subject_id = f"{U.CANARY_IDS['subject_id']}-{i:03d}"
        rec.study_id = f"{U.CANARY_IDS['study_id']}-{i:03d}"
        rec.image_id = f"{U.CANARY_IDS['image_id']}-{i:03d}"
        rec.findings = f"{rec.findings} Incidental {U.CANARY_REPORT} noted."
        rec.impression = f"{rec.impression} Compare {U.CANARY_REPORT}."
        rec.split = "train" if i < 24 else ("validate" if i < 28 else "test")
        serialized = schema.to_example(rec).SerializeToString()
        writer.write(rec.split, serialized)
        texts.append(schema.report_text(rec.findings, rec.impression))
        if i == 0:  # bad records carrying canaries: truncated proto, a label vector of
            # the wrong length (a parse error of a valid proto), empty report, no image
            writer.write("train", serialized[: len(serialized) // 2])
            short = schema.to_example(rec)
            short.features.feature[schema.CHEXPERT].int64_list.value.pop()
            writer.write("train", short.SerializeToString())
            rec.findings, rec.impression = "", ""
            writer.write("train", schema.to_example(rec).SerializeToString())
            rec.findings, rec.image = f"{U.CANARY_REPORT}.", b"GIF89a" + U.CANARY_REPORT.encode()
            writer.write("train", schema.to_example(rec).SerializeToString())
    writer.close()
    man.write(corpus)
    vocab = tok.learn_vocabulary(texts, 400, os.path.join(corpus, "vocab.txt"))

    model_dir = str(base / "run")
    log = str(base / "train.log")
    cmd = U.train_command(
        corpus,
        model_dir,
        "--max_steps=3",
        "--checkpoint_every=1",
        "--log_every=1",
        "--verbosity=0",  # INFO
        launcher=False,
    )
    cmd[cmd.index("--noexport")] = "--export"
    rc = U.run(cmd, log, U.child_env(TF_CPP_MIN_LOG_LEVEL="0"), TIMEOUT)
    assert rc == 0, U.log_text(log)[-4000:]
    return {
        "corpus": corpus,
        "model_dir": model_dir,
        "log": log,
        "export_dir": os.path.join(model_dir, "export", "1"),
        "vocab": vocab,
        "texts": texts,
    }
