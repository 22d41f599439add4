"""Pure loss functions (ITA, PCMA, CCE, MGCA's CTA/CPA), method diagnostics and
cross-replica gathering.

Cross-replica convention (contract (c)): gradients are SUM-reduced over replicas;
contrastive terms are computed in full on every replica from `gather_with_grad`
embeddings, per-example terms return local_sum / global_batch_size.
"""

from place_tf.losses.cce import CCELoss, cce_loss, cce_per_example, cce_target
from place_tf.losses.diagnostics import (
    attention_entropy,
    cross_sample_cosine,
    diagonal_mass,
    observation_diagnostics,
    within_sample_slot_cosine,
)
from place_tf.losses.gather import (
    gather_with_grad,
    per_example_to_replica,
    replica_info,
    scale_grad_for_replicas,
)
from place_tf.losses.ita import ITALoss, ita_loss, symmetric_infonce
from place_tf.losses.mgca import (
    cpa_loss,
    cross_attend,
    cta_loss,
    cta_parameter_free_per_example,
    cta_per_example,
    quantile_clipped_weights,
    sinkhorn,
)
from place_tf.losses.pcma import PCMALoss, pcma_loss, text_presence

__all__ = [
    "CCELoss",
    "ITALoss",
    "PCMALoss",
    "attention_entropy",
    "cce_loss",
    "cce_per_example",
    "cce_target",
    "cpa_loss",
    "cross_attend",
    "cross_sample_cosine",
    "cta_loss",
    "cta_parameter_free_per_example",
    "cta_per_example",
    "diagonal_mass",
    "gather_with_grad",
    "ita_loss",
    "observation_diagnostics",
    "pcma_loss",
    "per_example_to_replica",
    "quantile_clipped_weights",
    "replica_info",
    "scale_grad_for_replicas",
    "sinkhorn",
    "symmetric_infonce",
    "text_presence",
    "within_sample_slot_cosine",
]
