"""PlaceEvaluator: scores the candidate SavedModel on held-out data and blesses it.

Metrics, computed through the exported signatures (what TF Serving will run):
- linear-probe AUROC: a logistic-regression head on frozen `from_examples` image
  embeddings of the train split, evaluated on the test split (CheXpert competition labels
  present in the corpus, macro average);
- retrieval precision@5, image → report, on the test split (a hit shares the query's
  positive-label set), with reports embedded by `embed_text`.
The candidate is blessed when it beats what it must beat, on the same test images:
- its random-init twin (the same architecture at a fresh initialisation, exported by the
  Trainer beside it): probe AUROC at least `min_gain_over_random_init` higher, i.e. the
  training taught the encoder something a random one does not already give the probe;
- the latest blessed model (Resolver), if there is one: not worse by more than
  `max_regression`;
- and the absolute floors `min_probe_auroc` / `min_retrieval_p_at_5` (sanity bounds: on a
  small test split chance alone crosses a floor either way, hence the comparisons).
The ModelBlessing carries `blessed`, `current_model` and `current_model_id`, which Pusher
and LatestBlessedModelStrategy read.
"""

import json
import os

from absl import logging
from tfx.dsl.component.experimental.annotations import InputArtifact, OutputArtifact, Parameter
from tfx.dsl.component.experimental.decorators import component
from tfx.types import standard_artifacts

SERVING_SUBDIR = "Format-Serving"
MAX_EXAMPLES = 2000


def _load_examples(examples_uri: str, split: str, limit: int = MAX_EXAMPLES):
    import tensorflow as tf

    from pipelines.components.corpus_gate import split_files
    from place_tf.data import schema

    files = split_files(examples_uri, split)
    serialized, labels, reports = [], [], []
    for s in (
        tf.data.TFRecordDataset(files, compression_type="GZIP").take(limit).as_numpy_iterator()
    ):
        rec = schema.from_example(s)
        serialized.append(s)
        labels.append(list(rec.chexpert))
        reports.append(schema.report_text(rec.findings, rec.impression))
    import numpy as np

    return serialized, np.asarray(labels, dtype=np.int64), reports


def _embed(saved_model, serialized, reports, batch: int = 64):
    import numpy as np
    import tensorflow as tf

    img, txt = [], []
    f_ex = saved_model.signatures["from_examples"]
    f_txt = saved_model.signatures["embed_text"]
    for i in range(0, len(serialized), batch):
        img.append(f_ex(examples=tf.constant(serialized[i : i + batch]))["image_embedding"].numpy())
        txt.append(f_txt(reports=tf.constant(reports[i : i + batch]))["text_embedding"].numpy())
    return np.concatenate(img), np.concatenate(txt)


def score_model(
    model_dir: str, examples_uri: str, train_split: str = "train", test_split: str = "test"
) -> dict:
    """Linear-probe AUROC and retrieval P@5 of a SavedModel on an Examples artifact."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401 - WordPiece ops of the SavedModel

    from place_tf.data import schema
    from place_tf.evaluate import linear_probe, metrics

    sm = tf.saved_model.load(model_dir)
    tr_ser, tr_lab, tr_rep = _load_examples(examples_uri, train_split)
    te_ser, te_lab, te_rep = _load_examples(examples_uri, test_split)
    tr_img, _ = _embed(sm, tr_ser, tr_rep)
    te_img, te_txt = _embed(sm, te_ser, te_rep)
    idx = [schema.label_index(n) for n in schema.COMPETITION_LABELS]
    per_label = {}
    for name, j in zip(schema.COMPETITION_LABELS, idx, strict=True):
        ytr, yte = tr_lab[:, j] == 1, te_lab[:, j] == 1
        if ytr.sum() == 0 or ytr.all() or yte.sum() == 0 or yte.all():
            continue  # no positives or no negatives: AUROC undefined
        w, b = linear_probe.fit_logistic(tr_img, ytr.astype(np.float64))
        per_label[name] = float(metrics.roc_auc(yte.astype(np.int64), te_img @ w + b))
    macro = float(np.mean(list(per_label.values()))) if per_label else float("nan")
    # Retrieval: a candidate report is relevant if it has the same positive-label set.
    keys = [tuple(np.flatnonzero(row[idx] == 1)) for row in te_lab]
    ids = {k: i for i, k in enumerate(sorted(set(keys)))}
    classes = np.array([ids[k] for k in keys])
    p5 = float(metrics.precision_at_k(te_img @ te_txt.T, classes, classes, ks=(5,))[5])
    return {
        "probe_auroc": macro,
        "probe_per_label": per_label,
        "retrieval_p_at_5": p5,
        "num_test": len(te_ser),
    }


def blessing_reasons(
    cand: dict,
    base: dict | None,
    min_probe_auroc: float,
    min_retrieval_p_at_5: float,
    max_regression: float,
    random_init: dict | None = None,
    min_gain_over_random_init: float = 0.0,
) -> list[str]:
    """Why the candidate is not blessed ([] = blessed): below an absolute threshold, not
    better than its random-init twin by min_gain_over_random_init, or worse than the latest
    blessed baseline by more than max_regression. NaN fails."""
    reasons = []
    if random_init is not None:
        need = random_init["probe_auroc"] + min_gain_over_random_init
        if not cand["probe_auroc"] >= need:
            reasons.append(
                f"probe AUROC {cand['probe_auroc']:.3f} does not beat its random-init twin's "
                f"{random_init['probe_auroc']:.3f} by {min_gain_over_random_init}"
            )
    if not cand["probe_auroc"] >= min_probe_auroc:
        reasons.append(f"probe AUROC {cand['probe_auroc']:.3f} < {min_probe_auroc}")
    if not cand["retrieval_p_at_5"] >= min_retrieval_p_at_5:
        reasons.append(f"retrieval P@5 {cand['retrieval_p_at_5']:.3f} < {min_retrieval_p_at_5}")
    if base is not None and not cand["probe_auroc"] >= base["probe_auroc"] - max_regression:
        reasons.append(
            f"probe AUROC {cand['probe_auroc']:.3f} is below the blessed baseline's "
            f"{base['probe_auroc']:.3f} by more than {max_regression}"
        )
    return reasons


@component
def PlaceEvaluator(  # noqa: N802 - TFX component naming
    model: InputArtifact[standard_artifacts.Model],
    examples: InputArtifact[standard_artifacts.Examples],
    evaluation: OutputArtifact[standard_artifacts.ModelEvaluation],
    blessing: OutputArtifact[standard_artifacts.ModelBlessing],
    baseline_model: InputArtifact[standard_artifacts.Model] = None,
    min_probe_auroc: Parameter[float] = 0.5,
    min_retrieval_p_at_5: Parameter[float] = 0.0,
    max_regression: Parameter[float] = 0.02,
    min_gain_over_random_init: Parameter[float] = 0.0,
):
    from pipelines.trainer_module import RANDOM_INIT_SUBDIR

    cand = score_model(os.path.join(model.uri, SERVING_SUBDIR), examples.uri)
    twin_dir = os.path.join(model.uri, RANDOM_INIT_SUBDIR)
    if not os.path.isdir(twin_dir):
        # Every model of this pipeline's Trainer has one; without it there is no fair test.
        raise ValueError(f"PlaceEvaluator: the Model artifact has no random-init twin ({twin_dir})")
    result = {
        "candidate": cand,
        "random_init": score_model(twin_dir, examples.uri),
        "baseline": None,
        "thresholds": {
            "min_probe_auroc": min_probe_auroc,
            "min_retrieval_p_at_5": min_retrieval_p_at_5,
            "max_regression": max_regression,
            "min_gain_over_random_init": min_gain_over_random_init,
        },
    }
    if baseline_model is not None and baseline_model.uri != model.uri:
        result["baseline"] = score_model(
            os.path.join(baseline_model.uri, SERVING_SUBDIR), examples.uri
        )
    reasons = blessing_reasons(
        cand, result["baseline"], random_init=result["random_init"], **result["thresholds"]
    )
    blessed = not reasons
    result["blessed"], result["reasons"] = blessed, reasons
    with open(os.path.join(evaluation.uri, "evaluation.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    open(os.path.join(blessing.uri, "BLESSED" if blessed else "NOT_BLESSED"), "w").close()
    blessing.set_int_custom_property("blessed", int(blessed))
    blessing.set_string_custom_property("current_model", model.uri)
    blessing.set_int_custom_property("current_model_id", model.id)
    if baseline_model is not None:
        blessing.set_string_custom_property("baseline_model", baseline_model.uri)
        blessing.set_int_custom_property("baseline_model_id", baseline_model.id)
    logging.info(
        "PlaceEvaluator: blessed=%s %s metrics=%s random init=%s",
        blessed,
        reasons,
        {k: v for k, v in cand.items() if k != "probe_per_label"},
        {k: v for k, v in result["random_init"].items() if k != "probe_per_label"},
    )
