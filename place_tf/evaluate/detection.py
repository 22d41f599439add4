"""Object detection probe: an anchor-free (FCOS/CenterNet-style) head on the patch-token grid.

Why this head: it needs no anchors tuned to a dataset, works on one feature map — the
encoder's patch-token grid, frozen by default (`finetune=True` trains the encoder too and
restores it afterwards) — and so treats a ViT and a ResNet alike. (MGCA used YOLOv3 on
ResNet-50 feature maps; keras_hub's RetinaNet wants a multi-level pyramid a ViT lacks.)

Head: LayerNorm + 1×1 conv on the [g, g, W] grid, `upsample` × (×2 bilinear + 3×3 conv),
`num_convs` 3×3 convs, then three 3×3 outputs per cell of the G×G map (G = g·2^upsample):
class logits [C] (sigmoid, focal-loss bias prior 0.01), box [4] and centerness [1].
A cell predicts box centre = cell centre + (dx, dy)·cell, size = cell·exp(lw, lh).

Assignment (per image): a cell is positive for a ground-truth box if its centre lies
inside the box, or it is the cell holding the box centre (so a box smaller than a cell
still gets one); among several boxes the smallest wins. Targets: one-hot class,
the box, and FCOS centerness sqrt(min(l,r)/max(l,r)·min(t,b)/max(t,b)) (1 at the centre
cell). Loss: sigmoid focal (α 0.25, γ 2) over all cells / #positives + (1 - GIoU) + L1 on
the box corners + centerness BCE over positives.

Decoding: score = sqrt(sigmoid(cls)·sigmoid(centerness)); per class, score threshold
then NMS (tf.image.combined_non_max_suppression: tf.image.non_max_suppression per class,
batched). Metric: mAP averaged over IoU 0.40:0.05:0.75 (MGCA's protocol), VOC AP per
class from place_tf.evaluate.metrics, then the mean over classes with test boxes.
Coordinates are normalised in the padded S×S image (IoU does not change under the
resize-with-pad map, so this equals scoring in the stored image).
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

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
CLASS_PRIOR = 0.01
MAX_LOG_SIZE = 8.0


def _conv_bn_relu(filters, kernel, name, repeat=1):
    seq = []
    for r in range(repeat):
        seq += [
            layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"conv_{r}"),
            layers.BatchNormalization(name=f"bn_{r}"),
            layers.ReLU(name=f"relu_{r}"),
        ]
    return keras.Sequential(seq, name=name)


@keras.saving.register_keras_serializable(package="place_tf")
class AnchorFreeHead(keras.layers.Layer):
    """grid [B,g,g,W] -> dict(cls [B,G,G,C] logits, box [B,G,G,4] (dx,dy,lw,lh),
    ctr [B,G,G,1] logits), G = g·2^upsample. See the module docstring."""

    def __init__(self, num_classes, width=64, upsample=1, num_convs=2, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.width = int(width)
        self.upsample = int(upsample)
        self.num_convs = int(num_convs)
        if self.num_classes < 1:
            raise ValueError("AnchorFreeHead needs at least one class")
        self.norm = layers.LayerNormalization(epsilon=1e-6, name="token_norm")
        self.stem = _conv_bn_relu(self.width, 1, "stem")
        self.ups = [_conv_bn_relu(self.width, 3, f"up{i}") for i in range(self.upsample)]
        self.tower = _conv_bn_relu(self.width, 3, "tower", repeat=self.num_convs)
        prior = -math.log((1 - CLASS_PRIOR) / CLASS_PRIOR)
        self.cls_out = layers.Conv2D(
            self.num_classes,
            3,
            padding="same",
            bias_initializer=keras.initializers.Constant(prior),
            name="cls",
        )
        self.box_out = layers.Conv2D(4, 3, padding="same", kernel_initializer="zeros", name="box")
        self.ctr_out = layers.Conv2D(1, 3, padding="same", name="ctr")

    def output_grid(self, grid_size: int) -> int:
        return int(grid_size) * 2**self.upsample

    def build(self, grid_shape):
        shape = tuple(grid_shape)
        self.norm.build(shape)
        self.stem.build(shape)
        shape = self.stem.compute_output_shape(shape)
        for up in self.ups:
            shape = (shape[0], 2 * shape[1], 2 * shape[2], shape[3])
            up.build(shape)
            shape = up.compute_output_shape(shape)
        if self.num_convs:
            self.tower.build(shape)
            shape = self.tower.compute_output_shape(shape)
        for out in (self.cls_out, self.box_out, self.ctr_out):
            out.build(shape)
        self.built = True

    def call(self, grid, training=None):
        x = self.stem(self.norm(grid), training=training)
        for up in self.ups:
            x = ops.image.resize(x, (2 * x.shape[1], 2 * x.shape[2]), interpolation="bilinear")
            x = up(x, training=training)
        if self.num_convs:
            x = self.tower(x, training=training)
        return {"cls": self.cls_out(x), "box": self.box_out(x), "ctr": self.ctr_out(x)}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "width": self.width,
                "upsample": self.upsample,
                "num_convs": self.num_convs,
            }
        )
        return config


# ------------------------------------------------------------------ geometry
def cell_centers(grid: int):
    """[G*G, 2] (x, y) normalised centres of a G×G map, row-major."""
    c = (tf.range(grid, dtype=tf.float32) + 0.5) / grid
    yy, xx = tf.meshgrid(c, c, indexing="ij")
    return tf.stack([tf.reshape(xx, [-1]), tf.reshape(yy, [-1])], axis=-1)


def decode_boxes(box_params, grid: int):
    """[..., G, G, 4] (dx, dy, lw, lh) -> [..., G*G, 4] normalised xyxy boxes."""
    p = tf.reshape(tf.cast(box_params, tf.float32), [-1, grid * grid, 4])
    cell = 1.0 / grid
    centers = cell_centers(grid)[None]
    cxy = centers + p[..., :2] * cell
    wh = cell * tf.exp(tf.clip_by_value(p[..., 2:], -MAX_LOG_SIZE, MAX_LOG_SIZE))
    return tf.concat([cxy - wh / 2, cxy + wh / 2], axis=-1)


def encode_boxes(boxes, grid: int):
    """Inverse of decode_boxes for boxes [G*G, 4] assigned to the cells -> [G*G, 4] params."""
    cell = 1.0 / grid
    centers = cell_centers(grid)
    cxy = (boxes[:, :2] + boxes[:, 2:]) / 2
    wh = tf.maximum(boxes[:, 2:] - boxes[:, :2], 1e-6)
    return tf.concat([(cxy - centers) / cell, tf.math.log(wh / cell)], axis=-1)


def assign_targets(boxes, classes, grid: int, num_classes: int):
    """One image's ground truth -> per-cell targets (see module docstring).

    boxes [M, 4] normalised xyxy, classes [M] int (< 0 = padding) ->
    dict(cls [G,G,C] float, box [G,G,4] xyxy, ctr [G,G,1], pos [G,G] float).
    """
    boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
    classes = tf.reshape(tf.cast(classes, tf.int32), [-1])
    # A dummy box that nothing selects keeps every reduction well defined when M = 0.
    boxes = tf.concat([boxes, tf.zeros([1, 4])], axis=0)
    classes = tf.concat([classes, [-1]], axis=0)
    valid = classes >= 0
    centers = cell_centers(grid)  # [N, 2]
    cx, cy = centers[:, 0:1], centers[:, 1:2]
    x0, y0, x1, y1 = (boxes[None, :, i] for i in range(4))
    inside = (cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)
    bcx = tf.clip_by_value(tf.floor((x0 + x1) / 2 * grid), 0, grid - 1)
    bcy = tf.clip_by_value(tf.floor((y0 + y1) / 2 * grid), 0, grid - 1)
    cell_index = tf.range(grid * grid, dtype=tf.float32)[:, None]
    is_center = tf.equal(cell_index, bcy * grid + bcx)
    cand = (inside | is_center) & valid[None, :]
    area = (x1 - x0) * (y1 - y0)
    cost = tf.where(cand, tf.broadcast_to(area, tf.shape(cand)), tf.float32.max)
    assigned = tf.argmin(cost, axis=1, output_type=tf.int32)
    pos = tf.reduce_any(cand, axis=1)
    posf = tf.cast(pos, tf.float32)
    box_t = tf.gather(boxes, assigned)
    cls_t = tf.one_hot(tf.gather(classes, assigned), num_classes) * posf[:, None]
    left = tf.maximum(centers[:, 0] - box_t[:, 0], 0.0)
    right = tf.maximum(box_t[:, 2] - centers[:, 0], 0.0)
    top = tf.maximum(centers[:, 1] - box_t[:, 1], 0.0)
    bottom = tf.maximum(box_t[:, 3] - centers[:, 1], 0.0)
    ratio_x = tf.math.divide_no_nan(tf.minimum(left, right), tf.maximum(left, right))
    ratio_y = tf.math.divide_no_nan(tf.minimum(top, bottom), tf.maximum(top, bottom))
    ctr = tf.sqrt(ratio_x * ratio_y)
    at_center = tf.cast(tf.gather(is_center, assigned, axis=1, batch_dims=1), tf.float32)
    ctr = tf.maximum(ctr, at_center) * posf
    g = grid
    return {
        "cls": tf.reshape(cls_t, [g, g, num_classes]),
        "box": tf.reshape(box_t, [g, g, 4]),
        "ctr": tf.reshape(ctr, [g, g, 1]),
        "pos": tf.reshape(posf, [g, g]),
    }


def giou(a, b):
    """Generalised IoU of paired xyxy boxes [..., 4] -> [...]."""
    area_a = tf.maximum(a[..., 2] - a[..., 0], 0) * tf.maximum(a[..., 3] - a[..., 1], 0)
    area_b = tf.maximum(b[..., 2] - b[..., 0], 0) * tf.maximum(b[..., 3] - b[..., 1], 0)
    iw = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0)
    ih = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0)
    inter = iw * ih
    union = area_a + area_b - inter
    iou = tf.math.divide_no_nan(inter, union)
    cw = tf.maximum(a[..., 2], b[..., 2]) - tf.minimum(a[..., 0], b[..., 0])
    ch = tf.maximum(a[..., 3], b[..., 3]) - tf.minimum(a[..., 1], b[..., 1])
    hull = cw * ch
    return iou - tf.math.divide_no_nan(hull - union, hull)


def detection_loss(targets, outputs):
    """(total, dict(focal, giou, l1, ctr)) for batched targets (assign_targets) and head outputs."""
    cls_logits = tf.cast(outputs["cls"], tf.float32)
    grid = int(cls_logits.shape[1])
    pos = tf.reshape(targets["pos"], [-1, grid * grid])
    num_pos = tf.maximum(tf.reduce_sum(pos), 1.0)
    y = targets["cls"]
    p = tf.sigmoid(cls_logits)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=cls_logits)
    p_t = y * p + (1 - y) * (1 - p)
    alpha_t = y * FOCAL_ALPHA + (1 - y) * (1 - FOCAL_ALPHA)
    focal = tf.reduce_sum(alpha_t * (1 - p_t) ** FOCAL_GAMMA * ce) / num_pos
    pred_boxes = decode_boxes(outputs["box"], grid)
    true_boxes = tf.reshape(targets["box"], [-1, grid * grid, 4])
    g_loss = tf.reduce_sum((1.0 - giou(pred_boxes, true_boxes)) * pos) / num_pos
    l1 = tf.reduce_sum(tf.reduce_sum(tf.abs(pred_boxes - true_boxes), -1) * pos) / num_pos
    ctr_ce = tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.reshape(targets["ctr"], [-1, grid * grid]),
        logits=tf.reshape(tf.cast(outputs["ctr"], tf.float32), [-1, grid * grid]),
    )
    ctr = tf.reduce_sum(ctr_ce * pos) / num_pos
    total = focal + g_loss + l1 + ctr
    return total, {"focal": focal, "giou": g_loss, "l1": l1, "ctr": ctr}


def postprocess(
    outputs,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    max_per_class: int = 20,
    max_total: int = 50,
):
    """Head outputs -> (boxes [B,K,4] xyxy, scores [B,K], classes [B,K] int32, valid [B])."""
    cls_logits = tf.cast(outputs["cls"], tf.float32)
    grid = int(cls_logits.shape[1])
    c = int(cls_logits.shape[-1])
    scores = tf.sqrt(tf.sigmoid(cls_logits) * tf.sigmoid(tf.cast(outputs["ctr"], tf.float32)))
    scores = tf.reshape(scores, [-1, grid * grid, c])
    boxes = tf.clip_by_value(decode_boxes(outputs["box"], grid), 0.0, 1.0)
    nms = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :],
        scores,
        max_output_size_per_class=max_per_class,
        max_total_size=max_total,
        iou_threshold=iou_threshold,
        score_threshold=score_threshold,
        clip_boxes=False,
    )
    return (
        nms.nmsed_boxes,
        nms.nmsed_scores,
        tf.cast(nms.nmsed_classes, tf.int32),
        nms.valid_detections,
    )


def detection_map(predictions, ground_truths, num_classes: int, iou_thresholds=None) -> dict:
    """mAP over classes and IoU thresholds.

    predictions[i] = dict(boxes [n,4], scores [n], classes [n]); ground_truths[i] =
    dict(boxes [m,4], classes [m]). Returns {"map", "ap_per_threshold", "per_class"}; a
    class without test boxes is left out (NaN in per_class).
    """
    thresholds = iou_thresholds or metrics.MGCA_IOU_THRESHOLDS
    per_class, per_thr = {}, []
    for c in range(num_classes):
        preds = [
            {
                "boxes": np.asarray(p["boxes"])[np.asarray(p["classes"]) == c],
                "scores": np.asarray(p["scores"])[np.asarray(p["classes"]) == c],
            }
            for p in predictions
        ]
        gts = [
            np.asarray(g["boxes"]).reshape(-1, 4)[np.asarray(g["classes"]) == c]
            for g in ground_truths
        ]
        if sum(len(g) for g in gts) == 0:
            per_class[c] = float("nan")
            continue
        r = metrics.mean_average_precision(preds, gts, thresholds)
        per_class[c] = r["map"]
        per_thr.append(r["ap_per_threshold"])
    vals = [v for v in per_class.values() if not math.isnan(v)]
    ap_thr = {k: float(np.mean([d[k] for d in per_thr])) for k in per_thr[0]} if per_thr else {}
    return {
        "map": float(np.mean(vals)) if vals else float("nan"),
        "ap_per_threshold": ap_thr,
        "per_class": per_class,
    }


def evaluate(
    model,
    data_dir: str,
    *,
    image_size: int | None = None,
    seed: int = 0,
    fraction: float = 1.0,
    labels="auto",
    finetune: bool = False,
    epochs: int = 30,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    encoder_learning_rate: float = 1e-5,
    weight_decay: float = 1e-4,
    head_width: int = 64,
    upsample: int = 1,
    num_convs: int = 2,
    score_threshold: float = 0.05,
    nms_iou: float = 0.5,
    max_detections: int = 50,
    select_on_validation: bool = True,
    split: str = "test",
    **unused,
) -> dict:
    """Train the anchor-free head on the train split's boxes and report mAP on `split`.

    labels: "auto" (every label with boxes in the train split) | a CheXpert name |
    comma-separated names / list — one detection class each (RSNA: "Pneumonia" or
    "Lung Opacity"; SynthCXR: any finding).
    """
    unused.pop("tokenizer", None)  # the CLI passes it to every task
    if unused:
        log.info("detection: ignoring options %s", sorted(unused))
    t0 = time.time()
    fraction = 1.0 if fraction is None else float(fraction)
    image_size = td.check_image_size(model, image_size)
    label_ids = td.resolve_labels(labels, data_dir, "box")
    names = [schema.CHEXPERT_LABELS[i] for i in label_ids]
    num_classes = len(label_ids)
    feats = td.TaskFeatures(model, finetune=finetune)
    keras.utils.set_random_seed(seed)
    ids = td.fraction_ids(data_dir, fraction, seed)

    grid_shape, _ = feats.shapes()
    head = AnchorFreeHead(num_classes, head_width, upsample, num_convs, name="detection_head")
    head.build(grid_shape)
    grid = head.output_grid(grid_shape[1])
    spec = feats.image_spec(image_size)
    target_spec = {
        "cls": tf.TensorSpec([None, grid, grid, num_classes], tf.float32),
        "box": tf.TensorSpec([None, grid, grid, 4], tf.float32),
        "ctr": tf.TensorSpec([None, grid, grid, 1], tf.float32),
        "pos": tf.TensorSpec([None, grid, grid], tf.float32),
    }

    def with_targets(ex):
        return ex["image"], assign_targets(ex["boxes"], ex["classes"], grid, num_classes)

    n_train = td.count_examples(data_dir, "train", ids)
    if n_train == 0:
        raise ValueError(f"{data_dir}: no training examples for detection")
    base = td.detection_dataset(data_dir, "train", image_size, label_ids, ids)
    base = td.maybe_cache(base, n_train, 4 * image_size**2)
    train = base.map(tf.autograph.experimental.do_not_convert(with_targets)).shuffle(
        min(n_train, 4096), seed=seed
    )
    train = train.batch(batch_size).prefetch(2)

    def eval_data(which):
        ds = td.detection_dataset(data_dir, which, image_size, label_ids)
        return ds.padded_batch(
            batch_size, padding_values={"image": 0.0, "boxes": 0.0, "classes": -1}
        )

    val = (
        eval_data("validate").cache()
        if (select_on_validation and td.has_split(data_dir, "validate"))
        else None
    )
    test = eval_data(split)

    opt = ht.HeadOptimizer.for_task(head, feats, learning_rate, encoder_learning_rate, weight_decay)

    @tf.function(input_signature=[spec, target_spec], autograph=False)
    def train_step(images, targets):
        with tf.GradientTape() as tape:
            g, _ = feats(images, training=True)
            loss, parts = detection_loss(targets, head(g, training=True))
        opt.apply(tape.gradient(loss, opt.variables))
        return loss, parts

    @tf.function(input_signature=[spec], autograph=False)
    def predict_step(images):
        g, _ = feats(images, training=False)
        return postprocess(
            head(g, training=False), score_threshold, nms_iou, max_detections, max_detections
        )

    def score(ds):
        preds, gts = [], []
        for batch in ds:
            boxes, scores, classes, valid = (t.numpy() for t in predict_step(batch["image"]))
            gt_b, gt_c = batch["boxes"].numpy(), batch["classes"].numpy()
            for i in range(len(valid)):
                k = int(valid[i])
                preds.append(
                    {"boxes": boxes[i, :k], "scores": scores[i, :k], "classes": classes[i, :k]}
                )
                keep = gt_c[i] >= 0
                gts.append({"boxes": gt_b[i][keep], "classes": gt_c[i][keep]})
        out = detection_map(preds, gts, num_classes)
        out["num_images"] = len(gts)
        out["num_boxes"] = int(sum(len(g["classes"]) for g in gts))
        return out

    def train_epoch():
        sums: dict[str, float] = {}
        n = 0
        for images, targets in train:
            loss, parts = train_step(images, targets)
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {k: v / max(n, 1) for k, v in sums.items()}

    try:
        history, best_val = ht.fit_selecting_on_validation(
            "detection",
            epochs,
            train_epoch,
            (lambda: score(val)["map"]) if val is not None else None,
            opt.tracked,
            "val_map",
        )
        res = score(test)
    finally:
        feats.restore()
    return {
        "task": "detection",
        "labels": names,
        "split": split,
        "map": res["map"],
        "ap_per_threshold": res["ap_per_threshold"],
        "per_class": {names[c]: v for c, v in res["per_class"].items()},
        "iou_thresholds": [float(t) for t in metrics.MGCA_IOU_THRESHOLDS],
        "test_examples": res["num_images"],
        "test_boxes": res["num_boxes"],
        "train_examples": int(n_train),
        "grid": int(grid),
        "finetune": bool(finetune),
        "fraction": float(fraction),
        "seed": int(seed),
        "image_size": int(image_size),
        "epochs": int(epochs),
        "final_loss": history[-1]["loss"] if history else float("nan"),
        "best_val_map": best_val,
        "history": history,
        "seconds": round(time.time() - t0, 1),
    }


def format_table(result: dict) -> str:
    """Markdown table of a detection result (overall and per class)."""
    from place_tf.evaluate.embeddings import fmt

    enc = "fine-tuned" if result.get("finetune") else "frozen"
    lines = [
        "| labels | encoder | fraction | mAP@[0.40:0.75] | test images (boxes) |",
        "|---|---|---|---|---|",
        f"| {', '.join(result.get('labels', []))} | {enc} | {fmt(result.get('fraction'), 2)} | "
        f"{fmt(result.get('map'))} | {result.get('test_examples', '-')} "
        f"({result.get('test_boxes', '-')}) |",
    ]
    per_class = result.get("per_class") or {}
    if len(per_class) > 1:
        lines += ["", "| class | mAP |", "|---|---|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in per_class.items()]
    return "\n".join(lines)
