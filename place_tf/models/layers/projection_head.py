"""Projection head: encoder features → the shared embedding space.

[design] A 2-layer MLP (Dense → GELU → Dense) with an optional L2 normalisation. MGCA uses
Linear-BN-ReLU-Linear-BN; BatchNorm is left out on purpose: its batch statistics would be
per replica under tf.distribute (no SyncBN), which makes the embedding depend on the
replica split. The head works on any rank (it maps the last axis), so the same class
projects global vectors [B, D], observation slots [B, K, D] and local tokens [B, N, D].
"""

from __future__ import annotations

import keras
from keras import ops


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """L2 normalisation in float32 (safe under mixed precision); returns float32."""
    x = ops.cast(x, "float32")
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=True), epsilon))


@keras.saving.register_keras_serializable(package="place_tf")
class ProjectionHead(keras.layers.Layer):
    """Dense(hidden) → GELU → Dropout → Dense(output) [→ L2 normalise, float32 output].

    Args:
        output_dim: width of the shared space.
        hidden_dim: width of the hidden layer (0 → a single linear layer, no MLP).
        normalize: L2-normalise the output (the output is then float32).
        dropout: dropout rate after the activation.
    """

    def __init__(self, output_dim, hidden_dim=0, normalize=True, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = int(output_dim)
        self.hidden_dim = int(hidden_dim)
        self.normalize = bool(normalize)
        self.dropout_rate = float(dropout)
        if self.hidden_dim > 0:
            self.hidden = keras.layers.Dense(
                self.hidden_dim, activation="gelu", dtype=self.dtype_policy, name="hidden"
            )
            self.dropout = keras.layers.Dropout(
                self.dropout_rate, dtype=self.dtype_policy, name="dropout"
            )
        else:
            self.hidden = None
            self.dropout = None
        self.output_layer = keras.layers.Dense(
            self.output_dim, dtype=self.dtype_policy, name="output"
        )

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.hidden is not None:
            self.hidden.build(shape)
            shape = shape[:-1] + (self.hidden_dim,)
        self.output_layer.build(shape)
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        if self.hidden is not None:
            x = self.hidden(x)
            x = self.dropout(x, training=training)
        x = self.output_layer(x)
        if self.normalize:
            x = l2_normalize(x)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "output_dim": self.output_dim,
                "hidden_dim": self.hidden_dim,
                "normalize": self.normalize,
                "dropout": self.dropout_rate,
            }
        )
        return config
