"""PCMA: pathological-level cross-modal alignment between V-PORs and T-PORs ([design]).

L_pcma = 0.5 * (L_inter + L_slot):
- L_inter: for each slot k, symmetric InfoNCE over the global batch between v_obs[:, k]
  and t_obs[:, k] (positive: the same pair), averaged over slots; contrastive, gathered.
- L_slot: for each pair i, symmetric InfoNCE over slots between v_obs[i] and t_obs[i]
  (positive: the same slot), which keeps the slots distinct; per-example, so each
  replica returns local_sum / global_batch_size.

[design] option `presence` (issue #21): plain L_inter runs the batch InfoNCE for every
slot of every pair, also for slots whose pathology the study does not have, which pushes
each slot towards instance identity (a copy of ITA). With presence weights w[i, k] >= 0
(no gradient) L_inter becomes the weighted mean over (pair, slot) positives,
sum_ik w_ik * l_ik / sum_ik w_ik, where l_ik is the symmetric InfoNCE of positive i in
slot k; uniform weights give back the plain L_inter. Without labels, `text_presence`
derives w from the report side: a slot that finds its observation in the report attends
to few tokens (low entropy), a slot that finds nothing spreads its attention over the
report (normalised entropy near 1); w = 1 - normalised entropy.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from place_tf.losses.diagnostics import attention_entropy_per_example
from place_tf.losses.gather import (
    check_rank,
    check_same_shape,
    gather_with_grad,
    per_example_to_replica,
    scale_grad_for_replicas,
    to_float32,
)
from place_tf.losses.ita import symmetric_infonce, symmetric_infonce_per_positive


def text_presence(text_attention, token_mask=None) -> tf.Tensor:
    """float32 [B, K] presence weights in [0, 1], no gradient: 1 - the normalised entropy of
    each slot's attention over the report's tokens (text_attention [B, K, L], token_mask
    [B, L] True = real token)."""
    return 1.0 - attention_entropy_per_example(text_attention, token_mask)


def pcma_loss(
    v_obs, t_obs, logit_scale, global_batch_size=None, presence=None
) -> dict[str, tf.Tensor]:
    """dict(total, inter, slot) of float32 scalars for v_obs, t_obs [B, K, D] (L2-normalised
    by the caller). Under a multi-replica strategy `inter` is the full global value on every
    replica and `slot` is this replica's share (sum over replicas = global mean);
    `global_batch_size` defaults to the summed local batch sizes. `presence` [B, K] >= 0
    (stop-gradient) weights the positives of L_inter (module docstring); None = uniform."""
    v = to_float32(v_obs)
    t = to_float32(t_obs)
    check_rank(v, 3, "v_obs", "pcma_loss")
    check_rank(t, 3, "t_obs", "pcma_loss")
    check_same_shape(v, t, "v_obs and t_obs", "pcma_loss")
    scale = to_float32(logit_scale)

    v_all = gather_with_grad(v)
    t_all = gather_with_grad(t)
    inter_logits = scale_grad_for_replicas(scale) * tf.einsum("ikd,jkd->kij", v_all, t_all)
    if presence is None:
        inter = tf.reduce_mean(symmetric_infonce(inter_logits))  # mean over slots
    else:
        w = tf.stop_gradient(to_float32(presence))
        check_rank(w, 2, "presence", "pcma_loss")
        w = tf.transpose(gather_with_grad(w))  # [K, G], like the per-slot positives
        per_positive = symmetric_infonce_per_positive(inter_logits)  # [K, G]
        inter = tf.math.divide_no_nan(tf.reduce_sum(w * per_positive), tf.reduce_sum(w))

    slot_logits = scale * tf.einsum("ikd,ild->ikl", v, t)  # [B, K, K]
    slot = per_example_to_replica(symmetric_infonce(slot_logits), global_batch_size)
    return {"total": 0.5 * (inter + slot), "inter": inter, "slot": slot}


@keras.saving.register_keras_serializable(package="place_tf")
class PCMALoss(keras.losses.Loss):
    """Keras wrapper: `loss(t_obs, v_obs)` = pcma_loss(v_obs, t_obs, scale)[component]."""

    def __init__(
        self,
        logit_scale: float = 1.0 / 0.07,
        component: str = "total",
        name: str = "pcma",
        **kwargs,
    ):
        if component not in ("total", "inter", "slot"):
            raise ValueError(f"PCMALoss: component must be total|inter|slot, got {component!r}")
        super().__init__(name=name, **kwargs)
        self.logit_scale = float(logit_scale)
        self.component = component

    def call(self, y_true, y_pred):
        return pcma_loss(y_pred, y_true, self.logit_scale)[self.component]

    def get_config(self):
        return {
            **super().get_config(),
            "logit_scale": self.logit_scale,
            "component": self.component,
        }
