"""Image-to-text and text-to-image retrieval, CheXpert 5×200-style (GLoRIA / MGCA protocol).

Queries are images that have exactly one positive CheXpert competition label (the other
four not positive), up to `per_class` of each label (200 in the paper protocol; on a
small corpus as many as are available), drawn with a seeded RNG. Candidates are the
reports of the same images. A retrieved report is a hit when its image's class equals the
query's class; precision@K is the mean over queries of hits in the top K / K (metrics.
precision_at_k). Text-to-image is the transpose. Both embeddings are the projected,
L2-normalised global embeddings, so similarity is cosine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from place_tf.data import schema
from place_tf.evaluate import embeddings as emb_lib
from place_tf.evaluate import metrics as M

log = logging.getLogger(__name__)

COMPETITION_IDX = [schema.label_index(n) for n in schema.COMPETITION_LABELS]
DEFAULT_KS = (1, 5, 10)


def single_label_subset(
    labels: np.ndarray, per_class: int = 200, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, class index into COMPETITION_LABELS) of the 5×200-style subset.

    Rows with exactly one positive competition label; up to `per_class` per class, chosen
    by a seeded permutation and returned sorted by row.
    """
    comp = np.asarray(labels)[:, COMPETITION_IDX] == 1
    single = comp.sum(axis=1) == 1
    cls = np.argmax(comp, axis=1)
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(COMPETITION_IDX)):
        cand = np.flatnonzero(single & (cls == c))
        if len(cand) > per_class:
            cand = np.sort(rng.permutation(cand)[:per_class])
        rows.append(cand)
    idx = np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
    return idx.astype(np.int64), cls[idx].astype(np.int64)


def retrieval_scores(
    img: np.ndarray, txt: np.ndarray, classes: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict:
    """{"image_to_text": {"P@K": v}, "text_to_image": {...}, "skipped_ks": [...]} from embeddings."""
    n = len(classes)
    usable = [k for k in ks if k <= n]
    sim = img @ txt.T
    i2t = M.precision_at_k(sim, classes, classes, usable) if usable else {}
    t2i = M.precision_at_k(sim.T, classes, classes, usable) if usable else {}
    return {
        "image_to_text": {f"P@{k}": v for k, v in i2t.items()},
        "text_to_image": {f"P@{k}": v for k, v in t2i.items()},
        "skipped_ks": [k for k in ks if k > n],
    }


def run(
    model,
    data_dir: str,
    tokenizer,
    split: str = "test",
    per_class: int = 200,
    ks: Sequence[int] = DEFAULT_KS,
    image_size: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Retrieval on `split`; returns {"task": "retrieval", "split", "n_queries", "classes":
    {label: count}, "image_to_text": {"P@1", ...}, "text_to_image": {...}, "skipped_ks",
    "chance": {"P@K": expected precision of a random ranking}}.
    Raises task_data.NoReportTextError when `split` has no report text."""
    from place_tf.evaluate import task_data

    task_data.require_report_text(data_dir, split, "retrieval")
    data = emb_lib.extract(
        model,
        data_dir,
        split,
        tokenizer,
        image_size,
        batch_size,
        image_outputs=("image_embedding",),
        text_outputs=("text_embedding",),
    )
    idx, cls = single_label_subset(data["labels"], per_class, seed)
    counts = {
        schema.COMPETITION_LABELS[c]: int((cls == c).sum()) for c in range(len(COMPETITION_IDX))
    }
    result = {
        "task": "retrieval",
        "split": split,
        "n_queries": int(len(idx)),
        "classes": counts,
        "per_class": per_class,
    }
    if len(idx) == 0:
        raise ValueError(
            f"{data_dir}: split {split!r} has no image with exactly one positive competition label"
        )
    if len(set(cls.tolist())) < 2:
        log.warning("retrieval: only one class present; precision@K is trivially 1")
    result.update(
        retrieval_scores(data["image_embedding"][idx], data["text_embedding"][idx], cls, ks)
    )
    # Chance: in a random ranking every position holds a class-c candidate with P = n_c / n.
    frac = np.asarray([counts[schema.COMPETITION_LABELS[c]] for c in cls]) / len(cls)
    result["chance"] = {f"P@{k}": float(frac.mean()) for k in ks if k <= len(idx)}
    return result


def format_table(result: dict) -> str:
    ks = list(result.get("image_to_text", {}))
    lines = [
        f"### retrieval ({result.get('split')}, {result.get('n_queries')} queries: "
        + ", ".join(f"{k} {v}" for k, v in result.get("classes", {}).items())
        + ")",
        "",
        "| direction | " + " | ".join(ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    for d in ("image_to_text", "text_to_image", "chance"):
        vals = result.get(d, {})
        lines.append(
            f"| {d.replace('_', ' ')} | " + " | ".join(emb_lib.fmt(vals.get(k)) for k in ks) + " |"
        )
    return "\n".join(lines)
