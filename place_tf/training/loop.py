"""The PLACE pre-training run: `Trainer(cfg).run() -> summary`.

Guarantees (each proved by a test, see README "Reliability"):
- a killed run resumes from its last checkpoint with optimizer state, step counter and
  learning-rate schedule; in --deterministic mode it also replays the input stream up to
  the step, so its weights equal an uninterrupted run's bit for bit (inputs.dataset_fn);
- a truncated or half-written latest checkpoint is skipped for the previous good one;
- SIGTERM writes a checkpoint at the current step and exits with 128 + 15;
- multi-worker: every worker restores the chief's checkpoint (non-chief workers write to
  scratch directories), so a job restarted after losing a worker resumes at the chief's
  saved step;
- a step with a non-finite loss/gradient is skipped (never applied) and counted; the run
  stops with a clear error once more than `max_bad_steps` were counted. The count lives
  on the device and is read every `log_every` steps (no per-step host sync), so the stop
  comes at the first log boundary after the bound is crossed;
- bad records are skipped and counted by the input pipeline, reported in the summary; a
  training shard that disappears mid-run stops the run with FileNotFoundError naming it;
- report text and ids are never logged or written to TensorBoard.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import logging

from place_tf import distribute, pretrained
from place_tf.training import checkpoints, guards, inputs, logger, run_dir, setup, step


class Trainer:
    """Builds data, model, optimizer and checkpointing from Configs; `run()` trains.

    Seams (tests, fault injection): `train_step_factory(strategy, state, train_cfg,
    objective_cfg) -> step` builds the step; `on_step(trainer, step)` runs after each
    step; `logger_factory(...)` makes the StepLogger. After `run()`, `model`,
    `tokenizer` and `state` hold what was trained.
    """

    def __init__(
        self,
        cfg,
        train_step_factory=step.build_train_step,
        on_step=None,
        logger_factory=logger.StepLogger,
    ):
        self.cfg = cfg
        self.train_step_factory = train_step_factory
        self.on_step = on_step
        self.logger_factory = logger_factory
        self.termination = guards.TerminationFlag()
        self.model = self.tokenizer = self.state = None

    def _corpus(self) -> tuple[dict, int]:
        """(manifest digest for run_info, number of training examples)."""
        from place_tf.data import manifest as manifest_lib

        c = self.cfg
        if c.data.train_files:
            if not c.train.max_steps:
                raise ValueError("--train_files needs --max_steps (the corpus size is unknown)")
            return {"source": "train_files", "splits": {}}, 0
        corpus = manifest_lib.read_manifest(c.data.corpus_dir)
        return corpus, int(corpus["splits"]["train"]["examples"])

    def _restore(self, strategy, state, skip_counter, chief: bool):
        """(saver, start step): the newest readable checkpoint restored, if any.

        No data iterator in the checkpoint (see inputs.dataset_fn): weights, optimizer,
        counters. Keyed by variable path (see checkpoints.py)."""
        t = self.cfg.train
        ckpt = checkpoints.make_checkpoint(
            state.model, state.optimizer, skips=skip_counter.checkpointable(), **state.counters()
        )
        ckpt_dir = run_dir.checkpoint_dir(t.model_dir)
        scratch = (
            ""
            if chief
            else os.path.join(t.model_dir, f"tmp_worker_{strategy.cluster_resolver.task_id}")
        )
        saver = checkpoints.CheckpointSaver(ckpt, ckpt_dir, t.keep_checkpoints, scratch)
        paths = saver.restore_paths()
        restored = checkpoints.restore_newest_readable(ckpt, paths)
        if restored is None and paths:
            # Never train on top of a half-restored state or overwrite a run's history.
            raise RuntimeError(
                f"none of the {len(paths)} checkpoints in {ckpt_dir} could be restored "
                "(unreadable, or not from this model/configuration: see the warnings above). "
                "Use another --model_dir, or delete them to start over."
            )
        start = int(state.global_step.numpy())
        if restored:
            logging.info("resumed from %s at step %d", restored, start)
        if start and (self.cfg.data.deterministic or t.deterministic):
            logging.info("replaying the input stream up to step %d (--deterministic)", start)
            skip_counter.reset()  # the replay counts the skipped records again
        elif start:
            logging.info("input stream reseeded at step %d", start)
        return saver, start

    def run(self) -> dict:
        import tensorflow as tf

        from place_tf.data import pipeline
        from place_tf.data import tokenizer as tok

        c, t = self.cfg, self.cfg.train
        os.makedirs(t.model_dir, exist_ok=True)
        strategy = setup.prepare(t)
        replicas = strategy.num_replicas_in_sync
        global_batch = t.per_replica_batch * replicas
        chief = distribute.is_chief(strategy)
        corpus, num_train = self._corpus()
        total = setup.total_steps(t, num_train, global_batch)
        # The text checkpoint's vocabulary and casing, else --vocab_file / the corpus's.
        self.tokenizer = tokenizer = tok.report_tokenizer(c.data, c.model.text_init)
        # The encoders' architecture comes from their checkpoints when they start from one.
        model_cfg = pretrained.resolve_model_config(
            dataclasses.replace(
                c.model, vocab_size=tokenizer.vocabulary_size, max_length=c.data.max_length
            )
        )
        if chief:
            run_dir.write_run_info(t.model_dir, c, model_cfg, corpus, replicas)
        skip_counter = pipeline.SkipCounter()  # host variables, outside the strategy
        self.state = state = setup.build_train_state(strategy, model_cfg, c.objective, t, total)
        self.model = state.model
        saver, start = self._restore(strategy, state, skip_counter, chief)
        fn = inputs.dataset_fn(c, tokenizer, global_batch, start, skip_counter)
        iterator = inputs.distributed_iterator(strategy, fn)
        per_epoch = setup.steps_per_epoch(t, num_train, global_batch)
        train_step = self.train_step_factory(
            strategy, state, t, c.objective, steps_per_epoch=per_epoch
        )
        tb_dir = os.path.join(t.model_dir, run_dir.TENSORBOARD_SUBDIR)
        writer = tf.summary.create_file_writer(tb_dir) if chief else tf.summary.create_noop_writer()
        log = self.logger_factory(writer, total, global_batch, start, chief)
        files = pipeline.resolve_files(inputs.train_source(c.data), "train")
        t0 = time.time()
        try:
            end, values, t_first, first_end = self._loop(
                train_step, iterator, log, saver, skip_counter, files, start, total
            )
        finally:
            writer.flush()
        summary = {
            "steps": end,
            "resumed_from_step": start,
            "global_batch": global_batch,
            "replicas": replicas,
            "wall_seconds": round(time.time() - t0, 2),
            "images_per_second": round(
                (end - first_end) * global_batch / max(time.time() - t_first, 1e-9), 3
            )
            if end > first_end
            else None,
            "final_losses": values["logs"],
            "bad_steps": values["bad_steps"],
            "overflow_steps": values["overflow_steps"],
            "skipped_records": skip_counter.as_dict(),
            "checkpoint": saver.latest,
        }
        if chief:
            summary["model"] = run_dir.save_model(t.model_dir, state.model)
            logger.write_attention_images(writer, state.model, c.data, tokenizer, end)
            writer.flush()
        return summary

    def _loop(self, train_step, iterator, log, saver, skip_counter, files, start, total):
        """Steps start+1..total: (last step, last fetched values, time and step after the
        first call, which traces and compiles).

        Host reads of device values only at log boundaries (`log.fetch`); the per-step
        checks (signals, vanished shards, checkpoint cadence) are host-side counters."""
        import tensorflow as tf

        t = self.cfg.train
        repeated = step.repeat_step(train_step) if t.steps_per_call > 1 else None
        values = {  # what a resumed, already finished run reports
            "logs": {},
            "bad_steps": int(self.state.bad_steps.numpy()),
            "overflow_steps": int(self.state.overflow_steps.numpy()),
        }
        corrupt_seen = skip_counter.as_dict()["corrupt_record"]
        t_first, first_end, n = time.time(), start, start
        self.termination.install()
        try:
            while n < total:
                calls = min(t.steps_per_call, total - n)
                try:
                    if repeated is None:
                        logs = train_step(next(iterator))
                    else:
                        logs = repeated(iterator, tf.constant(calls))
                except (tf.errors.OpError, StopIteration) as e:
                    guards.raise_if_inputs_missing(files, saver.ckpt_dir, e)
                    raise
                prev, n = n, n + calls

                def crossed(every, prev=prev, n=n):  # a multiple of `every` in (prev, n]
                    return n // every > prev // every

                if self.on_step is not None:
                    self.on_step(self, n)
                if prev == start:
                    self.state.global_step.numpy()  # waits for call 1 (tracing, compiling)
                    t_first, first_end = time.time(), n
                # A vanished shard reads as a corrupt record (a host-side counter).
                corrupt = skip_counter.as_dict()["corrupt_record"]
                if corrupt != corrupt_seen:
                    corrupt_seen = corrupt
                    guards.raise_if_inputs_missing(files, saver.ckpt_dir)
                if crossed(t.log_every) or n == total:
                    fetched = log.fetch(logs, self.state)
                    values = {
                        "logs": {k: fetched[k] for k in logs},
                        "bad_steps": fetched["bad_steps"],
                        "overflow_steps": fetched["overflow_steps"],
                    }
                    if values["bad_steps"] > t.max_bad_steps:
                        saver.save(n)  # the stop's checkpoint, then the error naming it
                        guards.check_bad_steps(
                            values["bad_steps"], t.max_bad_steps, n, saver.ckpt_dir
                        )
                    log.write(n, fetched)
                log.tick(n)
                if crossed(t.checkpoint_every):
                    saver.save(n)
                if self.termination.signum is not None:
                    saver.save(n)
                    logging.warning(
                        "signal %d received: checkpoint written at step %d",
                        self.termination.signum,
                        n,
                    )
                    sys.exit(128 + int(self.termination.signum))
        finally:
            self.termination.restore()
        saver.save(n)
        return n, values, t_first, first_end
