"""CCE correlation decoder: visible patch tokens + report tokens → features for all patches.

[design] (place-method.md §5): MAE-style. The encoder saw only the visible patches; this
light decoder embeds them to its own width, puts a learned mask token at every masked
position, adds its own position embeddings, and runs `num_layers` pre-LN blocks of
self-attention over all N patches and cross-attention to the (padding-masked) report
tokens, so the prediction of the patch-correlation structure is conditioned on the report.
The output [B, N, output_dim] is compared with the clean view's patch tokens by cce_loss.

Scattering the visible tokens back uses a one-hot product (static shapes, XLA friendly,
differentiable); the visible indices must be distinct.
"""

from __future__ import annotations

import keras
from keras import ops

from place_tf.models.layers.observation_extractor import CrossAttentionBlock


@keras.saving.register_keras_serializable(package="place_tf")
class CorrelationDecoder(keras.layers.Layer):
    """call(visible_tokens [B,M,C_in], keep_indices [B,M] int, context [B,L,C_txt],
    context_mask [B,L] bool or None) -> predicted patch features [B, num_patches, output_dim].
    """

    def __init__(
        self,
        num_patches,
        num_layers,
        num_heads,
        width,
        output_dim,
        mlp_dim=0,
        dropout=0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_patches = int(num_patches)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.width = int(width)
        self.output_dim = int(output_dim)
        self.mlp_dim = int(mlp_dim) or 4 * self.width
        self.dropout_rate = float(dropout)
        dt = self.dtype_policy
        self.embed = keras.layers.Dense(self.width, dtype=dt, name="embed")
        self.blocks = [
            CrossAttentionBlock(
                self.num_heads,
                self.width,
                self.mlp_dim,
                self.dropout_rate,
                self_attention=True,
                dtype=dt,
                name=f"block_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.ln_out = keras.layers.LayerNormalization(epsilon=1e-6, dtype=dt, name="ln_out")
        self.head = keras.layers.Dense(self.output_dim, dtype=dt, name="head")

    def build(
        self, visible_tokens_shape, keep_indices_shape, context_shape, context_mask_shape=None
    ):
        self.mask_token = self.add_weight(
            shape=(self.width,),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="mask_token",
        )
        self.position_embedding = self.add_weight(
            shape=(self.num_patches, self.width),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="position_embedding",
        )
        self.embed.build(tuple(visible_tokens_shape))
        full = (visible_tokens_shape[0], self.num_patches, self.width)
        for block in self.blocks:
            block.build(full, tuple(context_shape))
        self.ln_out.build(full)
        self.head.build(full)
        self.built = True

    def call(self, visible_tokens, keep_indices, context, context_mask=None, training=None):
        x = self.embed(visible_tokens)  # [B, M, W]
        onehot = ops.one_hot(ops.cast(keep_indices, "int32"), self.num_patches, dtype=x.dtype)
        scattered = ops.einsum("bmn,bmw->bnw", onehot, x)  # visible tokens at their slots
        visible = ops.sum(onehot, axis=1)[..., None]  # [B, N, 1], 1 where visible
        mask_token = ops.cast(self.mask_token, x.dtype)
        x = scattered + (1.0 - visible) * mask_token[None, None, :]
        x = x + ops.cast(self.position_embedding, x.dtype)[None]
        for block in self.blocks:
            x, _ = block(x, context, context_mask=context_mask, training=training)
        return self.head(self.ln_out(x))

    def compute_output_shape(
        self, visible_tokens_shape, keep_indices_shape, context_shape, context_mask_shape=None
    ):
        return (visible_tokens_shape[0], self.num_patches, self.output_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_patches": self.num_patches,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "width": self.width,
                "output_dim": self.output_dim,
                "mlp_dim": self.mlp_dim,
                "dropout": self.dropout_rate,
            }
        )
        return config
