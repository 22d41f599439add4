"""Semantic segmentation probe: a light decoder on the encoder's patch tokens, Dice.

Protocol (MGCA-style, binary per target pathology): the encoder is frozen by default
(`finetune=True` trains it too, then restores it); a light decoder maps the patch-token
grid to a per-pixel logit at the input resolution:
- "setr" (ViT): SETR-PUP-style — 1×1 conv on the token grid, then ×2 bilinear
  upsampling + 3×3 conv stages up to the input size;
- "unet" (ResNet): U-Net-style up-blocks (×2 upsample, concatenate the encoder stage of
  that stride when available — ResNet stride 8 and 4 — then two 3×3 convs).
Loss: BCE + soft Dice (smooth 1). Training uses the train split (a seeded label fraction
when fraction < 1); with a validate split the epoch with the best validation Dice is
kept. Metric on the test split (threshold 0.5 on the sigmoid): "dice" = mean Dice over
test images with a positive ground-truth mask (MGCA's number), "dice_all" = mean over
all test images (empty prediction on an empty mask = 1), "iou" likewise over positives.

Target: on SIIM-style data "Pneumothorax"; on SynthCXR any label with masks ("auto" =
the label with masks on the most training images).
"""

from __future__ import annotations

import logging
import math
import time

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from place_tf.data import schema
from place_tf.evaluate import head_training as ht
from place_tf.evaluate import metrics
from place_tf.evaluate import task_data as td

log = logging.getLogger(__name__)

DECODERS = ("auto", "setr", "unet")


def _conv_bn_relu(filters, kernel, name, repeat=1):
    """(conv -> BN -> ReLU) × repeat as one Sequential (BN follows the training flag)."""
    seq = []
    for r in range(repeat):
        sfx = f"_{r}" if repeat > 1 else ""
        seq += [
            layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"conv{sfx}"),
            layers.BatchNormalization(name=f"bn{sfx}"),
            layers.ReLU(name=f"relu{sfx}"),
        ]
    return keras.Sequential(seq, name=name)


def _num_upsamples(grid_size: int, image_size: int) -> int:
    scale = image_size / grid_size
    if scale < 1:
        raise ValueError(f"token grid {grid_size} is finer than the image {image_size}")
    return int(math.floor(math.log2(scale) + 1e-9))


@keras.saving.register_keras_serializable(package="place_tf")
class SETRDecoder(keras.layers.Layer):
    """SETR-PUP-style: grid [B,g,g,W] -> logits [B,S,S,num_classes] (S = image_size)."""

    def __init__(self, image_size, num_classes=1, width=64, **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.norm = layers.LayerNormalization(epsilon=1e-6, name="token_norm")
        self.stem = _conv_bn_relu(self.width, 1, "stem")
        self.stages = []
        self.head = layers.Conv2D(self.num_classes, 1, name="logits")

    def build(self, grid_shape, skip_shapes=None):
        g = int(grid_shape[1])
        n_up = _num_upsamples(g, self.image_size)
        self.stages = [_conv_bn_relu(self.width, 3, f"up{i}") for i in range(n_up)]
        shape = tuple(grid_shape)
        self.norm.build(shape)
        self.stem.build(shape)
        shape = self.stem.compute_output_shape(shape)
        for i, stage in enumerate(self.stages):
            r = g * 2 ** (i + 1)
            stage.build((shape[0], r, r, shape[3]))
            shape = stage.compute_output_shape((shape[0], r, r, shape[3]))
        self.head.build(shape)
        self.built = True

    def call(self, grid, skips=None, training=None):
        x = self.stem(self.norm(grid), training=training)
        for stage in self.stages:
            x = ops.image.resize(x, (2 * x.shape[1], 2 * x.shape[2]), interpolation="bilinear")
            x = stage(x, training=training)
        if x.shape[1] != self.image_size:
            x = ops.image.resize(x, (self.image_size, self.image_size), interpolation="bilinear")
        return self.head(x)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"image_size": self.image_size, "num_classes": self.num_classes, "width": self.width}
        )
        return config


@keras.saving.register_keras_serializable(package="place_tf")
class UNetDecoder(keras.layers.Layer):
    """U-Net-style up path: grid [B,g,g,W] (+ skips coarse to fine, each at 2× the
    previous resolution) -> logits [B,S,S,num_classes]. Widths halve per stage."""

    def __init__(self, image_size, num_classes=1, width=64, min_width=16, **kwargs):
        super().__init__(**kwargs)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.min_width = int(min_width)
        self.norm = layers.LayerNormalization(epsilon=1e-6, name="token_norm")
        self.stem = _conv_bn_relu(self.width, 1, "stem")
        self.blocks = []
        self.head = layers.Conv2D(self.num_classes, 1, name="logits")

    def _stage_width(self, i):
        return max(self.min_width, self.width // 2 ** (i + 1))

    def build(self, grid_shape, skip_shapes=None):
        skip_shapes = list(skip_shapes or [])
        g = int(grid_shape[1])
        n_up = _num_upsamples(g, self.image_size)
        self.blocks = [
            _conv_bn_relu(self._stage_width(i), 3, f"up{i}", repeat=2) for i in range(n_up)
        ]
        shape = tuple(grid_shape)
        self.norm.build(shape)
        self.stem.build(shape)
        shape = self.stem.compute_output_shape(shape)
        for i, block in enumerate(self.blocks):
            r = g * 2 ** (i + 1)
            extra = int(skip_shapes[i][-1]) if i < len(skip_shapes) else 0
            shape = (shape[0], r, r, shape[3] + extra)
            block.build(shape)
            shape = block.compute_output_shape(shape)
        self.head.build(shape)
        self.built = True

    def call(self, grid, skips=None, training=None):
        skips = list(skips or [])
        x = self.stem(self.norm(grid), training=training)
        for i, block in enumerate(self.blocks):
            x = ops.image.resize(x, (2 * x.shape[1], 2 * x.shape[2]), interpolation="bilinear")
            if i < len(skips):
                s = skips[i]
                if s.shape[1] != x.shape[1]:
                    raise ValueError(
                        f"U-Net skip {i} has resolution {s.shape[1]}, expected {x.shape[1]}"
                    )
                x = ops.concatenate([x, ops.cast(s, x.dtype)], axis=-1)
            x = block(x, training=training)
        if x.shape[1] != self.image_size:
            x = ops.image.resize(x, (self.image_size, self.image_size), interpolation="bilinear")
        return self.head(x)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "image_size": self.image_size,
                "num_classes": self.num_classes,
                "width": self.width,
                "min_width": self.min_width,
            }
        )
        return config


def build_decoder(kind: str, image_size: int, num_classes: int = 1, width: int = 64):
    if kind == "setr":
        return SETRDecoder(image_size, num_classes, width, name="setr_decoder")
    if kind == "unet":
        return UNetDecoder(image_size, num_classes, width, name="unet_decoder")
    raise ValueError(f"segmentation decoder must be one of {DECODERS}, got {kind!r}")


def dice_bce_loss(y_true, logits, smooth: float = 1.0):
    """BCE (mean over pixels) + soft Dice loss (1 - Dice per image and channel, mean)."""
    y = tf.cast(y_true, tf.float32)
    logits = tf.cast(logits, tf.float32)
    bce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits))
    p = tf.sigmoid(logits)
    inter = tf.reduce_sum(p * y, axis=[1, 2])
    denom = tf.reduce_sum(p, axis=[1, 2]) + tf.reduce_sum(y, axis=[1, 2])
    soft_dice = (2.0 * inter + smooth) / (denom + smooth)
    return bce + tf.reduce_mean(1.0 - soft_dice)


def _resolve_target(target, data_dir):
    if isinstance(target, str) and target.strip().lower() in ("auto", ""):
        labels = td.resolve_labels("auto", data_dir, "mask")
        return [labels[0]], schema.CHEXPERT_LABELS[labels[0]]
    if isinstance(target, str) and target.strip().lower() == "union":
        return None, "union"
    labels = td.resolve_labels(target, data_dir, "mask")
    name = "+".join(schema.CHEXPERT_LABELS[i] for i in labels)
    return labels, name


def evaluate(
    model,
    data_dir: str,
    *,
    image_size: int | None = None,
    seed: int = 0,
    fraction: float = 1.0,
    target="auto",
    decoder: str = "auto",
    finetune: bool = False,
    epochs: int = 20,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    encoder_learning_rate: float = 1e-5,
    weight_decay: float = 1e-4,
    decoder_width: int = 64,
    threshold: float = 0.5,
    select_on_validation: bool = True,
    split: str = "test",
    **unused,
) -> dict:
    """Train a segmentation decoder on `data_dir`'s train split and report Dice on `split`.

    target: "auto" | a CheXpert name | comma-separated names / list (their masks are
    united into one binary target) | "union" (every mask). decoder: "auto" (unet for a
    ResNet encoder, else setr) | "setr" | "unet".
    """
    unused.pop("tokenizer", None)  # the CLI passes it to every task
    if unused:
        log.info("segmentation: ignoring options %s", sorted(unused))
    t0 = time.time()
    fraction = 1.0 if fraction is None else float(fraction)
    image_size = td.check_image_size(model, image_size)
    labels, target_name = _resolve_target(target, data_dir)
    feats = td.TaskFeatures(model, finetune=finetune, with_skips=True)
    if decoder == "auto":
        decoder = "unet" if feats.kind == "resnet50" else "setr"
    keras.utils.set_random_seed(seed)
    ids = td.fraction_ids(data_dir, fraction, seed)

    def data(which, ids_=None):
        return td.segmentation_dataset(data_dir, which, image_size, labels, True, ids_)

    n_train = td.count_examples(data_dir, "train", ids)
    if n_train == 0:
        raise ValueError(f"{data_dir}: no training examples for segmentation")
    train = td.maybe_cache(data("train", ids), n_train, 8 * image_size**2)
    train = train.shuffle(td.shuffle_buffer(n_train), seed=seed, reshuffle_each_iteration=True)
    train = train.batch(batch_size).prefetch(2)
    val = (
        data("validate").batch(batch_size).cache()
        if (select_on_validation and td.has_split(data_dir, "validate"))
        else None
    )
    test = data(split).batch(batch_size)

    grid_shape, skip_shapes = feats.shapes()
    head = build_decoder(decoder, image_size, 1, decoder_width)
    head.build(grid_shape, skip_shapes if decoder == "unet" else None)
    spec = feats.image_spec(image_size)
    opt = ht.HeadOptimizer.for_task(head, feats, learning_rate, encoder_learning_rate, weight_decay)

    @tf.function(input_signature=[spec, spec], autograph=False)
    def train_step(images, masks):
        with tf.GradientTape() as tape:
            g, sk = feats(images, training=True)
            loss = dice_bce_loss(masks, head(g, sk, training=True))
        opt.apply(tape.gradient(loss, opt.variables))
        return loss

    @tf.function(input_signature=[spec], autograph=False)
    def predict_step(images):
        g, sk = feats(images, training=False)
        return tf.sigmoid(head(g, sk, training=False))

    def score(ds):
        preds, gts = [], []
        for images, masks in ds:
            preds.append(predict_step(images).numpy()[..., 0] >= threshold)
            gts.append(masks.numpy()[..., 0] > 0.5)
        return _dice_summary(np.concatenate(preds), np.concatenate(gts))

    def validate():
        v = score(val)
        return v["dice_all"] if math.isnan(v["dice"]) else v["dice"]

    try:
        history, best_val = ht.fit_selecting_on_validation(
            "segmentation",
            epochs,
            lambda: {"loss": float(np.mean([float(train_step(x, y)) for x, y in train]))},
            validate if val is not None else None,
            opt.tracked,
            "val_dice",
        )
        result = score(test)
    finally:
        feats.restore()
    result.update(
        {
            "task": "segmentation",
            "target": target_name,
            "split": split,
            "decoder": decoder,
            "finetune": bool(finetune),
            "fraction": float(fraction),
            "seed": int(seed),
            "image_size": int(image_size),
            "epochs": int(epochs),
            "train_examples": int(n_train),
            "final_loss": history[-1]["loss"] if history else float("nan"),
            "best_val_dice": best_val,
            "history": history,
            "seconds": round(time.time() - t0, 1),
        }
    )
    return result


def _dice_summary(pred: np.ndarray, gt: np.ndarray) -> dict:
    """pred, gt bool [N, H, W] -> dice / iou over positive images, dice over all."""
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"masks must be equal [N, H, W], got {pred.shape} and {gt.shape}")
    pos = gt.reshape(len(gt), -1).any(axis=1)
    dices = np.array([metrics.dice(p, g) for p, g in zip(pred, gt, strict=True)])
    ious = np.array([metrics.iou(p, g) for p, g in zip(pred, gt, strict=True)])
    return {
        "dice": float(dices[pos].mean()) if pos.any() else float("nan"),
        "iou": float(ious[pos].mean()) if pos.any() else float("nan"),
        "dice_all": float(dices.mean()) if len(dices) else float("nan"),
        "test_examples": int(len(gt)),
        "test_positive": int(pos.sum()),
    }


def format_table(result: dict) -> str:
    """Markdown table of a segmentation result."""
    from place_tf.evaluate.embeddings import fmt

    head = "| target | decoder | encoder | fraction | Dice (pos) | IoU (pos) | Dice (all) | test (pos) |"
    rule = "|---|---|---|---|---|---|---|---|"
    row = (
        f"| {result.get('target', '-')} | {result.get('decoder', '-')} | "
        f"{'fine-tuned' if result.get('finetune') else 'frozen'} | "
        f"{fmt(result.get('fraction'), 2)} | {fmt(result.get('dice'))} | "
        f"{fmt(result.get('iou'))} | {fmt(result.get('dice_all'))} | "
        f"{result.get('test_examples', '-')} ({result.get('test_positive', '-')}) |"
    )
    return "\n".join([head, rule, row])
