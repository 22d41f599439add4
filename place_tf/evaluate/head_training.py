"""Training a task head on top of the encoder, shared by the dense downstream tasks.

Segmentation, detection and report generation all train a new head with AdamW, optionally
fine-tune the encoder at a smaller learning rate, keep the weights of the epoch that scores
best on the validation split, and restore them before the test split is scored. The loss,
the head and the metric differ; this loop does not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import keras
import numpy as np

log = logging.getLogger(__name__)


class HeadOptimizer:
    """AdamW for the head, and a second AdamW at `encoder_learning_rate` for the encoder.

    `variables` is the list to differentiate against (head first); `apply` takes the
    gradients in that order. Encoder variables that get no gradient (a layer the task does
    not reach, e.g. the ViT's pooled output) are left alone. `tracked` is what the
    best-epoch selection snapshots and restores (`for_task`: every weight of the head, and
    of the encoder when it is fine-tuned; otherwise the optimised variables).
    """

    def __init__(
        self,
        head_variables: Sequence,
        encoder_variables: Sequence,
        learning_rate: float,
        encoder_learning_rate: float,
        weight_decay: float,
    ):
        self.head_variables = list(head_variables)
        self.encoder_variables = list(encoder_variables)
        self.head = keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay)
        self.head.build(self.head_variables)
        self.encoder = None
        if self.encoder_variables:
            self.encoder = keras.optimizers.AdamW(encoder_learning_rate, weight_decay=weight_decay)
            self.encoder.build(self.encoder_variables)
        self.tracked = self.variables

    @classmethod
    def for_task(
        cls, head, features, learning_rate: float, encoder_learning_rate: float, weight_decay: float
    ) -> HeadOptimizer:
        """For a task head over a task_data.TaskFeatures (frozen or fine-tuned encoder)."""
        opt = cls(
            head.trainable_variables,
            features.trainable_variables(),
            learning_rate,
            encoder_learning_rate,
            weight_decay,
        )
        opt.tracked = head.weights + (features.encoder_weights() if opt.encoder_variables else [])
        return opt

    @property
    def variables(self) -> list:
        return self.head_variables + self.encoder_variables

    def apply(self, grads: Sequence) -> None:
        n = len(self.head_variables)
        if len(grads) != n + len(self.encoder_variables):
            raise ValueError(
                f"{len(grads)} gradients for {n} head + "
                f"{len(self.encoder_variables)} encoder variables"
            )
        self.head.apply(list(grads[:n]), self.head_variables)
        if self.encoder is not None:
            pairs = [
                (g, v)
                for g, v in zip(grads[n:], self.encoder_variables, strict=True)
                if g is not None
            ]
            if pairs:
                self.encoder.apply([g for g, _ in pairs], [v for _, v in pairs])


def snapshot_weights(variables) -> list[np.ndarray]:
    return [np.array(v.numpy()) for v in variables]


def assign_weights(variables, values) -> None:
    for v, value in zip(variables, values, strict=True):
        v.assign(value)


def fit_selecting_on_validation(
    task: str,
    epochs: int,
    train_epoch: Callable[[], dict],
    validate: Callable[[], float] | None,
    tracked: Sequence,
    val_key: str,
    higher_is_better: bool = True,
) -> tuple[list[dict], float]:
    """Run `epochs` epochs; keep and finally restore the weights that validated best.

    train_epoch() returns the epoch's mean losses ({"loss": ...}); validate() the validation
    score (NaN: no usable score this epoch, never selected). With validate None the last
    epoch's weights stay. Returns (history, best validation score or NaN when none).
    """
    best, best_val, history = None, math.nan, []
    for epoch in range(int(epochs)):
        entry = {"epoch": epoch + 1, **train_epoch()}
        if validate is not None:
            v = float(validate())
            entry[val_key] = v
            improved = (v > best_val) if higher_is_better else (v < best_val)
            if not math.isnan(v) and (best is None or improved):
                best_val, best = v, snapshot_weights(tracked)
        history.append(entry)
        log.info("%s epoch %d: %s", task, epoch + 1, entry)
    if best is not None:
        assign_weights(tracked, best)
    return history, best_val
