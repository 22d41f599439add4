"""ITA: instance-level image-report alignment (symmetric InfoNCE over the global batch)."""

from __future__ import annotations

import keras
import tensorflow as tf

from place_tf.losses.gather import (
    check_rank,
    check_same_shape,
    diagonal,
    gather_with_grad,
    scale_grad_for_replicas,
    to_float32,
)


def symmetric_infonce_per_positive(logits) -> tf.Tensor:
    """0.5 * (CE of row m + CE of column m) of square logits [..., M, M] for each positive
    (m, m) on the diagonal -> [..., M]."""
    logits = to_float32(logits)
    rows = diagonal(tf.nn.log_softmax(logits, axis=-1))
    cols = diagonal(tf.nn.log_softmax(logits, axis=-2))
    return -0.5 * (rows + cols)


def symmetric_infonce(logits) -> tf.Tensor:
    """0.5 * (CE over rows + CE over columns) of square logits [..., M, M], positives on the
    diagonal; returns the mean over the M positives for each leading index -> [...]."""
    return tf.reduce_mean(symmetric_infonce_per_positive(logits), axis=-1)


def ita_loss(image_emb, text_emb, logit_scale, sum_directions: bool = False) -> tf.Tensor:
    """Symmetric InfoNCE between image and report embeddings [B, D] (L2-normalised by the
    caller), logits = logit_scale * img @ txt^T over the gathered global batch: the mean
    of the image->report and report->image cross-entropies, or with `sum_directions`
    their sum, as MGCA's code does (`loss_ita = loss0 + loss1` in HKU-MedAI/MGCA
    mgca/models/mgca/mgca_module.py), i.e. twice the mean.

    Every replica returns the full global-batch loss value; the gradient flows only into its
    local shard (and 1/R of the logit-scale gradient), so SUM-reduced gradients equal the
    single-device global-batch gradient. Returns a float32 scalar.
    """
    img = to_float32(image_emb)
    txt = to_float32(text_emb)
    check_rank(img, 2, "image_emb", "ita_loss")
    check_rank(txt, 2, "text_emb", "ita_loss")
    check_same_shape(img, txt, "image_emb and text_emb", "ita_loss")
    scale = scale_grad_for_replicas(to_float32(logit_scale))
    img = gather_with_grad(img)
    txt = gather_with_grad(txt)
    logits = scale * tf.matmul(img, txt, transpose_b=True)
    loss = symmetric_infonce(logits)
    return 2.0 * loss if sum_directions else loss


@keras.saving.register_keras_serializable(package="place_tf")
class ITALoss(keras.losses.Loss):
    """Keras wrapper: `loss(text_emb, image_emb)` = ita_loss(image_emb, text_emb, scale)
    with a fixed logit scale (the model's learned scale goes through `ita_loss`)."""

    def __init__(self, logit_scale: float = 1.0 / 0.07, name: str = "ita", **kwargs):
        super().__init__(name=name, **kwargs)
        self.logit_scale = float(logit_scale)

    def call(self, y_true, y_pred):
        return ita_loss(y_pred, y_true, self.logit_scale)

    def get_config(self):
        return {**super().get_config(), "logit_scale": self.logit_scale}
