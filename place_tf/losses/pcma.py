"""PCMA: pathological-level cross-modal alignment between V-PORs and T-PORs ([design]).

L_pcma = 0.5 * (L_inter + L_slot):
- L_inter: for each slot k, symmetric InfoNCE over the global batch between v_obs[:, k]
  and t_obs[:, k] (positive: the same pair), averaged over slots; contrastive, gathered.
- L_slot: for each pair i, symmetric InfoNCE over slots between v_obs[i] and t_obs[i]
  (positive: the same slot), which keeps the slots distinct; per-example, so each
  replica returns local_sum / global_batch_size.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from place_tf.losses.gather import (
    check_rank,
    check_same_shape,
    gather_with_grad,
    per_example_to_replica,
    scale_grad_for_replicas,
    to_float32,
)
from place_tf.losses.ita import symmetric_infonce


def pcma_loss(v_obs, t_obs, logit_scale, global_batch_size=None) -> dict[str, tf.Tensor]:
    """dict(total, inter, slot) of float32 scalars for v_obs, t_obs [B, K, D] (L2-normalised
    by the caller). Under a multi-replica strategy `inter` is the full global value on every
    replica and `slot` is this replica's share (sum over replicas = global mean);
    `global_batch_size` defaults to the summed local batch sizes."""
    v = to_float32(v_obs)
    t = to_float32(t_obs)
    check_rank(v, 3, "v_obs", "pcma_loss")
    check_rank(t, 3, "t_obs", "pcma_loss")
    check_same_shape(v, t, "v_obs and t_obs", "pcma_loss")
    scale = to_float32(logit_scale)

    v_all = gather_with_grad(v)
    t_all = gather_with_grad(t)
    inter_logits = scale_grad_for_replicas(scale) * tf.einsum("ikd,jkd->kij", v_all, t_all)
    inter = tf.reduce_mean(symmetric_infonce(inter_logits))  # mean over slots

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
