"""Localization of pathologies by the pathology queries' attention maps (beyond the paper).

PLACE's K pathology queries are unsupervised: nothing says which query looks at which
finding. For every pathology with ground-truth masks (SynthCXR has them), the query k is
chosen on the VALIDATION split as the one whose attention puts the largest mean fraction
of its mass inside that pathology's masks; then on the TEST split, for the images with
that pathology's mask:
- pointing game: the argmax of the attention map, bilinearly upsampled to the image size,
  lies inside the mask (metrics.pointing_game_hit);
- IoU of the map's top 10 % pixels with the mask (metrics.top_fraction_mask, metrics.iou).
Chance levels are reported beside them: the pointing game of a uniformly random point is
the mask's area fraction; the IoU of a random 10 % region is about a·0.1 / (a + 0.1 − a·0.1)
for area fraction a.

Images and masks are read from the same records (read_annotated), preprocessed like the
input pipeline, so they are paired by construction.
"""

from __future__ import annotations

import logging

import numpy as np

from place_tf.data import schema
from place_tf.evaluate import embeddings as emb_lib
from place_tf.evaluate import metrics as M

log = logging.getLogger(__name__)

TOP_FRACTION = 0.1


def read_annotated(
    model, data_dir: str, split: str, image_size: int, batch_size: int = 64
) -> tuple[np.ndarray, list[dict[int, np.ndarray]]]:
    """(attention maps [N, K, h, w], per example {label index: bool mask [S, S]}).

    Images and masks come from the same record, so they are paired by construction. The
    image is decoded and resized exactly as the input pipeline does (pipeline.decode_and_resize:
    longer side to S, centre zero-pad; then pipeline.normalize), and each mask goes through
    the same resize-with-pad (bilinear, then > half) so it stays on the image's pixels.
    Records whose image the pipeline would reject are skipped and counted (warning).
    """
    import tensorflow as tf

    from place_tf.data import manifest, pipeline

    files = manifest.split_files(data_dir, split)
    full = schema.feature_spec()
    keys = (schema.IMAGE, schema.IMAGE_HEIGHT, schema.IMAGE_WIDTH, schema.MASKS, schema.MASK_LABELS)
    spec = {k: full[k] for k in keys}

    def decode(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        image, code = pipeline.decode_and_resize(
            ex[schema.IMAGE], ex[schema.IMAGE_HEIGHT], ex[schema.IMAGE_WIDTH], image_size
        )
        pngs = tf.sparse.to_dense(ex[schema.MASKS], default_value=b"")
        masks = tf.map_fn(
            lambda b: (
                pipeline.resize_with_pad(
                    tf.cast(tf.io.decode_png(b, channels=1), tf.float32), image_size
                )
                > 127.5
            ),
            pngs,
            fn_output_signature=tf.TensorSpec([image_size, image_size, 1], tf.bool),
        )
        return {
            "image": pipeline.normalize(image),
            "code": code,
            "masks": masks[..., 0],
            "mask_labels": tf.sparse.to_dense(ex[schema.MASK_LABELS]),
        }

    enc_image, _ = emb_lib.encoder_fns(model, ("attention_maps",))
    maps, masks, images, skipped = [], [], [], 0

    def flush():
        if images:
            maps.append(enc_image(np.stack(images))["attention_maps"].numpy())
            images.clear()

    for i, ex in enumerate(tf.data.TFRecordDataset(files).map(decode)):
        if int(ex["code"]) != 0:
            skipped += 1
            continue
        labs, ms = ex["mask_labels"].numpy(), ex["masks"].numpy()
        if len(labs) != len(ms):
            raise ValueError(f"{split} record {i}: {len(ms)} masks but {len(labs)} mask labels")
        masks.append({int(lab): m for lab, m in zip(labs, ms, strict=True)})
        images.append(ex["image"].numpy())
        if len(images) == batch_size:
            flush()
    flush()
    if skipped:
        log.warning("localization: %d %s records with an unusable image skipped", skipped, split)
    if not masks:
        raise ValueError(f"{data_dir}: split {split!r} has no usable example")
    return np.concatenate(maps, axis=0), masks


def _upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """[K, h, w] -> [K, size, size] bilinear (half-pixel centres)."""
    import tensorflow as tf

    x = tf.convert_to_tensor(np.transpose(maps, (1, 2, 0))[None].astype(np.float32))
    up = tf.image.resize(x, (size, size), method="bilinear")[0].numpy()
    return np.transpose(up, (2, 0, 1))


def _inside_fraction(up: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[K] fraction of each (non-negative) map's mass inside the mask."""
    up = np.maximum(up, 0.0)
    total = up.reshape(len(up), -1).sum(axis=1)
    inside = (up * mask[None]).reshape(len(up), -1).sum(axis=1)
    return inside / np.maximum(total, 1e-12)


def run(
    model,
    data_dir: str,
    tokenizer=None,
    image_size: int | None = None,
    batch_size: int = 64,
    top_fraction: float = TOP_FRACTION,
) -> dict:
    """Per-pathology query choice on validate, pointing game and top-10 % IoU on test.

    `tokenizer` is unused (images only); it is accepted so every task has one signature.

    Returns {"task": "localization", "per_pathology": {name: {"query", "val_inside_fraction",
    "n_test", "pointing_game", "iou", "chance_pointing", "chance_iou"}}, "mean": {...},
    "skipped": {name: reason}}.
    """
    s = image_size or emb_lib.image_size_of(model)
    val_maps, val_masks = read_annotated(model, data_dir, "validate", s, batch_size)
    test_maps, test_masks = read_annotated(model, data_dir, "test", s, batch_size)
    k = val_maps.shape[1]
    pathologies = sorted({lab for m in val_masks + test_masks for lab in m})
    inside = {p: [] for p in pathologies}
    for maps, per in zip(val_maps, val_masks, strict=True):
        if not per:
            continue
        up = _upsample(maps, s)
        for p, mask in per.items():
            inside[p].append(_inside_fraction(up, mask))
    result = {
        "task": "localization",
        "image_size": s,
        "num_queries": int(k),
        "top_fraction": top_fraction,
        "per_pathology": {},
        "skipped": {},
    }
    chosen = {}
    for p in pathologies:
        name = schema.CHEXPERT_LABELS[p]
        if not inside[p]:
            result["skipped"][name] = "no validation mask to choose a query"
            continue
        mean_inside = np.mean(inside[p], axis=0)
        chosen[p] = int(np.argmax(mean_inside))
        result["per_pathology"][name] = {
            "query": chosen[p],
            "val_inside_fraction": float(mean_inside[chosen[p]]),
            "n_val": len(inside[p]),
        }
    hits = {p: [] for p in chosen}
    ious = {p: [] for p in chosen}
    areas = {p: [] for p in chosen}
    for maps, per in zip(test_maps, test_masks, strict=True):
        todo = [p for p in per if p in chosen]
        if not todo:
            continue
        up = _upsample(maps, s)
        for p in todo:
            heat, mask = up[chosen[p]], per[p]
            hits[p].append(M.pointing_game_hit(heat, mask))
            ious[p].append(M.iou(M.top_fraction_mask(heat, top_fraction), mask))
            areas[p].append(float(mask.mean()))
    for p in list(chosen):
        name = schema.CHEXPERT_LABELS[p]
        entry = result["per_pathology"][name]
        entry["n_test"] = len(hits[p])
        if not hits[p]:
            result["skipped"][name] = "no test mask"
            del result["per_pathology"][name]
            continue
        a = np.asarray(areas[p])
        f = top_fraction
        entry["pointing_game"] = float(np.mean(hits[p]))
        entry["iou"] = float(np.mean(ious[p]))
        entry["chance_pointing"] = float(a.mean())
        entry["chance_iou"] = float(np.mean(a * f / np.maximum(a + f - a * f, 1e-12)))
    keys = ("pointing_game", "iou", "chance_pointing", "chance_iou")
    entries = list(result["per_pathology"].values())
    result["mean"] = {
        key: float(np.mean([e[key] for e in entries])) if entries else float("nan") for key in keys
    }
    return result


def format_table(result: dict) -> str:
    lines = [
        f"### localization (attention of the best query per pathology, top {result.get('top_fraction', TOP_FRACTION) * 100:g} % for IoU)",
        "",
        "| pathology | query | n test | pointing game | chance | IoU | chance IoU |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = list(result.get("per_pathology", {}).items()) + [("mean", result.get("mean", {}))]
    for name, e in rows:
        lines.append(
            f"| {name} | {e.get('query', '')} | {e.get('n_test', '')} | {emb_lib.fmt(e.get('pointing_game'))} | "
            f"{emb_lib.fmt(e.get('chance_pointing'))} | {emb_lib.fmt(e.get('iou'))} | {emb_lib.fmt(e.get('chance_iou'))} |"
        )
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items())]
    return "\n".join(lines)
