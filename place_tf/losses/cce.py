"""CCE: correlation exploration proxy task ([design], place-method.md loss 5).

The student (masked view, report-conditioned decoder) predicts patch tokens whose
patch-to-patch similarity distribution must match the clean view's:
  target  = stop_gradient(row-softmax(cos_sim(target_patches) / tau_t))      [B, N, N]
  student = row-log-softmax(cos_sim(predicted_patches) / tau_s)              [B, N, N]
  loss_i  = mean over the N rows of -sum_j target * student   (masked patches included)
Per-example: each replica returns local_sum / global_batch_size.

Two [design] options (issue #21: the literal recipe may learn little from the report):
- `exclude_diagonal`: each patch's self-similarity (cos 1, logit 1/tau_t = 20) takes a
  large share of every target row; excluding it from both distributions leaves only the
  patch-to-OTHER-patch correlations to predict.
- `center`: subtract each image's mean patch token before the cosine (target and student
  alike), so the similarities are correlations of the deviations from the image's common
  component ("patch-level covariance", as a summary of the paper words it) rather than
  being dominated by what all patches share.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from place_tf.losses.gather import check_rank, per_example_to_replica, to_float32

_NEG = -1e9  # finite "minus infinity": keeps log-softmax and its gradient NaN-free


def _cosine_logits(
    x: tf.Tensor, temperature: float, exclude_diagonal: bool, center: bool = False
) -> tf.Tensor:
    if center:
        x = x - tf.reduce_mean(x, axis=-2, keepdims=True)
    x = tf.math.l2_normalize(x, axis=-1)
    logits = tf.matmul(x, x, transpose_b=True) / temperature
    if exclude_diagonal:
        n = tf.shape(logits)[-1]
        logits = tf.where(tf.eye(n, dtype=tf.bool), tf.cast(_NEG, logits.dtype), logits)
    return logits


def cce_target(
    target_patches, temperature: float = 0.05, exclude_diagonal: bool = False, center: bool = False
) -> tf.Tensor:
    """float32 [B, N, N] stop-gradient target rows: softmax over j of cos(x_i, x_j) / tau_t
    (diagonal excluded: exactly 0 there; centred: cosine of mean-subtracted tokens)."""
    x = to_float32(target_patches)
    check_rank(x, 3, "target_patches", "cce_target")
    return tf.stop_gradient(
        tf.nn.softmax(_cosine_logits(x, temperature, exclude_diagonal, center), axis=-1)
    )


def cce_per_example(
    target_patches,
    predicted_patches,
    target_temperature: float = 0.05,
    student_temperature: float = 0.1,
    exclude_diagonal: bool = False,
    center: bool = False,
) -> tf.Tensor:
    """float32 [B]: the CCE cross-entropy of each example, averaged over its N patch rows."""
    target = to_float32(target_patches)
    pred = to_float32(predicted_patches)
    check_rank(target, 3, "target_patches", "cce_loss")
    check_rank(pred, 3, "predicted_patches", "cce_loss")
    if not target.shape[:2].is_compatible_with(pred.shape[:2]):
        raise ValueError(
            "cce_loss: target_patches and predicted_patches must share [B, N], got "
            f"{target.shape} and {pred.shape}"
        )
    if target_temperature <= 0 or student_temperature <= 0:
        raise ValueError(
            f"cce_loss: temperatures must be > 0, got {target_temperature}, {student_temperature}"
        )
    p_target = cce_target(target, target_temperature, exclude_diagonal, center)
    log_student = tf.nn.log_softmax(
        _cosine_logits(pred, student_temperature, exclude_diagonal, center), axis=-1
    )
    terms = p_target * log_student
    if exclude_diagonal:  # 0 * (-1e9): make the excluded entries exactly zero
        n = tf.shape(terms)[-1]
        terms = tf.where(tf.eye(n, dtype=tf.bool), tf.zeros_like(terms), terms)
    return -tf.reduce_mean(tf.reduce_sum(terms, axis=-1), axis=-1)


def cce_loss(
    target_patches,
    predicted_patches,
    target_temperature: float = 0.05,
    student_temperature: float = 0.1,
    *,
    exclude_diagonal: bool = False,
    center: bool = False,
    global_batch_size=None,
) -> tf.Tensor:
    """float32 scalar CCE loss of target/predicted patch tokens [B, N, C] (cosine similarity
    is taken here, no prior normalisation needed). `exclude_diagonal` drops each patch's
    self-similarity from both distributions, `center` subtracts each image's mean token
    first ([design] options; both off = the literal recipe). `global_batch_size` defaults
    to the summed local batch sizes over replicas."""
    per_example = cce_per_example(
        target_patches,
        predicted_patches,
        target_temperature,
        student_temperature,
        exclude_diagonal,
        center,
    )
    return per_example_to_replica(per_example, global_batch_size)


@keras.saving.register_keras_serializable(package="place_tf")
class CCELoss(keras.losses.Loss):
    """Keras wrapper: `loss(target_patches, predicted_patches)` = cce_loss(...)."""

    def __init__(
        self,
        target_temperature: float = 0.05,
        student_temperature: float = 0.1,
        exclude_diagonal: bool = False,
        center: bool = False,
        name: str = "cce",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.target_temperature = float(target_temperature)
        self.student_temperature = float(student_temperature)
        self.exclude_diagonal = bool(exclude_diagonal)
        self.center = bool(center)

    def call(self, y_true, y_pred):
        return cce_loss(
            y_true,
            y_pred,
            self.target_temperature,
            self.student_temperature,
            exclude_diagonal=self.exclude_diagonal,
            center=self.center,
        )

    def get_config(self):
        return {
            **super().get_config(),
            "target_temperature": self.target_temperature,
            "student_temperature": self.student_temperature,
            "exclude_diagonal": self.exclude_diagonal,
            "center": self.center,
        }
