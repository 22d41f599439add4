"""MGCA baseline heads: token-wise cross-attention (CTA inputs) and the prototype layer (CPA).

Follows MGCA (Wang et al., NeurIPS 2022): local image and word embeddings (already
projected and L2-normalised by the caller) attend to each other with single-head
attention — each word gathers the image patches (`attn_img_for_txt` [B,L,D]) and each
patch gathers the words (`attn_txt_for_img` [B,N,D], padding words masked out). Outputs
are L2-normalised, as MGCA normalises them before its token-wise InfoNCE.
`TokenCrossAttention` is the LEARNED variant (ObjectiveConfig.cta_attention="learned", MGCA's
`use_local_atten=True` branch); MGCA's code runs by default without learned attention,
which is `losses.mgca.cta_parameter_free_per_example` (the "mgca" preset). Prototypes are
a [P, D] weight returned L2-normalised (MGCA renormalises its prototype Linear each step
in place, so its gradient does not pass through the normalisation as it does here).
"""

from __future__ import annotations

import keras
from keras import ops

from place_tf.models.layers.observation_extractor import query_attention_mask
from place_tf.models.layers.projection_head import l2_normalize


@keras.saving.register_keras_serializable(package="place_tf")
class TokenCrossAttention(keras.layers.Layer):
    """call(image_tokens [B,N,D], text_tokens [B,L,D], text_mask [B,L] bool or None)
    -> (attn_img_for_txt [B,L,D], attn_txt_for_img [B,N,D]), both L2-normalised float32.
    """

    def __init__(self, num_heads=1, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.dropout_rate = float(dropout)
        self.word_attn = None  # created in build: the key width comes from the inputs
        self.patch_attn = None

    def build(self, image_tokens_shape, text_tokens_shape, text_mask_shape=None):
        dim = int(image_tokens_shape[-1])
        if int(text_tokens_shape[-1]) != dim:
            raise ValueError(
                f"TokenCrossAttention needs equal widths, got image {dim} and "
                f"text {text_tokens_shape[-1]}"
            )
        if dim % self.num_heads:
            raise ValueError(f"width {dim} must be divisible by num_heads {self.num_heads}")
        key_dim = dim // self.num_heads
        dt = self.dtype_policy
        self.word_attn = keras.layers.MultiHeadAttention(
            self.num_heads, key_dim, dropout=self.dropout_rate, dtype=dt, name="word_attn"
        )
        self.patch_attn = keras.layers.MultiHeadAttention(
            self.num_heads, key_dim, dropout=self.dropout_rate, dtype=dt, name="patch_attn"
        )
        self.word_attn.build(tuple(text_tokens_shape), tuple(image_tokens_shape))
        self.patch_attn.build(tuple(image_tokens_shape), tuple(text_tokens_shape))
        self.built = True

    def call(self, image_tokens, text_tokens, text_mask=None, training=None):
        img_for_txt = self.word_attn(text_tokens, image_tokens, training=training)
        txt_for_img = self.patch_attn(
            image_tokens,
            text_tokens,
            attention_mask=query_attention_mask(text_mask, image_tokens.shape[1]),
            training=training,
        )
        return l2_normalize(img_for_txt), l2_normalize(txt_for_img)

    def compute_output_shape(self, image_tokens_shape, text_tokens_shape, text_mask_shape=None):
        return tuple(text_tokens_shape), tuple(image_tokens_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"num_heads": self.num_heads, "dropout": self.dropout_rate})
        return config


@keras.saving.register_keras_serializable(package="place_tf")
class PrototypeLayer(keras.layers.Layer):
    """P learnable prototypes of width D; call() returns them L2-normalised, [P, D] float32.

    The input of `call` is ignored except to trigger the build (any tensor works).
    """

    def __init__(self, num_prototypes, dim, **kwargs):
        super().__init__(**kwargs)
        self.num_prototypes = int(num_prototypes)
        self.dim = int(dim)

    def build(self, input_shape=None):
        self.prototypes = self.add_weight(
            shape=(self.num_prototypes, self.dim),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
            name="prototypes",
        )
        self.built = True

    def call(self, inputs=None):
        return l2_normalize(ops.convert_to_tensor(self.prototypes))

    def compute_output_shape(self, input_shape=None):
        return (self.num_prototypes, self.dim)

    def get_config(self):
        config = super().get_config()
        config.update({"num_prototypes": self.num_prototypes, "dim": self.dim})
        return config
