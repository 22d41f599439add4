"""Projection head: encoder features → the shared embedding space.

style="mlp" ([design], the default): a 2-layer MLP (Dense → GELU → Dense) with an optional
L2 normalisation, no BatchNorm (whose statistics would otherwise depend on the replica
split). style="mgca": MGCA's GlobalEmbedding / LocalEmbedding (HKU-MedAI/MGCA
mgca/models/backbones/encoder.py): Linear → BatchNorm → ReLU → Linear → BatchNorm without
scale and offset (affine=False), PyTorch's BatchNorm defaults (momentum 0.1, eps 1e-5).
The BatchNorms are `synchronized`: under tf.distribute their batch statistics are the
global batch's (one all-reduce per BatchNorm; it cannot run inside an XLA cluster, so a
multi-replica step must call such a head outside its jit-compiled part). Over local tokens
[B, N, D] the statistics run over batch and tokens, as MGCA's Conv1d + BatchNorm1d do.
The head works on any rank (it maps the last axis), so the same class projects global
vectors [B, D], observation slots [B, K, D] and local tokens [B, N, D].
"""

from __future__ import annotations

import keras
from keras import ops

STYLES = ("mlp", "mgca")


def l2_normalize(x, axis=-1, epsilon=1e-12):
    """L2 normalisation in float32 (safe under mixed precision); returns float32."""
    x = ops.cast(x, "float32")
    return x * ops.rsqrt(ops.maximum(ops.sum(ops.square(x), axis=axis, keepdims=True), epsilon))


@keras.saving.register_keras_serializable(package="place_tf")
class ProjectionHead(keras.layers.Layer):
    """Dense(hidden) → GELU → Dropout → Dense(output) [→ L2 normalise, float32 output];
    style "mgca": Dense(hidden) → BN → ReLU → Dropout → Dense(output) → BN(affine=False).

    Args:
        output_dim: width of the shared space.
        hidden_dim: width of the hidden layer (0 → a single linear layer, no MLP; the
            "mgca" style needs a hidden layer).
        normalize: L2-normalise the output (the output is then float32).
        dropout: dropout rate after the activation.
        style: "mlp" or "mgca" (module docstring).
    """

    def __init__(
        self, output_dim, hidden_dim=0, normalize=True, dropout=0.0, style="mlp", **kwargs
    ):
        super().__init__(**kwargs)
        if style not in STYLES:
            raise ValueError(f"ProjectionHead style must be one of {STYLES}, got {style!r}")
        if style == "mgca" and hidden_dim <= 0:
            raise ValueError("ProjectionHead style 'mgca' needs hidden_dim > 0")
        self.output_dim = int(output_dim)
        self.hidden_dim = int(hidden_dim)
        self.normalize = bool(normalize)
        self.dropout_rate = float(dropout)
        self.style = style
        dt = self.dtype_policy
        mgca = style == "mgca"
        self.hidden_norm = self.output_norm = None
        if self.hidden_dim > 0:
            self.hidden = keras.layers.Dense(
                self.hidden_dim, activation=None if mgca else "gelu", dtype=dt, name="hidden"
            )
            self.dropout = keras.layers.Dropout(self.dropout_rate, dtype=dt, name="dropout")
            if mgca:
                self.hidden_norm = _batch_norm(True, dt, "hidden_norm")
        else:
            self.hidden = None
            self.dropout = None
        self.output_layer = keras.layers.Dense(self.output_dim, dtype=dt, name="output")
        if mgca:
            self.output_norm = _batch_norm(False, dt, "output_norm")

    def build(self, input_shape):
        shape = tuple(input_shape)
        if self.hidden is not None:
            self.hidden.build(shape)
            shape = shape[:-1] + (self.hidden_dim,)
            if self.hidden_norm is not None:
                self.hidden_norm.build(shape)
        self.output_layer.build(shape)
        if self.output_norm is not None:
            self.output_norm.build(shape[:-1] + (self.output_dim,))
        self.built = True

    def call(self, inputs, training=None):
        x = inputs
        if self.hidden is not None:
            x = self.hidden(x)
            if self.hidden_norm is not None:
                x = ops.relu(self.hidden_norm(x, training=training))
            x = self.dropout(x, training=training)
        x = self.output_layer(x)
        if self.output_norm is not None:
            x = self.output_norm(x, training=training)
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
                "style": self.style,
            }
        )
        return config


def _batch_norm(affine: bool, dtype, name: str):
    """PyTorch BatchNorm1d's defaults (momentum 0.1 = Keras 0.9, eps 1e-5), global stats."""
    return keras.layers.BatchNormalization(
        momentum=0.9,
        epsilon=1e-5,
        center=affine,
        scale=affine,
        synchronized=True,
        dtype=dtype,
        name=name,
    )
