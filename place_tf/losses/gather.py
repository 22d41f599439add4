"""Cross-replica helpers shared by the losses (contract (c) of the project).

The trainer SUM-reduces gradients over replicas. Every loss term a replica returns is
therefore built so that the sum of its gradients over replicas equals the gradient of
the global-batch loss:

- contrastive terms gather the embeddings of every replica with `gather_with_grad`
  (values from all replicas, gradient only into the local shard, as open_clip's
  `gather_features(gather_with_grad=False)`) and compute the FULL global-batch loss on
  every replica. Replica r then contributes exactly dL/d(local shard r); summed over r
  that is dL/dθ. A parameter that enters the loss directly rather than through a local
  shard (the logit scale, CPA prototypes) would be counted once per replica: wrap it in
  `scale_grad_for_replicas` so each replica contributes 1/R of its gradient.
- per-example terms return local_sum / global_batch_size (`per_example_to_replica`).

Outside a strategy, in cross-replica context or with a single replica every helper is the
identity, so the losses reduce to the plain full-batch loss (and stay XLA-compilable).
"""

from __future__ import annotations

import tensorflow as tf


def _multi_replica_context():
    """The current replica context when it spans more than one replica, else None."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def replica_info() -> tuple[tf.Tensor, int]:
    """(replica_id int32 tensor, num_replicas python int); (0, 1) outside a replica context."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None:
        return tf.constant(0, tf.int32), 1
    replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    return replica_id, int(ctx.num_replicas_in_sync)


def gather_with_grad(x) -> tf.Tensor:
    """All-gather `x` [local_B, ...] along axis 0 -> [global_B, ...], gradient to local rows.

    The other replicas' rows are constants (stop-gradient); the local shard is re-inserted
    at its global position so the loss gradient reaches this replica's own embeddings.
    Shards may be uneven: the row offset comes from the gathered shard sizes. The
    re-insertion is a one-hot matmul, so no dynamic shapes appear (TPU/XLA friendly).
    Identity with one replica or outside a replica context.
    """
    x = tf.convert_to_tensor(x)
    ctx = _multi_replica_context()
    if ctx is None:
        return x
    if x.shape.rank is not None and x.shape.rank < 1:
        raise ValueError(f"gather_with_grad needs a tensor of rank >= 1, got shape {x.shape}")
    gathered = ctx.all_gather(tf.stop_gradient(x), axis=0)
    if not x.dtype.is_floating:
        return gathered
    local_n = tf.shape(x)[0]
    # Shard sizes as float32: int32 collectives are awkward on GPUs (host-memory int32).
    sizes = ctx.all_gather(tf.reshape(tf.cast(local_n, tf.float32), [1]), axis=0)
    sizes = tf.cast(sizes, tf.int32)
    replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
    before = tf.range(tf.shape(sizes)[0]) < replica_id
    offset = tf.reduce_sum(tf.where(before, sizes, tf.zeros_like(sizes)))
    global_n = tf.shape(gathered)[0]
    placement = tf.one_hot(offset + tf.range(local_n), global_n, dtype=x.dtype)  # [n, G]
    # Exactly zero in value; carries d(loss)/d(local rows) back to x.
    delta = tf.reshape(x - tf.stop_gradient(x), [local_n, -1])
    inserted = tf.matmul(placement, delta, transpose_a=True)  # [G, prod(rest)]
    return gathered + tf.reshape(inserted, tf.shape(gathered))


def scale_grad_for_replicas(x) -> tf.Tensor:
    """Value unchanged, gradient divided by the number of replicas (identity with one).

    For parameters used directly by a loss that every replica computes in full (logit
    scale, prototypes): SUM-reducing R copies of their gradient would count it R times.
    """
    x = tf.convert_to_tensor(x)
    ctx = _multi_replica_context()
    if ctx is None:
        return x
    frac = tf.cast(1.0 / ctx.num_replicas_in_sync, x.dtype)
    return tf.stop_gradient(x) + (x - tf.stop_gradient(x)) * frac


def per_example_to_replica(per_example_loss, global_batch_size=None) -> tf.Tensor:
    """float32 scalar sum(per_example_loss [B]) / global_batch_size (the mean with 1 replica).

    With `global_batch_size=None` it is the sum of the local batch sizes over replicas
    (one tiny all-reduce; none with a single replica). An empty global batch gives 0.
    """
    loss = tf.cast(tf.convert_to_tensor(per_example_loss), tf.float32)
    if loss.shape.rank is not None and loss.shape.rank != 1:
        raise ValueError(
            f"per_example_to_replica expects per_example_loss of shape [B], got {loss.shape}"
        )
    total = tf.reduce_sum(loss)
    if global_batch_size is None:
        count = tf.cast(tf.size(loss), tf.float32)
        ctx = _multi_replica_context()
        if ctx is not None:
            count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, count)
        global_batch_size = count
    return tf.math.divide_no_nan(total, tf.cast(global_batch_size, tf.float32))


def check_rank(x: tf.Tensor, rank: int, name: str, fn: str) -> None:
    """Raise a ValueError naming the loss and argument when a static rank is wrong."""
    if x.shape.rank is not None and x.shape.rank != rank:
        raise ValueError(f"{fn}: {name} must have rank {rank}, got shape {x.shape}")


def check_same_shape(a: tf.Tensor, b: tf.Tensor, names: str, fn: str) -> None:
    """Raise a ValueError when two statically known shapes are incompatible."""
    if not a.shape.is_compatible_with(b.shape):
        raise ValueError(f"{fn}: {names} must have the same shape, got {a.shape} and {b.shape}")


def to_float32(x) -> tf.Tensor:
    """Losses compute in float32 whatever the compute dtype (bfloat16/float16 policies)."""
    return tf.cast(tf.convert_to_tensor(x), tf.float32)


def diagonal(x: tf.Tensor) -> tf.Tensor:
    """Diagonal of square matrices [..., M, M] -> [..., M].

    A masked sum instead of tf.linalg.diag_part: the gradient of MatrixDiagPartV3 fails
    TF's shape check when the batch dimension is unknown at trace time (model.fit without
    drop_remainder), and XLA fuses this just as well.
    """
    m = tf.shape(x)[-1]
    return tf.reduce_sum(x * tf.eye(m, dtype=x.dtype), axis=-1)
