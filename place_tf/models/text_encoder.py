"""Report encoder: BERT over WordPiece ids → (global [B,W], token states [B,L,W], mask).

Wraps keras_hub's `BertBackbone`. The global feature (`pooling`) is either the mean of the
last layer's states over the report's tokens ("mean", default) or the [CLS] state ("cls",
as MGCA uses with a pre-trained BERT). Why mean by default: in a randomly initialised BERT
the [CLS] state is nearly the same for every report (cosine 0.99997 across a SynthCXR
batch, measured), so a from-scratch contrastive run starts with constant text embeddings
and collapses (ITA stuck at ln B); the mean over tokens differs per report from step 0,
and works as well with a pre-trained BERT. BERT's `pooled_dense` (tanh) head is not used, so it is frozen (a trainable
weight that never gets a gradient would trip optimizers and gradient checks). Segment ids
are all 0. Optional init from a pre-trained BERT checkpoint (keras-hub preset or Hugging
Face BERT, see place_tf.pretrained and image_encoders): the first num_layers layers are
kept (MGCA: 6 of BioClinicalBERT's 12), a longer position table is truncated, and the
vocabulary is the checkpoint's (place_tf.data.tokenizer.report_tokenizer).
"""

from __future__ import annotations

import keras
import keras_hub
from keras import ops

from place_tf.models.image_encoders import load_preset_weights

POOLINGS = ("mean", "cls")


@keras.saving.register_keras_serializable(package="place_tf")
class TextEncoder(keras.layers.Layer):
    """call(token_ids [B,L] int, padding_mask [B,L] bool)
    -> (global [B,W], token_states [B,L,W], padding_mask [B,L] bool)."""

    def __init__(
        self,
        vocabulary_size=30522,
        num_layers=6,
        num_heads=12,
        hidden_dim=768,
        intermediate_dim=3072,
        max_sequence_length=112,
        dropout=0.0,
        init_from="",
        pooling="mean",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"text pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.vocabulary_size = int(vocabulary_size)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.hidden_dim = int(hidden_dim)
        self.intermediate_dim = int(intermediate_dim)
        self.max_sequence_length = int(max_sequence_length)
        self.dropout_rate = float(dropout)
        self.init_from = init_from or ""
        self.backbone = keras_hub.models.BertBackbone(
            vocabulary_size=self.vocabulary_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            hidden_dim=self.hidden_dim,
            intermediate_dim=self.intermediate_dim,
            dropout=self.dropout_rate,
            max_sequence_length=self.max_sequence_length,
            dtype=self.dtype_policy,
            name="bert_backbone",
        )
        if self.init_from:
            load_preset_weights(self.backbone, self.init_from, "text encoder", "bert")
        self.backbone.get_layer("pooled_dense").trainable = False

    @property
    def global_dim(self) -> int:
        return self.hidden_dim

    @property
    def token_dim(self) -> int:
        return self.hidden_dim

    def build(self, input_shape=None):
        self.built = True  # functional backbone: built at construction

    def call(self, token_ids, padding_mask, training=None):
        token_ids = ops.cast(token_ids, "int32")
        mask = ops.cast(padding_mask, "bool")
        out = self.backbone(
            {
                "token_ids": token_ids,
                "segment_ids": ops.zeros_like(token_ids),
                "padding_mask": ops.cast(mask, "int32"),
            },
            training=training,
        )
        states = out["sequence_output"]
        if self.pooling == "cls":
            return states[:, 0], states, mask
        weights = ops.cast(mask, states.dtype)[..., None]
        pooled = ops.sum(states * weights, axis=1) / ops.maximum(ops.sum(weights, axis=1), 1.0)
        return pooled, states, mask

    def compute_output_shape(self, token_ids_shape, padding_mask_shape=None):
        b, length = token_ids_shape
        return (b, self.hidden_dim), (b, length, self.hidden_dim), (b, length)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "max_sequence_length": self.max_sequence_length,
                "dropout": self.dropout_rate,
                "init_from": self.init_from,
                "pooling": self.pooling,
            }
        )
        return config


def build_text_encoder(model_config, init: bool = True, name: str = "text_encoder"):
    """The BERT encoder ModelConfig asks for (`init=False` skips the preset weights)."""
    return TextEncoder(
        vocabulary_size=model_config.vocab_size,
        num_layers=model_config.text_layers,
        num_heads=model_config.text_heads,
        hidden_dim=model_config.text_width,
        intermediate_dim=model_config.text_mlp,
        max_sequence_length=model_config.max_length,
        dropout=model_config.dropout,
        init_from=model_config.text_init if init else "",
        pooling=model_config.text_pooling,
        name=name,
    )
