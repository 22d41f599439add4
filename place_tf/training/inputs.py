"""The training input stream: shard list and the per-pipeline dataset function
of a run that starts (or resumes) at a given step, distributed over the replicas."""

from __future__ import annotations


def _expand(globs: str, flag: str) -> list[str]:
    import tensorflow as tf

    files = sorted(f for g in globs.split(",") for f in tf.io.gfile.glob(g.strip()))
    if not files:
        raise FileNotFoundError(f"--{flag}={globs!r} matches no file")
    return files


def train_source(data_cfg):
    """A corpus directory (with manifest) or the expanded --train_files globs."""
    if not data_cfg.train_files:
        return data_cfg.corpus_dir
    return _expand(data_cfg.train_files, "train_files")


def eval_source(data_cfg):
    """Held-out examples: the expanded --eval_files globs (e.g. TFX's eval split), else
    the corpus directory (whose manifest names its validate split)."""
    if not data_cfg.eval_files:
        return data_cfg.corpus_dir
    return _expand(data_cfg.eval_files, "eval_files")


def dataset_fn(cfg, tokenizer, global_batch: int, start_step: int = 0, skip_counter=None):
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

    d, t = cfg.data, cfg.train
    deterministic = d.deterministic or t.deterministic
    replay = start_step if deterministic else 0
    seed = t.seed if deterministic or not start_step else t.seed + 7919 * start_step
    source = train_source(d)

    def fn(input_context):
        ds = pipeline.make_dataset(
            source,
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
            skip_counter=skip_counter,
            shuffle_buffer=d.shuffle_buffer,
            frontal_only=d.frontal_only,
            report_order=d.report_order,
        )
        if replay:
            per_step = max(
                1, input_context.num_replicas_in_sync // input_context.num_input_pipelines
            )
            ds = ds.skip(replay * per_step)
        return ds

    return fn


def distributed_iterator(strategy, fn, buffer_per_replica: int = 2):
    """Iterator over `fn`'s batches, each already copied to its replica's device.

    tf.distribute prefetches `buffer_per_replica` batches onto every replica's device
    (GPU memory on GPUs) while the current step runs, so a step never waits for a
    host-to-device copy; on CPU replicas the copy is a no-op.
    """
    import tensorflow as tf

    options = tf.distribute.InputOptions(
        experimental_fetch_to_device=True,
        experimental_per_replica_buffer_size=buffer_per_replica,
    )
    return iter(strategy.distribute_datasets_from_function(fn, options=options))
