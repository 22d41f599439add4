"""Evaluation metrics in pure NumPy, each with its formula, so results do not hinge on a library.

Conventions
- Labels follow the schema: CheXpert values 1 (positive), 0 (negative), -1 (uncertain),
  -2 (missing). Missing labels are always left out; uncertain ones follow a policy:
  "ignore" (left out), "zeros" (U-Zeros: negative) or "ones" (U-Ones: positive).
- A metric that is undefined on its input (AUROC of a label with one class only) is
  returned as NaN by the scalar function and reported as skipped, with the reason, by
  the aggregate function; never silently as 0.5.
- Boxes are [xmin, ymin, xmax, ymax] in continuous (normalised or pixel) coordinates;
  area = (xmax - xmin) * (ymax - ymin), no "+1" pixel convention.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
LABEL_UNCERTAIN = -1
LABEL_MISSING = -2
# MGCA's detection protocol: mAP averaged over IoU thresholds 0.4, 0.45, ..., 0.75.
MGCA_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.4 + 0.05 * i, 2) for i in range(8))


# ------------------------------------------------------------------ classification
def _rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # Boundaries of runs of equal values in the sorted array.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = 0.5 * (s + 1 + e)  # mean of ranks s+1 .. e
    return ranks


def roc_auc(y_true: Sequence, y_score: Sequence) -> float:
    """Binary AUROC = P(score of a random positive > score of a random negative).

    Computed as the Mann-Whitney U statistic with average ranks, so a positive/negative
    pair with equal scores counts 1/2:
        AUROC = (sum of ranks of positives - n_pos (n_pos + 1) / 2) / (n_pos n_neg).
    Returns NaN when y_true has only one class.
    """
    y = np.asarray(y_true).reshape(-1)
    s = np.asarray(y_score, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"roc_auc: {y.shape[0]} labels but {s.shape[0]} scores")
    if not np.all(np.isfinite(s)):
        raise ValueError("roc_auc: scores contain NaN or Inf")
    pos = y == 1
    if np.any((y != 0) & (y != 1)):
        raise ValueError(f"roc_auc: labels must be 0/1, got {sorted(set(y.tolist()))}")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def apply_uncertain_policy(
    labels: np.ndarray, policy: str = "ignore"
) -> tuple[np.ndarray, np.ndarray]:
    """CheXpert label array -> (0/1 float targets, bool mask of entries to use).

    Missing (-2) is never used; uncertain (-1) is left out ("ignore"), made 0 ("zeros")
    or 1 ("ones").
    """
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy must be one of {UNCERTAIN_POLICIES}, got {policy!r}")
    y = np.asarray(labels, dtype=np.float64)
    bad = ~np.isin(y, (1, 0, LABEL_UNCERTAIN, LABEL_MISSING))
    if np.any(bad):
        raise ValueError(
            f"labels contain values {sorted(set(y[bad].tolist()))} outside {{1, 0, -1, -2}}"
        )
    valid = y != LABEL_MISSING
    targets = (y == 1).astype(np.float64)
    if policy == "ignore":
        valid &= y != LABEL_UNCERTAIN
    elif policy == "ones":
        targets[y == LABEL_UNCERTAIN] = 1.0
    return targets, valid


def multilabel_auroc(
    labels: np.ndarray,
    scores: np.ndarray,
    label_names: Sequence[str],
    uncertain: str = "ignore",
) -> dict:
    """Per-label and macro AUROC over the labels that are defined.

    labels [N, C] in {1, 0, -1, -2}; scores [N, C]. A label whose usable entries are all
    one class is skipped (reason given). Returns
    {"macro_auroc": mean of defined per-label AUROCs (NaN if none),
     "per_label": {name: auroc}, "skipped": {name: reason}, "support": {name: [n_pos, n_neg]}}.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(
            f"multilabel_auroc: labels {labels.shape} and scores {scores.shape} must be equal [N, C]"
        )
    if labels.shape[1] != len(label_names):
        raise ValueError(
            f"multilabel_auroc: {labels.shape[1]} columns but {len(label_names)} names"
        )
    targets, valid = apply_uncertain_policy(labels, uncertain)
    per_label, skipped, support = {}, {}, {}
    for c, name in enumerate(label_names):
        m = valid[:, c]
        y = targets[m, c]
        n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
        support[name] = [n_pos, n_neg]
        if n_pos == 0 or n_neg == 0:
            skipped[name] = (
                f"no {'positives' if n_pos == 0 else 'negatives'} among {len(y)} labelled examples"
            )
            continue
        per_label[name] = roc_auc(y, scores[m, c])
    macro = float(np.mean(list(per_label.values()))) if per_label else float("nan")
    return {"macro_auroc": macro, "per_label": per_label, "skipped": skipped, "support": support}


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Fraction of equal entries: mean(y_true == y_pred). NaN for empty input."""
    t, p = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"accuracy: {t.shape[0]} labels but {p.shape[0]} predictions")
    return float(np.mean(t == p)) if t.size else float("nan")


# ------------------------------------------------------------------ retrieval
def precision_at_k(
    similarity: np.ndarray,
    query_classes: Sequence,
    candidate_classes: Sequence,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Retrieval precision@K: mean over queries of (# top-K candidates of the query's class) / K.

    similarity [Q, C] (higher = more similar); ranking is by descending similarity, ties
    broken by candidate index (stable), so the result is deterministic.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    qc, cc = np.asarray(query_classes), np.asarray(candidate_classes)
    if sim.ndim != 2 or sim.shape != (len(qc), len(cc)):
        raise ValueError(
            f"precision_at_k: similarity {sim.shape} must be [{len(qc)} queries, {len(cc)} candidates]"
        )
    out = {}
    order = np.argsort(-sim, axis=1, kind="stable")
    for k in ks:
        if not 1 <= k <= sim.shape[1]:
            raise ValueError(f"precision_at_k: K={k} must be in [1, {sim.shape[1]} candidates]")
        hits = cc[order[:, :k]] == qc[:, None]
        out[int(k)] = float(hits.mean(axis=1).mean())
    return out


# ------------------------------------------------------------------ masks
def _binary(x) -> np.ndarray:
    return np.asarray(x).astype(bool)


def dice(pred_mask, gt_mask) -> float:
    """Dice = 2 |P ∩ G| / (|P| + |G|) on binary masks (nonzero = foreground); 1 if both empty."""
    p, g = _binary(pred_mask), _binary(gt_mask)
    if p.shape != g.shape:
        raise ValueError(f"dice: prediction {p.shape} and ground truth {g.shape} differ in shape")
    denom = p.sum() + g.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, g).sum() / denom)


def iou(pred_mask, gt_mask) -> float:
    """IoU (Jaccard) = |P ∩ G| / |P ∪ G| on binary masks; 1 if both empty."""
    p, g = _binary(pred_mask), _binary(gt_mask)
    if p.shape != g.shape:
        raise ValueError(f"iou: prediction {p.shape} and ground truth {g.shape} differ in shape")
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def mean_dice(pred_masks, gt_masks) -> float:
    """Dice averaged over images (each image's Dice, then the mean), as MGCA reports."""
    p, g = np.asarray(pred_masks), np.asarray(gt_masks)
    if p.shape != g.shape or p.ndim < 3:
        raise ValueError(f"mean_dice: need equal [N, H, W] arrays, got {p.shape} and {g.shape}")
    return float(np.mean([dice(a, b) for a, b in zip(p, g, strict=True)]))


def top_fraction_mask(heatmap, fraction: float = 0.1) -> np.ndarray:
    """Binary mask of the ceil(fraction * H * W) highest-valued pixels (ties: row-major first)."""
    h = np.asarray(heatmap, dtype=np.float64)
    if not 0 < fraction <= 1:
        raise ValueError(f"top_fraction_mask: fraction {fraction} must be in (0, 1]")
    n = max(1, math.ceil(fraction * h.size))
    flat = h.reshape(-1)
    idx = np.argsort(-flat, kind="stable")[:n]
    out = np.zeros(flat.shape, dtype=bool)
    out[idx] = True
    return out.reshape(h.shape)


def pointing_game_hit(heatmap, mask) -> bool:
    """True if the heatmap's maximum (first in row-major order on ties) lies inside the mask."""
    h, m = np.asarray(heatmap), _binary(mask)
    if h.shape != m.shape:
        raise ValueError(f"pointing game: heatmap {h.shape} and mask {m.shape} differ in shape")
    return bool(m.reshape(-1)[int(np.argmax(h.reshape(-1)))])


def pointing_game_accuracy(heatmaps, masks) -> float:
    """Fraction of (heatmap, mask) pairs whose heatmap maximum falls inside the mask."""
    hits = [pointing_game_hit(h, m) for h, m in zip(heatmaps, masks, strict=True)]
    return float(np.mean(hits)) if hits else float("nan")


# ------------------------------------------------------------------ boxes / detection
def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """Pairwise IoU [A, B] of [xmin, ymin, xmax, ymax] boxes."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def voc_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC (2010+) all-point interpolated AP: area under the monotone precision envelope.

    AP = sum_i (r_i - r_{i-1}) * max_{r' >= r_i} p(r'), with sentinels r=0 and r=1 (p=0).
    """
    r = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    p = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    i = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[i + 1] - r[i]) * p[i + 1]))


def average_precision(
    predictions: Sequence[Mapping],
    ground_truths: Sequence,
    iou_threshold: float = 0.5,
) -> float:
    """Single-class VOC AP at one IoU threshold over a set of images.

    predictions[i] = {"boxes": [n, 4], "scores": [n]} for image i; ground_truths[i] = [m, 4].
    Predictions of all images are ranked by score; each is a true positive if its highest-IoU
    ground-truth box of the same image has IoU >= threshold and is not matched yet (greedy,
    as the VOC devkit), else a false positive. Recall is over all ground-truth boxes.
    Returns NaN when there is no ground-truth box.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"average_precision: {len(predictions)} prediction sets for {len(ground_truths)} images"
        )
    gts = [np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in ground_truths]
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0:
        return float("nan")
    entries = []  # (score, image, box)
    for i, pred in enumerate(predictions):
        boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
        if len(boxes) != len(scores):
            raise ValueError(
                f"average_precision: image {i} has {len(boxes)} boxes but {len(scores)} scores"
            )
        entries += [(float(s), i, b) for s, b in zip(scores, boxes, strict=True)]
    # Stable sort by descending score: equal scores keep image / box order.
    entries.sort(key=lambda e: -e[0])
    matched = [np.zeros(len(g), dtype=bool) for g in gts]
    tp = np.zeros(len(entries))
    for j, (_, i, box) in enumerate(entries):
        if len(gts[i]) == 0:
            continue
        ious = box_iou(box[None], gts[i])[0]
        best = int(np.argmax(ious))
        if ious[best] >= iou_threshold and not matched[i][best]:
            matched[i][best] = True
            tp[j] = 1.0
    ctp = np.cumsum(tp)
    cfp = np.cumsum(1.0 - tp)
    recall = ctp / n_gt
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    return voc_average_precision(recall, precision)


def mean_average_precision(
    predictions: Sequence[Mapping],
    ground_truths: Sequence,
    iou_thresholds: Sequence[float] = MGCA_IOU_THRESHOLDS,
) -> dict:
    """mAP = mean over IoU thresholds (MGCA: 0.4:0.05:0.75) of single-class VOC AP.

    Returns {"map": float, "ap_per_threshold": {"0.40": ap, ...}}.
    """
    aps = {f"{t:.2f}": average_precision(predictions, ground_truths, t) for t in iou_thresholds}
    vals = [v for v in aps.values() if not math.isnan(v)]
    return {"map": float(np.mean(vals)) if vals else float("nan"), "ap_per_threshold": aps}


# ------------------------------------------------------------------ reporting helpers
def nan_to_none(obj):
    """Replace NaN/Inf floats (also NumPy scalars) by None recursively, for strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return nan_to_none(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj
