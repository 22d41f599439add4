"""VPOE / T-POR: learnable pathology queries read out K observations from a token sequence.

[design] (place-method.md §2-3): `K` learnable queries go through `num_layers` pre-LN
transformer decoder blocks (query self-attention → cross-attention to the tokens with a
key padding mask → MLP). The query embedding is a separate layer (`LearnedQueries`) that
the model creates ONCE and passes to both the image and the text extractor, so slot `k`
means the same latent pathology in both modalities; the attention weights are separate
per modality. The cross-attention of the last block, averaged over heads, is returned as
the K×N attention map (localisation scores, visualisation).
"""

from __future__ import annotations

import keras
from keras import ops


def query_attention_mask(context_mask, num_queries):
    """[B, S] bool key padding mask → [B, T, S] MHA attention mask (None stays None)."""
    if context_mask is None:
        return None
    mask = ops.cast(context_mask, "bool")[:, None, :]
    return ops.repeat(mask, num_queries, axis=1)


@keras.saving.register_keras_serializable(package="place_tf")
class LearnedQueries(keras.layers.Layer):
    """K learnable query vectors [K, W]; call(reference [B, ...]) tiles them to [B, K, W]."""

    def __init__(self, num_queries, width, **kwargs):
        super().__init__(**kwargs)
        self.num_queries = int(num_queries)
        self.width = int(width)

    def build(self, input_shape=None):
        self.queries = self.add_weight(
            shape=(self.num_queries, self.width),
            initializer=keras.initializers.TruncatedNormal(stddev=0.02),
            name="queries",
        )
        self.built = True

    def call(self, reference):
        batch = ops.shape(reference)[0]
        q = ops.convert_to_tensor(self.queries)
        return ops.broadcast_to(q[None], (batch, self.num_queries, self.width))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_queries, self.width)

    def get_config(self):
        config = super().get_config()
        config.update({"num_queries": self.num_queries, "width": self.width})
        return config


@keras.saving.register_keras_serializable(package="place_tf")
class CrossAttentionBlock(keras.layers.Layer):
    """Pre-LN decoder block: [self-attention] → cross-attention (masked) → MLP, residuals.

    call(query [B,T,W], context [B,S,C], context_mask [B,S] bool or None)
      -> (output [B,T,W], cross-attention weights averaged over heads [B,T,S], float32)
    """

    def __init__(
        self,
        num_heads,
        width,
        mlp_dim=0,
        dropout=0.0,
        self_attention=True,
        layer_norm_epsilon=1e-6,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if width % num_heads:
            raise ValueError(f"width {width} must be divisible by num_heads {num_heads}")
        self.num_heads = int(num_heads)
        self.width = int(width)
        self.mlp_dim = int(mlp_dim) or 4 * self.width
        self.dropout_rate = float(dropout)
        self.self_attention = bool(self_attention)
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        key_dim = self.width // self.num_heads
        dt = self.dtype_policy
        eps = self.layer_norm_epsilon
        if self.self_attention:
            self.ln_self = keras.layers.LayerNormalization(epsilon=eps, dtype=dt, name="ln_self")
            self.self_attn = keras.layers.MultiHeadAttention(
                self.num_heads, key_dim, dropout=self.dropout_rate, dtype=dt, name="self_attn"
            )
        self.ln_query = keras.layers.LayerNormalization(epsilon=eps, dtype=dt, name="ln_query")
        self.ln_context = keras.layers.LayerNormalization(epsilon=eps, dtype=dt, name="ln_context")
        self.cross_attn = keras.layers.MultiHeadAttention(
            self.num_heads, key_dim, dropout=self.dropout_rate, dtype=dt, name="cross_attn"
        )
        self.ln_mlp = keras.layers.LayerNormalization(epsilon=eps, dtype=dt, name="ln_mlp")
        self.mlp_in = keras.layers.Dense(self.mlp_dim, activation="gelu", dtype=dt, name="mlp_in")
        self.mlp_out = keras.layers.Dense(self.width, dtype=dt, name="mlp_out")
        self.drop = keras.layers.Dropout(self.dropout_rate, dtype=dt, name="dropout")

    def build(self, query_shape, context_shape, context_mask_shape=None):
        query_shape = tuple(query_shape)
        context_shape = tuple(context_shape)
        if self.self_attention:
            self.ln_self.build(query_shape)
            self.self_attn.build(query_shape, query_shape)
        self.ln_query.build(query_shape)
        self.ln_context.build(context_shape)
        self.cross_attn.build(query_shape, context_shape)
        self.ln_mlp.build(query_shape)
        self.mlp_in.build(query_shape)
        self.mlp_out.build(query_shape[:-1] + (self.mlp_dim,))
        self.built = True

    def call(self, query, context, context_mask=None, training=None):
        x = query
        if self.self_attention:
            h = self.ln_self(x)
            h = self.self_attn(h, h, training=training)
            x = x + self.drop(h, training=training)
        h = self.ln_query(x)
        ctx = self.ln_context(context)
        h, scores = self.cross_attn(
            h,
            ctx,
            attention_mask=query_attention_mask(context_mask, query.shape[1]),
            return_attention_scores=True,
            training=training,
        )
        x = x + self.drop(h, training=training)
        h = self.mlp_out(self.mlp_in(self.ln_mlp(x)))
        x = x + self.drop(h, training=training)
        attn = ops.mean(ops.cast(scores, "float32"), axis=1)  # [B, T, S]
        return x, attn

    def compute_output_shape(self, query_shape, context_shape, context_mask_shape=None):
        return tuple(query_shape), tuple(query_shape)[:-1] + (context_shape[1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "width": self.width,
                "mlp_dim": self.mlp_dim,
                "dropout": self.dropout_rate,
                "self_attention": self.self_attention,
                "layer_norm_epsilon": self.layer_norm_epsilon,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="place_tf")
class ObservationExtractor(keras.layers.Layer):
    """K pathology observations from tokens, driven by externally owned queries.

    call(tokens [B,N,C], queries [B,K,W], token_mask [B,N] bool or None)
      -> (observations [B,K,W], attention_maps [B,K,N] float32, rows sum to 1 over
          the unmasked tokens; last block's cross-attention averaged over heads)
    """

    def __init__(self, num_layers, num_heads, width, mlp_dim=0, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        if num_layers < 1:
            raise ValueError(f"ObservationExtractor needs num_layers >= 1, got {num_layers}")
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.width = int(width)
        self.mlp_dim = int(mlp_dim) or 4 * self.width
        self.dropout_rate = float(dropout)
        self.blocks = [
            CrossAttentionBlock(
                self.num_heads,
                self.width,
                self.mlp_dim,
                self.dropout_rate,
                self_attention=True,
                dtype=self.dtype_policy,
                name=f"block_{i}",
            )
            for i in range(self.num_layers)
        ]
        self.ln_out = keras.layers.LayerNormalization(
            epsilon=1e-6, dtype=self.dtype_policy, name="ln_out"
        )

    def build(self, tokens_shape, queries_shape, token_mask_shape=None):
        for block in self.blocks:
            block.build(queries_shape, tokens_shape)
        self.ln_out.build(tuple(queries_shape))
        self.built = True

    def call(self, tokens, queries, token_mask=None, training=None):
        x = ops.cast(queries, self.compute_dtype)
        attn = None
        for block in self.blocks:
            x, attn = block(x, tokens, context_mask=token_mask, training=training)
        return self.ln_out(x), attn

    def compute_output_shape(self, tokens_shape, queries_shape, token_mask_shape=None):
        return tuple(queries_shape), tuple(queries_shape)[:-1] + (tokens_shape[1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "width": self.width,
                "mlp_dim": self.mlp_dim,
                "dropout": self.dropout_rate,
            }
        )
        return config
