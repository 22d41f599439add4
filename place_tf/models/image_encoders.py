"""Image encoders: a 1-channel radiograph → (global feature [B, G], local tokens [B, N, W]).

- `ViTImageEncoder` wraps keras_hub's `ViTBackbone` (ViT-B/16 by default, as MGCA): the
  global feature is the CLS token, the local tokens are the N patch tokens.
  `encode_patches(images, keep_indices)` runs the backbone's own patch embedding and
  position embedding, keeps only the given patches, then runs the backbone's transformer
  on CLS + kept tokens (MAE-style, weights shared with the plain forward). With
  `keep_indices=None` it equals the plain forward.
- `ResNetImageEncoder` wraps keras_hub's `ResNetBackbone` with the ResNet-50 layout: the
  global feature is the average-pooled last stage [B, 2048]; the local tokens are the
  stride-16 stage ("layer3" in torchvision naming, keras_hub pyramid output P4,
  1024 channels) flattened and projected to `token_dim`. A CNN cannot drop tokens, so
  `encode_patches` zeroes the masked 16×16 cells of the input (0 is mid-grey after the
  (x/255-0.5)/0.5 normalisation) and returns the tokens at the kept cells.

Optional initialisation from a pre-trained checkpoint (`init_from`: a keras-hub preset
name, `kaggle://` / `hf://` handle or a local keras-hub or Hugging Face directory; see
place_tf.pretrained): the encoder is always built from its own arguments (which
`pretrained.resolve_model_config` takes from the checkpoint), then the checkpoint's
weights, loaded and converted by keras-hub, are copied in by variable path:
- grayscale input, fed as the RGB checkpoint expects: our pixels arrive as
  x = (p - 0.5) / 0.5 in one channel; the checkpoint wants p·scale_c + offset_c in each
  of 3 channels (its own normalisation). The ViT patch embedding is linear and unpadded,
  so replicating the channel and renormalising equals folding both into the kernel and
  bias: kernel' = Σ_c kernel_c·scale_c/2, bias' = bias + Σ kernel_c·(scale_c/2 + offset_c)
  (exact). A ResNet stem kernel is summed over its channels (zero padding makes the
  offset fold inexact at the borders);
- ViT position embeddings are interpolated (bicubic, the class token kept) when
  image_size / patch_size differs from the checkpoint's grid;
- a longer BERT position table is truncated; the first text_layers layers are kept.
Any other shape difference fails before training, naming the checkpoint, the weight and
both shapes.
"""

from __future__ import annotations

import logging

import keras
import keras_hub
import numpy as np
import tensorflow as tf
from keras import ops

from place_tf import pretrained

log = logging.getLogger(__name__)

RESNET_TOKEN_STRIDE = 16  # P4 / "layer3": one local token per 16×16 pixel cell


def _interpolate_positions(value: np.ndarray, rows: int) -> np.ndarray:
    """ViT position table [1 + g0², W] → [1 + g², W]: the grid part resized bicubically."""
    g0, g = int(round((value.shape[0] - 1) ** 0.5)), int(round((rows - 1) ** 0.5))
    grid = value[1:].reshape(1, g0, g0, value.shape[1])
    grid = tf.image.resize(grid, (g, g), method="bicubic").numpy().reshape(g * g, -1)
    return np.concatenate([value[:1], grid.astype(value.dtype)], axis=0)


def _is_square_grid(n: int) -> bool:
    return n > 0 and int(round(n**0.5)) ** 2 == n


def _adapt(value: np.ndarray, shape: tuple, path: str, preset: str) -> np.ndarray:
    """Fit a checkpoint weight into a target variable of `shape`, or raise naming both."""
    if tuple(value.shape) == shape:
        return value
    # RGB stem / patch-embedding kernel [kh, kw, 3, out] → grayscale [kh, kw, 1, out].
    if (
        value.ndim == 4
        and len(shape) == 4
        and value.shape[:2] == shape[:2]
        and value.shape[3] == shape[3]
        and shape[2] == 1
    ):
        return value.sum(axis=2, keepdims=True)
    # ViT position table of another grid (image_size / patch_size): interpolate.
    if (
        path.startswith("vit_patching_and_embedding/position_embedding")
        and value.ndim == 2
        and len(shape) == 2
        and value.shape[1] == shape[1]
        and _is_square_grid(value.shape[0] - 1)
        and _is_square_grid(shape[0] - 1)
    ):
        return _interpolate_positions(value, shape[0])
    # Longer learned position table (BERT 512 → max_length): keep the first rows.
    if (
        "position" in path
        and value.ndim == 2
        and len(shape) == 2
        and value.shape[1] == shape[1]
        and value.shape[0] > shape[0]
        and "vit" not in path
    ):
        return value[: shape[0]]
    raise pretrained.CheckpointError(
        f"checkpoint {preset!r}: weight {path!r} has shape {tuple(value.shape)}, the model "
        f"needs {shape}; make the model settings match the checkpoint's architecture"
    )


def fold_grayscale_patch_embedding(kernel, bias, scale, offset):
    """(kernel [kh,kw,1,W], bias [W]) on our grayscale input x = 2p - 1 that equal the RGB
    patch embedding (kernel [kh,kw,C,W], bias) on the checkpoint's input p·scale + offset."""
    scale = np.asarray(scale, kernel.dtype)
    offset = np.asarray(offset, kernel.dtype)
    folded = (kernel * (scale / 2)[None, None, :, None]).sum(axis=2, keepdims=True)
    shift = (kernel * (scale / 2 + offset)[None, None, :, None]).sum(axis=(0, 1, 2))
    return folded, bias + shift


def load_preset_weights(
    target: keras.Model, handle: str, what: str, family: str, overrides: dict | None = None
) -> None:
    """Copy the weights of checkpoint `handle` into `target` (a built keras-hub backbone);
    `overrides` maps a variable path to a value that replaces the checkpoint's."""
    source = pretrained.load_backbone(handle, what, family)
    values = {w.path: np.asarray(w.numpy()) for w in source.weights}
    values.update(overrides(values) if overrides else {})
    used = set()
    for w in target.weights:
        if w.path not in values:
            raise pretrained.CheckpointError(
                f"checkpoint {handle!r} has no weight {w.path!r} needed by the {what}; "
                "make the model settings match the checkpoint's architecture"
            )
        used.add(w.path)
        w.assign(_adapt(values[w.path], tuple(w.shape), w.path, handle))
    unused = sorted(set(values) - used)
    if unused:
        log.info("%s: %d checkpoint weights unused (e.g. %s)", what, len(unused), unused[0])
    log.info("%s initialised from checkpoint %s", what, handle)


PATCH_KERNEL = "vit_patching_and_embedding/patch_embedding/kernel"
PATCH_BIAS = "vit_patching_and_embedding/patch_embedding/bias"


def _vit_grayscale_overrides(handle: str):
    """Checkpoint values → the folded grayscale patch embedding (see module docstring)."""

    def overrides(values: dict) -> dict:
        kernel = values.get(PATCH_KERNEL)
        if kernel is None or kernel.shape[2] == 1 or PATCH_BIAS not in values:
            return {}
        scale, offset = pretrained.image_normalisation(handle, "vit", kernel.shape[2])
        folded, bias = fold_grayscale_patch_embedding(kernel, values[PATCH_BIAS], scale, offset)
        return {PATCH_KERNEL: folded, PATCH_BIAS: bias}

    return overrides


@keras.saving.register_keras_serializable(package="place_tf")
class ViTImageEncoder(keras.layers.Layer):
    """ViT over 1-channel images: call(images [B,S,S,1]) -> (CLS [B,W], patches [B,N,W])."""

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
        dropout=0.0,
        init_from="",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.hidden_dim = int(hidden_dim)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout)
        self.init_from = init_from or ""
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by patch_size {self.patch_size}"
            )
        self.backbone = keras_hub.models.ViTBackbone(
            image_shape=(self.image_size, self.image_size, 1),
            patch_size=self.patch_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            hidden_dim=self.hidden_dim,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype_policy,
            name="vit_backbone",
        )
        if self.init_from:
            load_preset_weights(
                self.backbone,
                self.init_from,
                "image encoder",
                "vit",
                overrides=_vit_grayscale_overrides(self.init_from),
            )

    # Looked up on use, not stored: a second attribute would track the layers twice.
    @property
    def _embedding(self):
        return self.backbone.get_layer("vit_patching_and_embedding")

    @property
    def _encoder(self):
        return self.backbone.get_layer("vit_encoder")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def global_dim(self) -> int:
        return self.hidden_dim

    @property
    def token_dim(self) -> int:
        return self.hidden_dim

    def build(self, input_shape=None):
        self.built = True  # the keras-hub backbone is functional: built at construction

    def call(self, images, training=None):
        x = self.backbone(images, training=training)
        return x[:, 0], x[:, 1:]

    def encode_patches(self, images, keep_indices=None, training=None):
        """(CLS [B,W], tokens of the kept patches [B,M,W]); keep_indices [B,M] int or None."""
        emb = self._embedding
        x = emb.patch_embedding(images)  # [B, h, w, W]
        x = ops.reshape(x, (-1, self.num_patches, self.hidden_dim))
        pos = emb.position_embedding(emb.position_ids)  # [1, 1 + N, W]
        pos = ops.cast(pos, x.dtype)
        x = x + pos[:, 1:]
        if keep_indices is not None:
            idx = ops.cast(keep_indices, "int32")[..., None]
            x = ops.take_along_axis(x, idx, axis=1)
        cls = ops.cast(emb.class_token, x.dtype) + pos[:, :1]
        cls = ops.broadcast_to(cls, (ops.shape(x)[0], 1, self.hidden_dim))
        x = self._encoder(ops.concatenate([cls, x], axis=1), training=training)
        return x[:, 0], x[:, 1:]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.hidden_dim), (
            input_shape[0],
            self.num_patches,
            self.hidden_dim,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "mlp_dim": self.mlp_dim,
                "dropout": self.dropout_rate,
                "init_from": self.init_from,
            }
        )
        return config


RESNET50 = dict(
    input_conv_filters=[64],
    input_conv_kernel_sizes=[7],
    stackwise_num_filters=[64, 128, 256, 512],
    stackwise_num_blocks=[3, 4, 6, 3],
    stackwise_num_strides=[1, 2, 2, 2],
    block_type="bottleneck_block",
)


@keras.saving.register_keras_serializable(package="place_tf")
class ResNetImageEncoder(keras.layers.Layer):
    """ResNet-50 over 1-channel images: call -> (avg-pool [B,2048], layer3 tokens [B,N,token_dim]).

    N = (image_size / 16)²; image_size must be a multiple of 32.
    """

    def __init__(self, image_size=224, token_dim=768, init_from="", **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.token_dim = int(token_dim)
        self.init_from = init_from or ""
        if self.image_size % 32:
            raise ValueError(f"ResNet image_size {self.image_size} must be a multiple of 32")
        backbone = keras_hub.models.ResNetBackbone(
            **RESNET50,
            image_shape=(self.image_size, self.image_size, 1),
            dtype=self.dtype_policy,
            name="resnet_backbone",
        )
        if self.init_from:
            load_preset_weights(backbone, self.init_from, "image encoder", "resnet50")
        # Only the two-output view is tracked (same layers and weights as the backbone).
        self.features = keras.Model(
            backbone.inputs,
            [backbone.pyramid_outputs["P4"], backbone.output],
            name="resnet_features",
        )
        self.token_projection = keras.layers.Dense(
            self.token_dim, dtype=self.dtype_policy, name="token_projection"
        )

    @property
    def patch_size(self) -> int:
        return RESNET_TOKEN_STRIDE

    @property
    def grid_size(self) -> int:
        return self.image_size // RESNET_TOKEN_STRIDE

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def global_dim(self) -> int:
        return 2048

    def build(self, input_shape=None):
        self.token_projection.build((None, self.num_patches, 1024))
        self.built = True

    def call(self, images, training=None):
        local, last = self.features(images, training=training)
        pooled = ops.mean(last, axis=(1, 2))
        tokens = ops.reshape(local, (-1, self.num_patches, 1024))
        return pooled, self.token_projection(tokens)

    def encode_patches(self, images, keep_indices=None, training=None):
        """Zero the masked 16×16 cells, encode, return (pooled, tokens at kept cells [B,M,W])."""
        if keep_indices is None:
            return self(images, training=training)
        idx = ops.cast(keep_indices, "int32")
        keep = ops.sum(ops.one_hot(idx, self.num_patches, dtype=images.dtype), axis=1)
        g, s = self.grid_size, RESNET_TOKEN_STRIDE
        keep = ops.reshape(keep, (-1, g, 1, g, 1, 1))
        keep = ops.reshape(ops.tile(keep, (1, 1, s, 1, s, 1)), (-1, g * s, g * s, 1))
        pooled, tokens = self(images * keep, training=training)
        return pooled, ops.take_along_axis(tokens, idx[..., None], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 2048), (input_shape[0], self.num_patches, self.token_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_size": self.image_size,
                "token_dim": self.token_dim,
                "init_from": self.init_from,
            }
        )
        return config


def build_image_encoder(model_config, init: bool = True, name: str = "image_encoder"):
    """The image encoder ModelConfig asks for (`init=False` skips the preset weights)."""
    init_from = model_config.image_init if init else ""
    kind = model_config.image_encoder
    if kind == "vit":
        return ViTImageEncoder(
            image_size=model_config.image_size,
            patch_size=model_config.patch_size,
            num_layers=model_config.vit_layers,
            num_heads=model_config.vit_heads,
            hidden_dim=model_config.vit_width,
            mlp_dim=model_config.vit_mlp,
            dropout=model_config.dropout,
            init_from=init_from,
            name=name,
        )
    if kind == "resnet50":
        return ResNetImageEncoder(
            image_size=model_config.image_size,
            token_dim=model_config.vit_width,
            init_from=init_from,
            name=name,
        )
    raise ValueError(f"ModelConfig.image_encoder must be 'vit' or 'resnet50', got {kind!r}")
