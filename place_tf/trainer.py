"""The PLACE pre-training loop: tf.distribute + XLA, checkpoints that resume, TensorBoard.

Why a custom loop rather than `model.fit`: Keras' `jit_compile=True` fails under
MirroredStrategy (keras#19005) and the cross-replica contrastive losses need a
collective that XLA on CPU cannot compile. Here each replica runs
  tape { features = XLA(forward) ; losses(features) incl. all_gather } -> grads
and the optimizer (wrapped in LossScaleOptimizer) SUM-reduces gradients across replicas,
which is the convention of place_tf.losses (see losses/gather.py). With one replica the
whole forward+loss+backward is one XLA function.

Guarantees (each proved by a test, see README "Reliability"):
- a killed run resumes from its last checkpoint with optimizer state, step counter and
  learning-rate schedule; in --deterministic mode it also replays the input stream up to
  the step, so its weights equal an uninterrupted run's bit for bit (see `_dataset_fn`:
  the data iterator itself is never checkpointed, its state would hold training data);
- a truncated or half-written latest checkpoint is skipped for the previous good one;
- SIGTERM writes a checkpoint at the current step and exits with 128 + 15;
- multi-worker: every worker restores the chief's checkpoint (non-chief workers write to
  scratch directories), so a job restarted after losing a worker resumes at the chief's
  saved step;
- a step with a non-finite loss/gradient is skipped (never applied), counted, and the run
  stops with a clear error after `max_bad_steps` of them; with mixed_float16, a step whose
  scaled gradients overflow only halves the loss scale (counted as `overflow_steps`, not as
  a bad step, unless the scale is already <= 1);
- bad records are skipped and counted by the input pipeline, reported in the summary; a
  training shard that disappears mid-run stops the run with FileNotFoundError naming it;
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


_SHOWN = ("loss", "ita", "pcma", "cce", "cta", "cpa")


class NonFiniteLossError(RuntimeError):
    """Raised when too many steps produced NaN/Inf losses or gradients."""


def missing_inputs(files) -> list[str]:
    """The input files that no longer exist (checked when the input stream misbehaves)."""
    import tensorflow as tf

    return [f for f in files if not tf.io.gfile.exists(f)]


def raise_if_inputs_missing(files, ckpt_dir: str, cause: BaseException | None = None) -> None:
    """FileNotFoundError naming the training shards that disappeared during the run.

    The input pipeline skips unreadable shards as corrupt records (counted, pass after
    pass); the trainer calls this when that count grows or the input stream fails, so a
    vanished shard becomes an error instead of silently less data.
    """
    gone = missing_inputs(files)
    if gone:
        shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
        raise FileNotFoundError(
            f"{len(gone)} training input shard(s) disappeared during the run: {shown}. "
            f"Restore them (or fix the corpus) and restart: training resumes from the last "
            f"checkpoint in {ckpt_dir}"
        ) from cause


class _Checkpoints:
    """What restore_latest_good needs of a CheckpointManager: `checkpoints`, oldest first."""

    def __init__(self, checkpoints):
        self.checkpoints = list(checkpoints)


def readable_checkpoints(checkpoints) -> _Checkpoints:
    """The checkpoints up to the newest one whose every tensor reads back (CRC-checked).

    A crash (of the machine, not just the process) can leave the latest checkpoint listed
    but truncated; TF then fails in ways restore does not always report as OpError (a
    truncated object graph raises IndexError) or after assigning part of the variables.
    Reading it first, without assigning anything, skips it cleanly. Only checkpoints
    newer than the first readable one are read twice.
    """
    import tensorflow as tf

    checkpoints = list(checkpoints)
    while checkpoints:
        path = checkpoints[-1]
        try:
            reader = tf.train.load_checkpoint(path)
            for key in reader.get_variable_to_shape_map():
                reader.get_tensor(key)
            break
        except Exception as e:  # TF is not uniform: OpError, IndexError, ValueError, ...
            logging.warning(
                "checkpoint %s is unreadable or incomplete (%s: %s); trying an older one",
                path,
                type(e).__name__,
                str(e)[:200],
            )
            checkpoints.pop()
    return _Checkpoints(checkpoints)


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
    """HEAD's commit of the checkout holding this package ("" outside one).

    `git` when it is installed, else read from .git directly (the training image or the
    chroot may have no git binary, and run_info must still name the code revision).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return _read_git_head(here)


def _read_git_head(start: str) -> str:
    d = start
    while True:
        git = os.path.join(d, ".git")
        if os.path.exists(git):
            break
        parent = os.path.dirname(d)
        if parent == d:
            return ""
        d = parent
    try:
        if os.path.isfile(git):  # worktree / submodule: "gitdir: <path>"
            with open(git) as f:
                git = os.path.join(d, f.read().split(":", 1)[1].strip())
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref:"):
            return head  # detached HEAD
        ref = head.split(":", 1)[1].strip()
        common = git
        if os.path.exists(os.path.join(git, "commondir")):
            with open(os.path.join(git, "commondir")) as f:
                common = os.path.join(git, f.read().strip())
        for base in (git, common):
            path = os.path.join(base, ref)
            if os.path.exists(path):
                with open(path) as f:
                    return f.read().strip()
        with open(os.path.join(common, "packed-refs")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except (OSError, IndexError):
        pass
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

        return tok.report_tokenizer(self.cfg.data, self.cfg.model.text_init)

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

    def _dataset_fn(self, tokenizer, global_batch: int, start_step: int = 0):
        """Per-pipeline dataset function of a run that starts (or resumes) at `start_step`.

        Why the data iterator is not checkpointed: a tf.data iterator's saved state holds
        its shuffle/prefetch buffers, i.e. report text, images and ids; checkpoints must
        hold no training data (README "Reliability"); tf.distribute's multi-replica
        iterators cannot be checkpointed at all. Instead, on resume:
        - with --deterministic the stream is replayed up to the step (`skip`: exact, the
          same batches and augmentations as an uninterrupted run; it costs reading the
          skipped data again);
        - otherwise (tf.data is then not reproducible anyway) the stream is reseeded by the
          step, so a run pre-empted repeatedly does not keep restarting one shuffle order.
        Each input pipeline feeds num_replicas / num_input_pipelines batches per step.
        """
        from place_tf.data import pipeline

        d, t = self.cfg.data, self.cfg.train
        deterministic = d.deterministic or t.deterministic
        replay = start_step if deterministic else 0
        seed = t.seed if deterministic or not start_step else t.seed + 7919 * start_step

        def fn(input_context):
            ds = pipeline.make_dataset(
                self._train_source(),
                "train",
                tokenizer,
                batch_size=global_batch,
                image_size=d.image_size,
                training=True,
                augment=d.augment,
                deterministic=deterministic,
                seed=seed,
                input_context=input_context,
                repeat=True,
                skip_counter=self.skip_counter,
                frontal_only=d.frontal_only,
            )
            if replay:
                per_step = max(
                    1, input_context.num_replicas_in_sync // input_context.num_input_pipelines
                )
                ds = ds.skip(replay * per_step)
            return ds

        return fn

    def _steps(self, num_train_examples: int, global_batch: int) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        per_epoch = t.steps_per_epoch or max(1, num_train_examples // global_batch)
        return per_epoch * t.epochs

    # ---------------------------------------------------------------- run
    def build_model_and_optimizer(self, strategy, model_cfg, total_steps: int):
        """(model, optimizer, bad_steps, counters), built inside `strategy`'s scope, the
        optimizer built before any traced step (keras#23085). Also used by
        tools/benchmark.py, so the benchmark times exactly what training runs."""
        import keras
        import tensorflow as tf

        from place_tf.models.place_model import PLACEModel

        t = self.cfg.train
        with strategy.scope():
            model = PLACEModel(model_cfg, self.cfg.objective)
            dummy = _dummy_batch(model_cfg, model_cfg.max_length)
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
            # Loop steps including skipped ones (optimizer.iterations counts applied
            # steps only) and mixed_float16 loss-scale overflows (not bad steps).
            counters = _StepCounters()
        return model, optimizer, bad_steps, counters

    def run(self) -> dict:
        import keras
        import tensorflow as tf

        from place_tf import pretrained
        from place_tf.data import manifest as manifest_lib
        from place_tf.data import pipeline

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
        model_cfg = pretrained.resolve_model_config(
            dataclasses.replace(
                c.model, vocab_size=tokenizer.vocabulary_size, max_length=c.data.max_length
            )
        )
        self._write_run_info(corpus, model_cfg, replicas, chief)

        self.skip_counter = pipeline.SkipCounter()  # host variables, outside the strategy
        model, optimizer, bad_steps, counters = self.build_model_and_optimizer(
            strategy, model_cfg, total_steps
        )
        inner = optimizer.inner_optimizer

        # Checked when the input stream misbehaves (see raise_if_inputs_missing).
        input_files = pipeline.resolve_files(self._train_source(), "train")
        # No data iterator in the checkpoint (see _dataset_fn): weights, optimizer, counters.
        state = {
            "bad_steps": bad_steps,
            "skips": self.skip_counter.checkpointable(),
            **counters.as_dict(),
        }
        # Keyed by variable path: tf.train.Checkpoint(model=...) misses Keras 3 layers
        # held in lists (see place_tf/checkpointing.py).
        ckpt = checkpointing.make_checkpoint(model, optimizer, **state)
        ckpt_dir = os.path.join(t.model_dir, CKPT_SUBDIR)
        if chief:
            manager = tf.train.CheckpointManager(ckpt, ckpt_dir, max_to_keep=t.keep_checkpoints)
            restore_from = manager
        else:
            # Multi-worker protocol: non-chief workers take part in every save (it is
            # collective) but write to a scratch dir; all workers restore the chief's.
            scratch = os.path.join(t.model_dir, f"tmp_worker_{strategy.cluster_resolver.task_id}")
            manager = tf.train.CheckpointManager(ckpt, scratch, max_to_keep=1)
            restore_from = tf.train.CheckpointManager(
                ckpt, ckpt_dir, max_to_keep=t.keep_checkpoints
            )
        candidates = readable_checkpoints(restore_from.checkpoints)
        restored = checkpointing.restore_latest_good(candidates, ckpt)
        if restored is None and restore_from.checkpoints:
            # Never train on top of a half-restored state or overwrite a run's history.
            raise RuntimeError(
                f"none of the {len(restore_from.checkpoints)} checkpoints in {ckpt_dir} "
                "could be restored (unreadable, or not from this model/configuration: see "
                "the warnings above). Use another --model_dir, or delete them to start over."
            )
        start_step = int(counters.global_step.numpy())
        if restored:
            logging.info("resumed from %s at step %d", restored, start_step)
        if start_step and (c.data.deterministic or t.deterministic):
            logging.info("replaying the input stream up to step %d (--deterministic)", start_step)
            self.skip_counter.reset()  # the replay counts the skipped records again
        elif start_step:
            logging.info("input stream reseeded at step %d", start_step)
        iterator = iter(
            strategy.distribute_datasets_from_function(
                self._dataset_fn(tokenizer, global_batch, start_step)
            )
        )

        def save(step):
            if not (manager.latest_checkpoint or "").endswith(f"-{step}"):
                manager.save(checkpoint_number=step)

        train_step = self._make_train_step(
            strategy, model, optimizer, bad_steps, replicas, counters=counters
        )
        writer = (
            tf.summary.create_file_writer(os.path.join(t.model_dir, "tensorboard"))
            if chief
            else tf.summary.create_noop_writer()
        )
        # A live bar on a terminal; in logs (CI, TFX, compare) one line per log_every steps.
        interactive = sys.stdout.isatty()
        progbar = keras.utils.Progbar(total_steps, stateful_metrics=None, unit_name="step")
        self.flag.install()
        t0 = t_after_first = time.time()
        last_log_time, last_log_step = t0, start_step
        logs_np: dict = {}
        step = start_step
        interrupted = False
        corrupt_seen = self.skip_counter.as_dict()["corrupt_record"]
        try:
            while step < total_steps:
                try:
                    batch = next(iterator)
                except (tf.errors.OpError, StopIteration) as e:
                    raise_if_inputs_missing(input_files, ckpt_dir, e)
                    raise
                logs = train_step(batch)
                step += 1
                if step == start_step + 1:
                    t_after_first = time.time()  # excludes tracing/XLA compilation
                logs_np = {k: float(v.numpy()) for k, v in logs.items()}
                # A vanished shard reads as a corrupt record: check the files then.
                corrupt = self.skip_counter.as_dict()["corrupt_record"]
                if corrupt != corrupt_seen:
                    corrupt_seen = corrupt
                    raise_if_inputs_missing(input_files, ckpt_dir)
                if int(bad_steps.numpy()) > t.max_bad_steps:
                    save(step)
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
                        tf.summary.scalar(
                            "train/overflow_steps", int(counters.overflow_steps.numpy())
                        )
                    if chief and not interactive:
                        shown = {k: round(v, 4) for k, v in logs_np.items() if k in _SHOWN}
                        logging.info("step %d/%d %s %.1f images/s", step, total_steps, shown, ips)
                if chief and interactive:
                    progbar.update(
                        step,
                        [(k, v) for k, v in logs_np.items() if k in _SHOWN],
                    )
                if step % t.checkpoint_every == 0:
                    save(step)
                if self.flag.signum is not None:
                    save(step)
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
        save(step)
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
            "overflow_steps": int(counters.overflow_steps.numpy()),
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
    def _make_train_step(self, strategy, model, optimizer, bad_steps, replicas, counters=None):
        """The distributed step `step(dist_batch) -> logs`; updates bad_steps and, when
        given, the `_StepCounters` (global step, loss-scale overflows)."""
        import tensorflow as tf

        t = self.cfg.train
        dynamic = t.mixed_precision == "mixed_float16"
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
            # One device: forward, losses and backward in one XLA cluster. The optimizer
            # update stays outside it: compiled in, it cost 5-6x the compile time
            # (ViT-B/16 first step 394-478 s instead of ~75 s on CPU; the PLACE objective
            # did not finish compiling in 17 min) for a step-time gain within the
            # run-to-run noise (19.2-24.5 s vs 20.8-28.8 s).
            fused = tf.function(loss_and_grads, jit_compile=t.jit_compile, reduce_retracing=True)

            def replica_step(batch):
                total, logs, grads = fused(batch)
                return self._apply(total, logs, grads, optimizer, dynamic, variables)
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
                return self._apply(total, logs, grads, optimizer, dynamic, variables)
        else:
            if t.jit_compile:
                logging.warning(
                    "this model has no forward_features: XLA is off with %d replicas", replicas
                )

            def replica_step(batch):
                total, logs, grads = loss_and_grads(batch)
                return self._apply(total, logs, grads, optimizer, dynamic, variables)

        @tf.function
        def step(dist_batch):
            per_replica = strategy.run(replica_step, args=(dist_batch,))
            logs = {
                k: strategy.reduce(_REDUCTION.get(k, "mean"), v, axis=None)
                for k, v in per_replica.items()
            }
            skipped = logs["skipped_step"] > 0
            overflow = logs.pop("overflow_step") > 0
            # A loss-scale overflow (mixed_float16) is routine: the scale halves, the step
            # is skipped; only genuinely non-finite steps count towards max_bad_steps.
            bad_steps.assign_add(tf.cast(skipped & ~overflow, tf.int64))
            if counters is not None:
                counters.global_step.assign_add(1)
                counters.overflow_steps.assign_add(tf.cast(overflow, tf.int64))
            if self.cfg.objective.cce_teacher == "ema" and "cce" in logs:
                model.update_teacher()  # cross-replica context: every copy moves alike
            return combine_logs(logs, self.cfg.objective)

        return step

    @staticmethod
    def _apply(total, logs, grads, optimizer, dynamic, variables):
        import tensorflow as tf

        ctx = tf.distribute.get_replica_context()
        grads_finite = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
        )
        loss_finite = tf.math.is_finite(total)
        # Same decision on every replica: a single replica's NaN skips the step everywhere.
        bad = ctx.all_reduce(
            "sum",
            tf.stack(
                [
                    1.0 - tf.cast(tf.logical_and(grads_finite, loss_finite), tf.float32),
                    1.0 - tf.cast(loss_finite, tf.float32),
                ]
            ),
        )
        all_finite = bad[0] < 0.5
        # Finite losses but overflowing scaled gradients while the loss scale is > 1: the
        # loss scaler's business (it halves the scale), not a bad step.
        overflow = tf.logical_and(tf.logical_not(all_finite), bad[1] < 0.5)
        if dynamic:
            overflow = tf.logical_and(overflow, optimizer.dynamic_scale > 1.0)
        else:
            overflow = tf.constant(False)
        grads = [
            g if g is None else tf.where(all_finite, g, tf.fill(tf.shape(g), float("nan")))
            for g in grads
        ]
        optimizer.apply(grads, variables)

        out = {"loss": total}
        out.update({k: v for k, v in logs.items() if k != "loss"})
        out["skipped_step"] = 1.0 - tf.cast(all_finite, tf.float32)
        out["overflow_step"] = tf.cast(overflow, tf.float32)
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


class _StepCounters:
    """Checkpointed loop counters (create inside the strategy scope)."""

    def __init__(self):
        import tensorflow as tf

        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.overflow_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="overflow_steps")

    def as_dict(self) -> dict:
        return {"global_step": self.global_step, "overflow_steps": self.overflow_steps}


def _dummy_batch(model_cfg, max_length):
    import tensorflow as tf

    s = model_cfg.image_size
    return {
        "image": tf.zeros([1, s, s, 1]),
        "token_ids": tf.zeros([1, max_length], tf.int32),
        "padding_mask": tf.ones([1, max_length], tf.bool),
    }
