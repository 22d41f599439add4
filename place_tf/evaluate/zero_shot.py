"""Zero-shot classification from prompts: no training, only the two encoders.

For each CheXpert competition label a set of positive prompts (finding wordings crossed
with severities and sides, e.g. "moderate left pleural effusion") and negative prompts
("no pleural effusion") are embedded with encode_text; each set's embeddings are
L2-normalised, averaged and re-normalised (CLIP-style prompt ensembling).
- Multi-label: per image and label, p(positive) = softmax(τ⁻¹ [cos(v, t+), cos(v, t−)])[0]
  with the model's logit scale τ⁻¹; AUROC per label over certain test labels.
- Multi-class (5×200-style): images with exactly one positive competition label
  (retrieval.single_label_subset); the class is argmax_c cos(v, t+_c); accuracy.
[design] The wordings mirror radiology report phrasing (and SynthCXR's, which copies it);
prompts whose words are out of vocabulary degrade to [UNK] tokens, which the tokenizer
handles.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence

import numpy as np

from place_tf.data import schema
from place_tf.evaluate import embeddings as emb_lib
from place_tf.evaluate import metrics as M
from place_tf.evaluate import retrieval

log = logging.getLogger(__name__)


def _expand(template: str, **options: Sequence[str]) -> list[str]:
    keys = list(options)
    out = []
    for combo in itertools.product(*(options[k] for k in keys)):
        text = template.format(**dict(zip(keys, combo, strict=True)))
        out.append(" ".join(text.split()))
    return out


_SIDES = ("left", "right")


def default_prompts() -> dict[str, dict[str, list[str]]]:
    """{competition label: {"positive": [...], "negative": [...]}}."""
    p = {
        "Atelectasis": (
            _expand("{sev} atelectasis", sev=("", "minimal", "subsegmental", "mild", "substantial"))
            + _expand("{side} basilar atelectasis", side=_SIDES)
            + _expand("plate-like atelectasis in the {side} lung base", side=_SIDES)
            + _expand("{side} lower lobe atelectasis with volume loss", side=_SIDES),
            ["no atelectasis", "no focal atelectasis"],
        ),
        "Cardiomegaly": (
            _expand("{sev} cardiomegaly", sev=("", "mild", "moderate", "severe", "marked"))
            + _expand("the heart is {adv} enlarged", adv=("mildly", "moderately", "severely"))
            + ["enlargement of the cardiac silhouette"],
            [
                "heart size is normal",
                "the heart is not enlarged",
                "normal heart size",
                "no cardiomegaly",
            ],
        ),
        "Consolidation": (
            _expand(
                "{sev} consolidation in the {side} {zone}",
                sev=("patchy", "focal", "dense"),
                side=_SIDES,
                zone=("lung base", "upper lung zone"),
            )
            + _expand("{side} lower lobe consolidation", side=_SIDES)
            + ["airspace consolidation", "consolidation consistent with pneumonia"],
            ["no focal consolidation", "no consolidation", "no focal airspace consolidation"],
        ),
        "Edema": (
            _expand("{sev} pulmonary edema", sev=("", "mild", "moderate", "severe"))
            + [
                "interstitial edema with perihilar haziness",
                "bilateral perihilar opacities consistent with pulmonary edema",
            ],
            ["no pulmonary edema", "no evidence of pulmonary edema", "there is no edema"],
        ),
        "Pleural Effusion": (
            _expand(
                "{sev} {side} pleural effusion", sev=("small", "moderate", "large"), side=_SIDES
            )
            + _expand("{sev} bilateral pleural effusions", sev=("small", "moderate", "large"))
            + ["pleural effusion with blunting of the costophrenic angle"],
            ["no pleural effusion", "there is no pleural effusion"],
        ),
    }
    return {k: {"positive": v[0], "negative": v[1]} for k, v in p.items()}


def embed_prompts(model, tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """Ensembled prompt embedding [E]: mean of L2-normalised embeddings, re-normalised."""
    import tensorflow as tf

    if not prompts:
        raise ValueError("embed_prompts: no prompts")
    ids, mask = tokenizer(tf.constant(list(prompts)))
    e = model.encode_text(ids, mask, training=False)["text_embedding"]
    e = np.asarray(e, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    m = e.mean(axis=0)
    return m / max(np.linalg.norm(m), 1e-12)


def class_embeddings(model, tokenizer, prompts: Mapping[str, Mapping[str, Sequence[str]]]):
    """(positive [C, E], negative [C, E]) prompt embeddings in the order of `prompts`."""
    pos = np.stack([embed_prompts(model, tokenizer, v["positive"]) for v in prompts.values()])
    neg = np.stack([embed_prompts(model, tokenizer, v["negative"]) for v in prompts.values()])
    return pos, neg


def run(
    model,
    data_dir: str,
    tokenizer,
    split: str = "test",
    prompts: Mapping | None = None,
    per_class: int = 200,
    image_size: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Zero-shot multi-label AUROC and single-label accuracy on `split`.

    Returns {"task": "zero_shot", "split", "labels", "multilabel": {"macro_auroc",
    "per_label", "skipped"}, "multiclass": {"accuracy", "n", "classes": {label: count},
    "per_class_accuracy"}, "num_prompts": {label: [n_pos, n_neg]}}.
    """
    prompts = dict(prompts or default_prompts())
    names = list(prompts)
    cols = [schema.label_index(n) for n in names]
    data = emb_lib.extract(
        model,
        data_dir,
        split,
        tokenizer,
        image_size,
        batch_size,
        image_outputs=("image_embedding",),
    )
    v = np.asarray(data["image_embedding"], np.float64)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    pos, neg = class_embeddings(model, tokenizer, prompts)
    scale = float(np.asarray(model.logit_scale))
    # softmax over (positive, negative) = sigmoid of the scaled difference.
    logits = scale * (v @ pos.T - v @ neg.T)
    probs = 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))
    ml = M.multilabel_auroc(data["labels"][:, cols], probs, names, uncertain="ignore")

    idx, cls = retrieval.single_label_subset(data["labels"], per_class, seed)
    # Map COMPETITION_LABELS class indices to positions in `names`.
    comp_to_pos = {j: names.index(n) for j, n in enumerate(schema.COMPETITION_LABELS) if n in names}
    keep = np.asarray([c in comp_to_pos for c in cls], bool)
    idx, cls = idx[keep], cls[keep]
    true = np.asarray([comp_to_pos[int(c)] for c in cls], np.int64)
    pred = np.argmax(v[idx] @ pos.T, axis=1) if len(idx) else np.zeros(0, np.int64)
    per_class_acc = {
        names[c]: M.accuracy(true[true == c], pred[true == c])
        for c in range(len(names))
        if np.any(true == c)
    }
    mc = {
        "accuracy": M.accuracy(true, pred),
        "n": int(len(idx)),
        "classes": {names[c]: int((true == c).sum()) for c in range(len(names))},
        "per_class_accuracy": per_class_acc,
    }
    return {
        "task": "zero_shot",
        "split": split,
        "labels": names,
        "multilabel": ml,
        "multiclass": mc,
        "num_prompts": {k: [len(p["positive"]), len(p["negative"])] for k, p in prompts.items()},
    }


def format_table(result: dict) -> str:
    names = result.get("labels", [])
    ml, mc = result.get("multilabel", {}), result.get("multiclass", {})
    lines = [
        f"### zero-shot ({result.get('split')})",
        "",
        "| | macro | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
        "| AUROC (multi-label) | "
        + emb_lib.fmt(ml.get("macro_auroc"))
        + " | "
        + " | ".join(emb_lib.fmt(ml.get("per_label", {}).get(n)) for n in names)
        + " |",
        "| accuracy (single-label) | "
        + emb_lib.fmt(mc.get("accuracy"))
        + " | "
        + " | ".join(emb_lib.fmt(mc.get("per_class_accuracy", {}).get(n)) for n in names)
        + " |",
        "",
        f"Single-label images: {mc.get('n')} ("
        + ", ".join(f"{k} {v}" for k, v in mc.get("classes", {}).items())
        + ")",
    ]
    return "\n".join(lines)
