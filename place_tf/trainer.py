"""The PLACE pre-training loop: tf.distribute + XLA, checkpoints that resume, TensorBoard.

Why a custom loop rather than `model.fit`: Keras' `jit_compile=True` fails under
MirroredStrategy (keras#19005) and the cross-replica contrastive losses need a
collective that XLA on CPU cannot compile. Here each replica runs
  tape { features = XLA(forward) ; losses(features) incl. all_gather } -> grads
and the optimizer (wrapped in LossScaleOptimizer) SUM-reduces gradients across replicas,
which is the convention of place_tf.losses (see losses/gather.py). With one replica the
whole forward+loss+backward is one XLA function.

Guarantees (each proved by a test, see README "Reliability"):
- a killed run resumes from its last checkpoint with optimizer state, step counter,
  learning-rate schedule and data-iterator position;
- SIGTERM writes a checkpoint before exiting;
- a step with a non-finite loss/gradient is skipped (never applied), counted, and the run
  stops with a clear error after `max_bad_steps` of them;
- bad records are skipped and counted by the input pipeline, reported in the summary;
- report text and ids are never logged or written to TensorBoard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time

from absl import logging

from place_tf import checkpointing, distribute
from place_tf import config as config_lib

CKPT_SUBDIR = "checkpoints"
SUMMARY_FILE = "summary.json"
RUN_INFO_FILE = "run_info.json"


# How each logged per-replica value combines across replicas. Contrastive terms are the
# full global-batch loss on every replica (mean); per-example terms are each replica's
# share local_sum / global_batch (sum); see place_tf/losses/gather.py.
_REDUCTION = {"cce": "sum", "cta": "sum", "pcma_slot": "sum"}


def combine_logs(logs: dict, objective) -> dict:
    """Recompute the mixed terms (pcma, total loss) from the replica-reduced parts."""
    out = dict(logs)
    if "pcma_inter" in out and "pcma_slot" in out:
        out["pcma"] = 0.5 * (out["pcma_inter"] + out["pcma_slot"])
    weights = {
        "ita": objective.lambda_ita,
        "pcma": objective.lambda_pcma,
        "cce": objective.lambda_cce,
        "cta": objective.lambda_cta,
        "cpa": objective.lambda_cpa,
    }
    terms = [w * out[k] for k, w in weights.items() if w and k in out]
    if terms:
        out["loss"] = sum(terms[1:], terms[0])
    return out


class NonFiniteLossError(RuntimeError):
    """Raised when too many steps produced NaN/Inf losses or gradients."""


class _TerminationFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def install(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. inside a TFX executor thread)
                pass

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def warmup_cosine(base_lr: float, total_steps: int, warmup_steps: int):
    """Keras schedule: linear warm-up then cosine decay to 0 (a function of the step)."""
    import keras

    decay_steps = max(1, total_steps - warmup_steps)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else base_lr,
        decay_steps=decay_steps,
        warmup_target=base_lr if warmup_steps else None,
        warmup_steps=warmup_steps,
        alpha=0.0,
    )


def _git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(os.path.abspath(__file__)),
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclasses.dataclass
class Configs:
    data: config_lib.DataConfig
    model: config_lib.ModelConfig
    objective: config_lib.ObjectiveConfig
    train: config_lib.TrainConfig


class Trainer:
    """Builds data, model, optimizer and checkpointing from Configs; `run()` trains."""

    def __init__(self, cfg: Configs):
        self.cfg = cfg
        self.flag = _TerminationFlag()

    # ---------------------------------------------------------------- setup
    def _setup_determinism(self):
        import keras
        import tensorflow as tf

        t = self.cfg.train
        keras.utils.set_random_seed(t.seed)
        if t.deterministic:
            tf.config.experimental.enable_op_determinism()

    def _tokenizer(self):
        from place_tf.data import tokenizer as tok

        d = self.cfg.data
        vocab = d.vocab_file or os.path.join(d.corpus_dir, "vocab.txt")
        return tok.ReportTokenizer(tok.load_vocabulary(vocab), max_length=d.max_length)

    def _train_source(self):
        """A corpus directory (with manifest) or the expanded --train_files globs."""
        import tensorflow as tf

        d = self.cfg.data
        if not d.train_files:
            return d.corpus_dir
        files = sorted(f for g in d.train_files.split(",") for f in tf.io.gfile.glob(g.strip()))
        if not files:
            raise FileNotFoundError(f"--train_files={d.train_files!r} matches no file")
        return files

    def _dataset_fn(self, tokenizer, global_batch: int):
        import tensorflow as tf

        from place_tf.data import pipeline

        d, t = self.cfg.data, self.cfg.train

        # The skip counters are updated inside the pipeline (stateful ops); they are
        # checkpointed separately, so iterator checkpoints ignore that external state.
        options = tf.data.Options()
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE

        def fn(input_context):
            return pipeline.make_dataset(
                self._train_source(),
                "train",
                tokenizer,
                batch_size=global_batch,
                image_size=d.image_size,
                training=True,
                augment=d.augment,
                deterministic=d.deterministic or t.deterministic,
                seed=t.seed,
                input_context=input_context,
                repeat=True,
                skip_counter=self.skip_counter,
            ).with_options(options)

        return fn

    def _steps(self, num_train_examples: int, global_batch: int) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        per_epoch = t.steps_per_epoch or max(1, num_train_examples // global_batch)
        return per_epoch * t.epochs

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        import keras
        import tensorflow as tf

        from place_tf.data import manifest as manifest_lib
        from place_tf.data import pipeline
        from place_tf.models.place_model import PLACEModel

        c = self.cfg
        t = c.train
        os.makedirs(t.model_dir, exist_ok=True)
        # The strategy first: splitting the CPU into logical devices must precede any op.
        strategy = distribute.make_strategy(t.strategy, t.num_cpu_devices)
        self._setup_determinism()
        keras.mixed_precision.set_global_policy(t.mixed_precision)
        replicas = strategy.num_replicas_in_sync
        global_batch = t.per_replica_batch * replicas
        chief = distribute.is_chief(strategy)

        if c.data.train_files:
            if not t.max_steps:
                raise ValueError("--train_files needs --max_steps (the corpus size is unknown)")
            corpus = {"source": "train_files", "splits": {}}
            num_train = 0
        else:
            corpus = manifest_lib.read_manifest(c.data.corpus_dir)
            num_train = int(corpus["splits"]["train"]["examples"])
        total_steps = self._steps(num_train, global_batch)
        tokenizer = self._tokenizer()
        model_cfg = dataclasses.replace(
            c.model, vocab_size=tokenizer.vocabulary_size, max_length=c.data.max_length
        )
        self._write_run_info(corpus, model_cfg, replicas, chief)

        self.skip_counter = pipeline.SkipCounter()  # host variables, outside the strategy
        with strategy.scope():
            model = PLACEModel(model_cfg, c.objective)
            dummy = _dummy_batch(model_cfg, c.data.max_length)
            model(dummy, training=False)
            inner = keras.optimizers.AdamW(
                learning_rate=warmup_cosine(t.learning_rate, total_steps, t.warmup_steps),
                weight_decay=t.weight_decay,
                beta_1=t.beta_1,
                beta_2=t.beta_2,
                global_clipnorm=None,
            )
            # Norm and bias weights are not decayed (as MGCA/open_clip).
            inner.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "norm"])
            # LossScaleOptimizer skips steps whose gradients are not finite (on every
            # replica alike) and does dynamic loss scaling for mixed_float16; in fp32/bf16
            # it keeps a scale of 1 (no growth).
            dynamic = t.mixed_precision == "mixed_float16"
            optimizer = keras.optimizers.LossScaleOptimizer(
                inner,
                initial_scale=2.0**15 if dynamic else 1.0,
                dynamic_growth_steps=2000 if dynamic else 2**31 - 1,
            )
            optimizer.build(model.trainable_variables)  # before tracing (keras#23085)
            bad_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_steps")

        dist_ds = strategy.distribute_datasets_from_function(
            self._dataset_fn(tokenizer, global_batch)
        )
        iterator = iter(dist_ds)
        # Keyed by variable path: tf.train.Checkpoint(model=...) misses Keras 3 layers
        # held in lists (see place_tf/checkpointing.py).
        ckpt = checkpointing.make_checkpoint(
            model,
            optimizer,
            iterator=iterator,
            bad_steps=bad_steps,
            skips=self.skip_counter.checkpointable(),
        )
        ckpt_dir = os.path.join(t.model_dir, CKPT_SUBDIR)
        if not chief:  # non-chief workers write to a scratch dir (multi-worker protocol)
            ckpt_dir = os.path.join(t.model_dir, f"tmp_worker_{strategy.cluster_resolver.task_id}")
        manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=t.keep_checkpoints)
        restored = checkpointing.restore_latest_good(manager, ckpt)
        start_step = int(optimizer.iterations.numpy())
        if restored:
            logging.info("resumed from %s at step %d", restored, start_step)

        train_step = self._make_train_step(strategy, model, optimizer, bad_steps, replicas)
        writer = (
            tf.summary.create_file_writer(os.path.join(t.model_dir, "tensorboard"))
            if chief
            else tf.summary.create_noop_writer()
        )
        progbar = keras.utils.Progbar(total_steps, stateful_metrics=None, unit_name="step")
        self.flag.install()
        t0 = t_after_first = time.time()
        last_log_time, last_log_step = t0, start_step
        logs_np: dict = {}
        step = start_step
        interrupted = False
        try:
            while step < total_steps:
                batch = next(iterator)
                logs = train_step(batch)
                step += 1
                if step == start_step + 1:
                    t_after_first = time.time()  # excludes tracing/XLA compilation
                logs_np = {k: float(v.numpy()) for k, v in logs.items()}
                if int(bad_steps.numpy()) > t.max_bad_steps:
                    manager.save(checkpoint_number=step)
                    raise NonFiniteLossError(
                        f"{int(bad_steps.numpy())} training steps had a non-finite loss or "
                        f"gradient (limit max_bad_steps={t.max_bad_steps}); stopping at step "
                        f"{step}. Lower the learning rate or check the data; the last "
                        f"checkpoint is in {ckpt_dir}"
                    )
                if step % t.log_every == 0 or step == total_steps:
                    now = time.time()
                    ips = (step - last_log_step) * global_batch / max(now - last_log_time, 1e-9)
                    last_log_time, last_log_step = now, step
                    with writer.as_default(step=step):
                        for k, v in logs_np.items():
                            tf.summary.scalar(f"train/{k}", v)
                        tf.summary.scalar(
                            "train/learning_rate",
                            float(inner.learning_rate.numpy())
                            if hasattr(inner.learning_rate, "numpy")
                            else float(keras.ops.convert_to_numpy(inner.learning_rate)),
                        )
                        tf.summary.scalar("train/images_per_second", ips)
                        tf.summary.scalar("train/bad_steps", int(bad_steps.numpy()))
                if chief:
                    progbar.update(
                        step,
                        [
                            (k, v)
                            for k, v in logs_np.items()
                            if k in ("loss", "ita", "pcma", "cce", "cta", "cpa")
                        ],
                    )
                if step % t.checkpoint_every == 0:
                    manager.save(checkpoint_number=step)
                if self.flag.signum is not None:
                    manager.save(checkpoint_number=step)
                    interrupted = True
                    logging.warning(
                        "signal %d received: checkpoint written at step %d", self.flag.signum, step
                    )
                    break
        finally:
            self.flag.restore()
            writer.flush()
        if interrupted:
            sys.exit(128 + int(self.flag.signum))
        if not manager.latest_checkpoint or not manager.latest_checkpoint.endswith(f"-{step}"):
            manager.save(checkpoint_number=step)
        elapsed = time.time() - t0
        summary = {
            "steps": step,
            "resumed_from_step": start_step,
            "global_batch": global_batch,
            "replicas": replicas,
            "wall_seconds": round(elapsed, 2),
            "images_per_second": round(
                (step - start_step - 1) * global_batch / max(time.time() - t_after_first, 1e-9), 3
            )
            if step - start_step > 1
            else None,
            "final_losses": logs_np,
            "bad_steps": int(bad_steps.numpy()),
            "skipped_records": self.skip_counter.as_dict(),
            "checkpoint": manager.latest_checkpoint,
        }
        if chief:
            model_path = os.path.join(t.model_dir, "model.keras")
            model.save(model_path)
            summary["model"] = model_path
            self._write_images(writer, model, tokenizer, step)
        self.model, self.tokenizer = model, tokenizer
        return summary

    # ---------------------------------------------------------------- step
    def _make_train_step(self, strategy, model, optimizer, bad_steps, replicas):
        import tensorflow as tf

        t = self.cfg.train
        # Only the variables the objective uses (ConVIRT leaves the PCMA branch unused, and
        # a None gradient must not reach the cross-replica reduction).
        variables = model.trainable_loss_variables

        def loss_and_grads(batch):
            with tf.GradientTape() as tape:
                total, logs = model.compute_losses(batch, training=True)
                scaled = optimizer.scale_loss(total)
            grads = tape.gradient(scaled, variables)
            return total, logs, grads

        if replicas == 1:
            # One device: forward, losses and backward in one XLA cluster.
            fused = tf.function(loss_and_grads, jit_compile=t.jit_compile, reduce_retracing=True)

            def replica_step(batch):
                total, logs, grads = fused(batch)
                return self._apply(total, logs, grads, optimizer, bad_steps, variables)
        elif t.jit_compile and hasattr(model, "forward_features"):
            # Several replicas: the encoders (and per-example losses) run under XLA; the
            # cross-replica gather of the contrastive losses runs outside it (XLA:CPU has
            # no collectives, and merge_call cannot run inside a jit function).
            forward = tf.function(model.forward_features, jit_compile=True)

            def replica_step(batch):
                with tf.GradientTape() as tape:
                    feats = forward(batch, training=True)
                    total, logs = model.losses_from_features(feats)
                    scaled = optimizer.scale_loss(total)
                grads = tape.gradient(scaled, variables)
                return self._apply(total, logs, grads, optimizer, bad_steps, variables)
        else:
            if t.jit_compile:
                logging.warning(
                    "this model has no forward_features: XLA is off with %d replicas", replicas
                )

            def replica_step(batch):
                total, logs, grads = loss_and_grads(batch)
                return self._apply(total, logs, grads, optimizer, bad_steps, variables)

        @tf.function
        def step(dist_batch):
            per_replica = strategy.run(replica_step, args=(dist_batch,))
            logs = {
                k: strategy.reduce(_REDUCTION.get(k, "mean"), v, axis=None)
                for k, v in per_replica.items()
            }
            bad_steps.assign_add(tf.cast(logs["skipped_step"] > 0, tf.int64))
            if self.cfg.objective.cce_teacher == "ema" and "cce" in logs:
                model.update_teacher()  # cross-replica context: every copy moves alike
            return combine_logs(logs, self.cfg.objective)

        return step

    @staticmethod
    def _apply(total, logs, grads, optimizer, bad_steps, variables):
        import tensorflow as tf

        ctx = tf.distribute.get_replica_context()
        finite = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
        )
        finite = tf.logical_and(finite, tf.math.is_finite(total))
        # Same decision on every replica: a single replica's NaN skips the step everywhere.
        not_finite = ctx.all_reduce("sum", 1.0 - tf.cast(finite, tf.float32))
        all_finite = not_finite < 0.5
        grads = [
            g if g is None else tf.where(all_finite, g, tf.fill(tf.shape(g), float("nan")))
            for g in grads
        ]
        optimizer.apply(grads, variables)

        out = {"loss": total}
        out.update({k: v for k, v in logs.items() if k != "loss"})
        out["skipped_step"] = 1.0 - tf.cast(all_finite, tf.float32)
        return out

    # ---------------------------------------------------------------- outputs
    def _write_run_info(self, corpus, model_cfg, replicas, chief):
        if not chief:
            return
        import keras
        import tensorflow as tf

        info = {
            "configs": json.loads(
                config_lib.dumps(
                    data=self.cfg.data,
                    model=model_cfg,
                    objective=self.cfg.objective,
                    train=self.cfg.train,
                )
            ),
            "versions": {
                "python": platform.python_version(),
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
            },
            "git_revision": _git_revision(),
            "replicas": replicas,
            "data_manifest": {
                "schema_version": corpus.get("schema_version"),
                "source": corpus.get("source"),
                "splits": {k: v.get("examples") for k, v in corpus.get("splits", {}).items()},
                "shard_checksums": corpus.get("shard_checksums", {}),
            },
            "argv": sys.argv,
        }
        path = os.path.join(self.cfg.train.model_dir, RUN_INFO_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)

    def _write_images(self, writer, model, tokenizer, step, num_images: int = 4):
        """Pathology-query attention maps over a few validation X-rays (images only)."""
        import numpy as np
        import tensorflow as tf

        from place_tf.data import pipeline

        try:
            ds = pipeline.make_eval_dataset(
                self.cfg.data.corpus_dir,
                "validate",
                tokenizer,
                batch_size=num_images,
                image_size=self.cfg.data.image_size,
            )
            batch = next(iter(ds))
        except (StopIteration, ValueError, FileNotFoundError):
            return
        out = model.encode_image(batch["image"], training=False)
        maps = out["attention_maps"].numpy()  # [B, K, h, w]
        imgs = (batch["image"].numpy() + 1.0) / 2.0
        b, k, h, w = maps.shape
        maps = maps / np.maximum(maps.max(axis=(2, 3), keepdims=True), 1e-9)
        grid = maps.transpose(0, 2, 1, 3).reshape(b, h, k * w, 1)
        with writer.as_default(step=step):
            tf.summary.image("val/xray", imgs, max_outputs=num_images)
            tf.summary.image("val/query_attention", grid, max_outputs=num_images)


def _dummy_batch(model_cfg, max_length):
    import tensorflow as tf

    s = model_cfg.image_size
    return {
        "image": tf.zeros([1, s, s, 1]),
        "token_ids": tf.zeros([1, max_length], tf.int32),
        "padding_mask": tf.ones([1, max_length], tf.bool),
    }
